"""The tail-world experiment: the paper's arms on one base policy, same GRPO budget.

For each seed s (a replicate of the whole pipeline):

 1. world = tail world with seed world.seed + s; word-level tokenizer; tiny decoder.
 2. base policy = SFT (rubrax.train.sft) of a random-init decoder on base
    demonstrations; `base_samples_per_prompt` samples of it give the base gold
    distribution F0 (per prompt) and the samples for on-policy pairs and theory.
 3. off-policy data: responses of the good and great generators.
 4. proxies (one per arm):
      gold                   the gold reward itself (oracle);
      bt_on_policy           BT model (rubrax.rewards.bradley_terry) on pairs of base samples,
      bt_off_policy          ... on pairs of great responses,
      bt_mixed               ... on both (rubrax.data.pairs.mixed_pairs),
                             labels from the noisy gold judge; backbone = base policy;
      rubric_initial         rubrax.elicit.rtd.propose_initial with the simulated proposer,
      rubric_1_good          + one refine_once on 2 good responses,
      rubric_1_great         + one refine_once on 2 responses of great_0,
      rubric_4_great         iterative_rtd, 4 rounds, pool of 16 great_0 responses,
      rubric_4_great_diverse iterative_rtd, 4 rounds, pool of 16 from all great generators,
                             graded by the simulated verifier through RubricReward;
      sft_great              (no proxy) SFT of the base policy on great responses.
 5. each RL arm: GRPO through the library's own loop (rubrax.rl.loop.train, with
    SimConfig's RLConfig / OptimConfig / SampleConfig) from the base policy for
    `rl_steps` steps, all prompts x `group_size` rollouts per step, identical settings,
    checkpointed every `checkpoint_every` steps under out_dir/runs/ (a killed run resumes
    inside the arm). A step hook tracks per step, on the step's own rollouts (samples
    of the current policy, before its update):
      gold      mean r*(x, y)
      win_rate  mean F0_x(r*(x, y)) with F0_x the base policy's empirical gold CDF on
                prompt x, ties counted half: P(y beats a base sample) -- exactly the
                quantity Proposition 1 predicts (rubrax.theory.tilted_from_samples)
      proxy     mean proxy reward
      kl        mean over rollouts of sum_t [log pi(y_t|.) - log pi_base(y_t|.)]
                (the k1 Monte-Carlo estimate of KL(pi || pi_base) per response: the
                update's own "seq_kl", from the reference logprobs it computes anyway)
    plus a final evaluation on `eval_samples_per_prompt` fresh samples after the last
    update. The SFT arm (rubrax.train's trainer, with an eval hook) is evaluated the
    same way every `eval_every` steps.
 6. Table 2 analogue: agreement of each proxy's preference with the gold preference
    on response pairs from the high-gold and the low-gold half of a mixed pool.
 7. theory link: tilted_from_samples(gold, proxy, beta) on the base samples predicts
    win rate against KL for every proxy.

Outputs are written as each piece finishes (arms/*.jsonl, rubrics, pairs), and the
base policy, the BT models and the arms checkpoint under runs/, so a crashed (or killed)
run rerun with the same output folder skips what is done and resumes what is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rubrax.data.records import write_jsonl
from rubrax.sim import generators as gen
from rubrax.sim.agents import SimProposer, SimVerifier
from rubrax.sim.presets import SimConfig
from rubrax.sim.rewards import GoldReward
from rubrax.sim.tokenizer import WordTokenizer
from rubrax.sim.world import World

Log = Callable[[str], None]
RUBRIC_ARMS = ("rubric_initial", "rubric_1_good", "rubric_1_great", "rubric_4_great", "rubric_4_great_diverse")
BT_ARMS = ("bt_on_policy", "bt_off_policy", "bt_mixed")


# ----------------------------------------------------------------------------- helpers


def mid_cdf(sorted_base: np.ndarray, values: np.ndarray) -> np.ndarray:
    """F0(v) with ties counted half: (#{base < v} + #{base <= v}) / (2 n)."""
    lt = np.searchsorted(sorted_base, values, side="left")
    le = np.searchsorted(sorted_base, values, side="right")
    return (lt + le) / (2.0 * len(sorted_base))


def _hash_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def make_judge(world: World, seed: int) -> Callable[[str, str, str], int]:
    """The noisy gold judge as a `rubrax.data.pairs` judge: (prompt, a, b) -> 0 | 1.

    Its coin is a function of (seed, prompt, a, b), so relabelling a pair is reproducible.
    """
    by_text = {p.text: p.id for p in world.prompts}

    def judge(prompt: str, a: str, b: str) -> int:
        return world.judge(by_text[prompt], a, b, _hash_rng(seed, "judge", prompt, a, b))

    return judge


@dataclasses.dataclass
class SeedContext:
    """Everything an arm needs for one seed (built once, shared by all arms)."""

    seed: int
    world: World
    tokenizer: WordTokenizer
    model_config: Any
    base_params: Any
    prompts: Any  # rubrax.rl.prompts.PromptSet of the world's prompts (with prompt_id)
    prompt_tokens_PxW: np.ndarray
    prompt_mask_PxW: np.ndarray
    base_samples: list[list[str]]  # [prompt][n] base policy samples
    base_gold_PxN: np.ndarray
    base_sorted_PxN: np.ndarray
    good: list[list[str]]
    great: dict[str, list[list[str]]]  # generator name -> [prompt][n]
    timings: dict[str, float]

    @property
    def prompt_ids(self) -> list[str]:
        return [p.id for p in self.world.prompts]

    @property
    def prompt_texts(self) -> list[str]:
        return [p.text for p in self.world.prompts]

    def win_rate(self, prompt_index: np.ndarray, gold: np.ndarray) -> np.ndarray:
        return np.array([mid_cdf(self.base_sorted_PxN[i], np.array([g]))[0] for i, g in zip(prompt_index, gold)])


# ----------------------------------------------------------------------------- policy plumbing


def model_config_for(cfg: SimConfig, tokenizer: WordTokenizer):
    from rubrax.models import ModelConfig

    m = cfg.model
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def sample_config(cfg: SimConfig, n: int):
    return dataclasses.replace(cfg.sample, n=n)


def sample_policy(ctx: SeedContext, cfg: SimConfig, params: Any, key: Any, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n fresh samples per prompt for evaluation: (texts, prompt index, KL to the base
    policy per sample), rows prompt-major. Drawn in chunks of rl.group_size so that every
    call has the rollout shape (one sampler compilation with the RL arms)."""
    import jax

    from rubrax.rl.rollouts import RolloutSampler

    g = cfg.rl.group_size
    if n % g:
        raise ValueError(f"sample_policy: n={n} must be a multiple of rl.group_size={g}")
    P = len(ctx.prompt_ids)
    sampler = RolloutSampler(ctx.prompts, ctx.tokenizer, ctx.model_config, sample_config(cfg, g), np.asarray(key),
                             prompts_per_step=P, max_prompt_tokens=ctx.prompt_tokens_PxW.shape[1])
    texts_PxN: list[list[str]] = [[] for _ in range(P)]
    kl_PxN: list[list[float]] = [[] for _ in range(P)]
    for c in range(n // g):
        ro = sampler.draw(c, np.arange(P), ctx.prompt_tokens_PxW, ctx.prompt_mask_PxW, jax.random.fold_in(key, c), params)
        kl_B = _kl_to_base(ctx, g, ro.tokens, ro.mask, ro.logprobs)
        for i in range(P):
            texts_PxN[i] += ro.completions[i * g:(i + 1) * g]
            kl_PxN[i] += list(kl_B[i * g:(i + 1) * g])
    return [t for row in texts_PxN for t in row], np.repeat(np.arange(P), n), np.array(kl_PxN).reshape(-1)


@functools.lru_cache(maxsize=8)
def _ref_logprob_fn(model_config: Any):
    import jax

    from rubrax.policy import logprobs

    return jax.jit(functools.partial(logprobs, config=model_config))


def _kl_to_base(ctx: SeedContext, n: int, tokens_BxC: np.ndarray, mask_BxC: np.ndarray, logp_BxC: np.ndarray) -> np.ndarray:
    """Per-response k1 estimate sum_t (log pi(y_t) - log pi_base(y_t)) of evaluation samples
    (during RL the update reports it, from the reference logprobs it already has)."""
    prompt = np.repeat(ctx.prompt_tokens_PxW, n, axis=0)
    pmask = np.repeat(ctx.prompt_mask_PxW, n, axis=0)
    tokens = np.concatenate([prompt, tokens_BxC], axis=1).astype(np.int32)
    mask = np.concatenate([pmask, mask_BxC], axis=1).astype(np.int32)
    ref = np.asarray(_ref_logprob_fn(ctx.model_config)(ctx.base_params, tokens, mask))[:, prompt.shape[1]:]
    return ((logp_BxC - ref) * mask_BxC.astype(np.float64)).sum(axis=1)


def _sft_arrays(tokenizer: WordTokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    from rubrax.data.sft import SFTExample, encode_sft

    examples = [SFTExample(p, r) for p, r in zip(prompts, responses)]
    return encode_sft(tokenizer, examples, max_length=max_length, pad_to=max_length)


# ----------------------------------------------------------------------------- per-seed set-up


def build_seed(cfg: SimConfig, seed: int, log: Log, work: Path | None = None) -> SeedContext:
    """The seed's world, base policy (SFT, checkpointed under `work` when given), base
    samples and off-policy responses."""
    import jax

    from rubrax.models import init_params
    from rubrax.train.optim import OptimConfig
    from rubrax.train.sft import train_sft
    from rubrax.train.trainer import TrainConfig

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world = World(dataclasses.replace(cfg.world, seed=cfg.world.seed + seed))
    tok = WordTokenizer(world.vocabulary)
    mcfg = model_config_for(cfg, tok)
    gcfg = cfg.generators
    max_len = 8 + cfg.sample.max_new_tokens

    demos_p, demos_r = [], []
    for p in world.prompts:
        for r in gen.sample_responses(world, gen.base_spec(gcfg), p, cfg.sft.demos_per_prompt, (seed, 0)):
            demos_p.append(p.text)
            demos_r.append(r)
    data = _sft_arrays(tok, demos_p, demos_r, max_len)
    params0 = init_params(mcfg, jax.random.PRNGKey(seed))
    train_cfg = TrainConfig(
        optim=OptimConfig(learning_rate=cfg.sft.lr, schedule="cosine", warmup_ratio=0.05),
        batch_size=cfg.sft.batch_size, num_epochs=10**6, max_steps=cfg.sft.steps, seed=seed, progress=False,
        log_every=max(1, cfg.sft.steps),
    )
    ckpt = None if work is None else str(work / f"seed{seed}_base" / "checkpoints")
    res = train_sft(params0, mcfg, data, train_cfg, desc=f"base sft s{seed}", ckpt_dir=ckpt)
    base_params = res.params
    timings["base_sft_s"] = time.perf_counter() - t0
    log(f"[seed {seed}] base policy: SFT {cfg.sft.steps} steps on {len(demos_r)} demonstrations, "
        f"final loss {res.last_metrics.get('loss', float('nan')):.3f} ({timings['base_sft_s']:.1f}s)")

    prompts, ptoks, pmask = _world_prompts(world, tok, cfg.sample.prompt_bucket)
    ctx = SeedContext(
        seed=seed, world=world, tokenizer=tok, model_config=mcfg, base_params=base_params,
        prompts=prompts, prompt_tokens_PxW=ptoks, prompt_mask_PxW=pmask, base_samples=[], base_gold_PxN=np.zeros((0, 0)),
        base_sorted_PxN=np.zeros((0, 0)), good=[], great={}, timings=timings,
    )
    t1 = time.perf_counter()
    n = cfg.eval.base_samples_per_prompt
    texts, _, _ = sample_policy(ctx, cfg, base_params, jax.random.fold_in(jax.random.PRNGKey(seed), 10**6), n)
    ctx.base_samples = [texts[i * n:(i + 1) * n] for i in range(len(world.prompts))]
    ctx.base_gold_PxN = np.array([[world.gold_reward(p.id, r) for r in rs] for p, rs in zip(world.prompts, ctx.base_samples)])
    ctx.base_sorted_PxN = np.sort(ctx.base_gold_PxN, axis=1)
    k = max(cfg.rubric.pool_size, cfg.sft.great_per_prompt, cfg.bt.pairs_per_prompt // 2 + 2)
    ctx.good = [gen.sample_responses(world, gen.good_spec(), p, k, (seed, 1)) for p in world.prompts]
    for spec in gen.great_specs(world, gcfg):
        ctx.great[spec.name] = [gen.sample_responses(world, spec, p, k, (seed, 2)) for p in world.prompts]
    timings["base_samples_s"] = time.perf_counter() - t1
    met = np.array([[world.gold_breakdown(p.id, r).met["excellent"] > 0 for r in rs] for p, rs in zip(world.prompts, ctx.base_samples)])
    log(f"[seed {seed}] base samples: mean gold {ctx.base_gold_PxN.mean():.3f}, "
        f"P(any excellent requirement met) {met.mean():.4f} ({timings['base_samples_s']:.1f}s)")
    return ctx


def _world_prompts(world: World, tok: WordTokenizer, bucket: int):
    """The world's prompts as an RL PromptSet (chat template, prompt_id column) and their
    left-padded [P, W] tokens and mask, W = the longest prompt rounded up to `bucket`."""
    from rubrax.rl.prompts import load_prompts
    from rubrax.rl.rollouts import left_pad

    records = [{"prompt": p.text, "prompt_id": p.id} for p in world.prompts]
    prompts = load_prompts(records, tok, max_prompt_tokens=64)
    longest = max(len(t) for t in prompts.tokens)
    ptoks, pmask = left_pad(prompts.tokens, -(-longest // bucket) * bucket, tok.pad_token_id)
    return prompts, ptoks, pmask


def great_pool(ctx: SeedContext, i: int, n: int, diverse: bool) -> list[tuple[str, str]]:
    """(source, text) candidates for prompt i: n of great_0, or n spread over all great generators."""
    names = sorted(ctx.great)
    if not diverse:
        return [(names[0], t) for t in ctx.great[names[0]][i][:n]]
    per = -(-n // len(names))
    pool = [(name, ctx.great[name][i][j]) for j in range(per) for name in names]
    return pool[:n]


# ----------------------------------------------------------------------------- proxies


async def _build_rubrics(ctx: SeedContext, cfg: SimConfig) -> dict[str, dict[str, Any]]:
    from rubrax.elicit import rtd

    proposer = SimProposer(ctx.world, dataclasses.replace(cfg.proposer, seed=cfg.proposer.seed + ctx.seed))
    verifier = SimVerifier(dataclasses.replace(cfg.verifier, seed=cfg.verifier.seed + ctx.seed))
    out: dict[str, dict[str, Any]] = {arm: {} for arm in RUBRIC_ARMS}
    names = sorted(ctx.great)
    for i, p in enumerate(ctx.world.prompts):
        initial = await rtd.propose_initial(proposer, p.id, p.text)
        out["rubric_initial"][p.id] = initial
        g = ctx.good[i]
        out["rubric_1_good"][p.id] = await rtd.refine_once(proposer, initial, g[0], g[1])
        gr = ctx.great[names[0]][i]
        out["rubric_1_great"][p.id] = await rtd.refine_once(proposer, initial, gr[0], gr[1])
        for arm, diverse in (("rubric_4_great", False), ("rubric_4_great_diverse", True)):
            pool = [
                rtd.Candidate(id=f"{p.id}-{j}", text=text, source=src)
                for j, (src, text) in enumerate(great_pool(ctx, i, cfg.rubric.pool_size, diverse))
            ]
            res = await rtd.iterative_rtd(proposer, verifier, initial, pool, rounds=cfg.rubric.rounds, seed=ctx.seed)
            out[arm][p.id] = res.rubric
    return out


def build_rubrics(ctx: SeedContext, cfg: SimConfig) -> dict[str, dict[str, Any]]:
    return asyncio.run(_build_rubrics(ctx, cfg))


def train_bt(ctx: SeedContext, cfg: SimConfig, arm: str, log: Log, work: Path | None = None) -> Any:
    """A BT reward model for `arm` (on-policy / off-policy great / mixed pairs)."""
    import jax

    from rubrax.data import pairs as pairs_lib
    from rubrax.rewards import bradley_terry as bt
    from rubrax.train.optim import OptimConfig
    from rubrax.train.trainer import TrainConfig

    t0 = time.perf_counter()
    judge = make_judge(ctx.world, ctx.seed)
    names = sorted(ctx.great)
    # Off-policy candidates: the great generators' responses, all of them together.
    great = [[r for name in names for r in ctx.great[name][i][: cfg.bt.pairs_per_prompt // len(names) + 2]] for i in range(len(ctx.prompt_ids))]
    kw = {"pairs_per_prompt": cfg.bt.pairs_per_prompt, "seed": ctx.seed}
    if arm == "bt_on_policy":
        ps = pairs_lib.on_policy_pairs(ctx.prompt_texts, ctx.base_samples, judge, **kw)
    elif arm == "bt_off_policy":
        ps = pairs_lib.off_policy_pairs(ctx.prompt_texts, great, judge, **kw)
    else:
        ps = pairs_lib.mixed_pairs(ctx.prompt_texts, ctx.base_samples, great, judge, **kw)
    max_len = 8 + cfg.sample.max_new_tokens
    data = pairs_lib.encode_pairs(ctx.tokenizer, ps.pairs, max_length=max_len, pad_to=max_len)
    params = bt.init_params(ctx.model_config, jax.random.PRNGKey(ctx.seed + 7), backbone=ctx.base_params)
    steps = max(1, cfg.bt.epochs * (len(ps.pairs) // cfg.bt.batch_size))
    train_cfg = TrainConfig(
        optim=OptimConfig(learning_rate=cfg.bt.lr, schedule="cosine", warmup_ratio=0.1),
        batch_size=cfg.bt.batch_size, num_epochs=cfg.bt.epochs, seed=ctx.seed, progress=False, log_every=steps,
    )
    ckpt = None if work is None else str(work / f"seed{ctx.seed}_{arm}_model" / "checkpoints")
    res = bt.train_reward_model(params, ctx.model_config, data, train_cfg, desc=f"{arm} s{ctx.seed}", ckpt_dir=ckpt)
    reward = bt.BTReward(res.params, ctx.model_config, ctx.tokenizer, max_length=max_len, batch_size=64, length_multiple=max_len)
    ctx.timings[f"{arm}_train_s"] = time.perf_counter() - t0
    log(f"[seed {ctx.seed}] {arm}: {len(ps.pairs)} pairs, {steps} steps, train loss "
        f"{res.last_metrics.get('loss', float('nan')):.3f} ({ctx.timings[f'{arm}_train_s']:.1f}s)")
    return reward


def build_proxies(ctx: SeedContext, cfg: SimConfig, log: Log, work: Path | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """{arm: reward function} for every RL arm in cfg.arms, and the rubrics per rubric arm."""
    from rubrax.rewards.rubric import RubricReward

    proxies: dict[str, Any] = {}
    rubrics: dict[str, dict[str, Any]] = {}
    if "gold" in cfg.arms:
        proxies["gold"] = GoldReward(ctx.world)
    for arm in BT_ARMS:
        if arm in cfg.arms:
            proxies[arm] = train_bt(ctx, cfg, arm, log, work)
    if any(a in cfg.arms for a in RUBRIC_ARMS):
        t0 = time.perf_counter()
        rubrics = build_rubrics(ctx, cfg)
        verifier = SimVerifier(dataclasses.replace(cfg.verifier, seed=cfg.verifier.seed + ctx.seed))
        for arm in RUBRIC_ARMS:
            if arm in cfg.arms:
                proxies[arm] = RubricReward(rubrics[arm], verifier)
        sizes = {arm: np.mean([len(r.criteria) for r in rubrics[arm].values()]) for arm in RUBRIC_ARMS}
        log(f"[seed {ctx.seed}] rubrics ({time.perf_counter() - t0:.1f}s), mean criteria per prompt: "
            + ", ".join(f"{a.removeprefix('rubric_')} {s:.1f}" for a, s in sizes.items()))
    return proxies, rubrics


def score_proxy(proxy: Any, ctx: SeedContext, prompt_index: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    out = proxy([ctx.prompt_texts[i] for i in prompt_index], list(texts), prompt_id=[ctx.prompt_ids[i] for i in prompt_index])
    return out.scores.astype(np.float64), out.valid


# ----------------------------------------------------------------------------- RL and SFT arms

TRACKED = ("gold", "win_rate", "win_rate_se", "proxy", "proxy_invalid", "kl", "length")


def tracked(ctx: SeedContext, prompt_index: np.ndarray, texts: Sequence[str], proxy: np.ndarray | None,
            proxy_valid: np.ndarray | None, kl: float) -> dict[str, float]:
    """The tracked quantities (TRACKED) of samples `texts` of prompts `prompt_index`."""
    gold = ctx.world.gold_rewards([ctx.prompt_ids[i] for i in prompt_index], texts)
    win = ctx.win_rate(prompt_index, gold)
    row = {
        "gold": float(gold.mean()), "win_rate": float(win.mean()),
        "win_rate_se": float(win.std(ddof=1) / np.sqrt(len(win))) if len(win) > 1 else 0.0,
        "proxy": float("nan"), "proxy_invalid": 0, "kl": float(kl), "length": float(np.mean([len(t.split()) for t in texts])),
    }
    if proxy is not None:
        ok = proxy_valid.astype(bool)
        row["proxy"] = float(np.asarray(proxy, np.float64)[ok].mean()) if ok.any() else float("nan")
        row["proxy_invalid"] = int((~ok).sum())
    return row


def tracking_hook(ctx: SeedContext, group_size: int):
    """A step hook of rubrax.rl.loop.train: TRACKED on the step's own rollouts, logged as
    "sim/<name>"; the KL is the update's seq_kl (k1 to the base policy per response)."""

    def hook(view) -> dict[str, float]:
        idx = np.repeat(view.rollouts.indices, group_size)
        row = tracked(ctx, idx, view.rollouts.completions, view.scores_B, view.valid_B, view.metrics["seq_kl"])
        return {f"sim/{k}": v for k, v in row.items()}

    return hook


def run_rl_arm(ctx: SeedContext, cfg: SimConfig, arm: str, proxy: Any, log: Log, work: Path,
               eval_hooks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """GRPO on `proxy` through rubrax.rl.loop.train (resuming from work/seed<s>_<arm>), then
    the final evaluation; rows: one per step (from the run's metrics.jsonl) + the final one.
    eval_hooks (e.g. rubrax.rl.monitor.GoldMonitor) run every cfg.eval_every steps."""
    from rubrax.rl.loop import LoopConfig, train
    from rubrax.rl.monitor import CriteriaLog  # rubric arms: per-criterion verdicts per step, for `rubrax report`

    t0 = time.perf_counter()
    run_dir = work / f"seed{ctx.seed}_{arm}"
    loop = LoopConfig(
        total_steps=cfg.rl_steps, prompts_per_step=len(ctx.prompt_ids), max_prompt_tokens=ctx.prompt_tokens_PxW.shape[1],
        seed=10_000 + ctx.seed, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, out_dir=str(run_dir),
        num_devices=1,  # the experiment's batches are tiny: fake CPU devices (tests) only add overhead
        progress=False, tensorboard=False, eval_every=cfg.eval_every,
    )
    res = train(params=ctx.base_params, model_config=ctx.model_config, tokenizer=ctx.tokenizer, reward_fn=proxy,
                prompts=ctx.prompts, rl=cfg.rl, sample=cfg.sample, optim=cfg.optim, loop=loop, eval_hooks=eval_hooks,
                step_hooks=[tracking_hook(ctx, cfg.rl.group_size), CriteriaLog(str(run_dir))],
                run_config={"seed": ctx.seed, "arm": arm})
    rows = _step_rows(run_dir / "metrics.jsonl", ctx.seed, arm)
    if [r["step"] for r in rows] != list(range(cfg.rl_steps)):
        raise RuntimeError(f"{run_dir}/metrics.jsonl has steps {[r['step'] for r in rows]}, expected 0..{cfg.rl_steps - 1}")
    rows.append(final_eval(ctx, cfg, arm, res.state.params, cfg.rl_steps, proxy))
    log(f"[seed {ctx.seed}] {arm:24s} win rate {rows[0]['win_rate']:.3f} -> {rows[-1]['win_rate']:.3f}  "
        f"gold {rows[0]['gold']:.3f} -> {rows[-1]['gold']:.3f}  proxy {rows[0]['proxy']:.3f} -> {rows[-1]['proxy']:.3f}  "
        f"KL {rows[-1]['kl']:.2f}  ({time.perf_counter() - t0:.1f}s)")
    return rows


def _step_rows(metrics_path: Path, seed: int, arm: str) -> list[dict[str, Any]]:
    """The tracked rows of an RL run, one per step: a step logged twice (re-run after a
    resume from an earlier checkpoint, with the same values) counts once."""
    from rubrax.train.metrics import read_metrics

    by_step = {r["step"]: r for r in read_metrics(metrics_path) if "sim/gold" in r}
    return [{"seed": seed, "arm": arm, "step": s, **{k: by_step[s][f"sim/{k}"] for k in TRACKED}} for s in sorted(by_step)]


def final_eval(ctx: SeedContext, cfg: SimConfig, arm: str, params: Any, step: int, proxy: Any | None) -> dict[str, Any]:
    import jax

    n = cfg.eval.eval_samples_per_prompt
    texts, idx, kl_B = sample_policy(ctx, cfg, params, jax.random.fold_in(jax.random.PRNGKey(20_000 + ctx.seed), step), n)
    scores, valid = score_proxy(proxy, ctx, idx, texts) if proxy is not None else (None, None)
    row = {"seed": ctx.seed, "arm": arm, "step": step, **tracked(ctx, idx, texts, scores, valid, kl_B.mean()), "final": True}
    row["samples"] = texts[:: max(1, n // 2)][: 2 * len(ctx.prompt_ids)]
    return row


def run_sft_arm(ctx: SeedContext, cfg: SimConfig, log: Log, work: Path) -> list[dict[str, Any]]:
    """SFT of the base policy on great responses (all great generators) through
    rubrax.train's trainer (checkpointed under work/), evaluated like the RL arms by an
    eval hook at step 0, every `eval_every` steps and at the end."""
    from rubrax.train.optim import OptimConfig
    from rubrax.train.sft import train_sft
    from rubrax.train.trainer import TrainConfig

    t0 = time.perf_counter()
    names = sorted(ctx.great)
    per = -(-cfg.sft.great_per_prompt // len(names))
    prompts, responses = [], []
    for i, p in enumerate(ctx.world.prompts):
        for name in names:
            for r in ctx.great[name][i][:per]:
                prompts.append(p.text)
                responses.append(r)
    data = _sft_arrays(ctx.tokenizer, prompts, responses, 8 + cfg.sample.max_new_tokens)
    steps = cfg.sft.great_steps
    train_cfg = TrainConfig(
        optim=OptimConfig(learning_rate=cfg.sft.great_lr, schedule="constant", warmup_ratio=0.1),
        batch_size=cfg.sft.batch_size, num_epochs=10**6, max_steps=steps, eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, seed=ctx.seed, progress=False, log_every=steps,
    )

    def hook(step: int, params: Any) -> dict[str, float]:
        row = final_eval(ctx, cfg, "sft_great", params, step, None)
        return {k: row[k] for k in TRACKED}

    res = train_sft(ctx.base_params, ctx.model_config, data, train_cfg, eval_hooks=[hook], desc=f"sft_great s{ctx.seed}",
                    ckpt_dir=str(work / f"seed{ctx.seed}_sft_great" / "checkpoints"))
    rows = [{"seed": ctx.seed, "arm": "sft_great", "step": h["step"], **{k: h[k] for k in TRACKED}, "final": h["step"] == steps}
            for h in res.eval_history]
    log(f"[seed {ctx.seed}] {'sft_great':24s} win rate {rows[0]['win_rate']:.3f} -> {rows[-1]['win_rate']:.3f}  "
        f"gold {rows[0]['gold']:.3f} -> {rows[-1]['gold']:.3f}  KL {rows[-1]['kl']:.2f}  ({time.perf_counter() - t0:.1f}s)")
    return rows


# ----------------------------------------------------------------------------- Table 2 and theory


def agreement_rows(ctx: SeedContext, cfg: SimConfig, proxies: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Agreement of each proxy's preference with the gold preference (Table 2 analogue),
    through rubrax.eval.agreement.rubric_agreement.

    Pool per prompt: base samples, good and great responses. Pairs are drawn within the
    high-gold half (both above the pool's median gold) and within the low-gold half;
    pairs with equal gold are skipped. The gold preference is the exact gold order (the
    judge's noise would only pull every proxy toward 50%). A proxy tie earns no credit
    (the shared convention), and the tie rate is reported beside it.
    """
    from rubrax.eval.agreement import Pair, rubric_agreement

    rng = np.random.default_rng([ctx.seed, 6])
    m = cfg.eval.agreement_pairs_per_prompt
    pairs: list[Pair] = []
    names = sorted(ctx.great)
    for i, p in enumerate(ctx.world.prompts):
        k = min(len(ctx.base_samples[i]), 32)
        pool = list(ctx.base_samples[i][:k]) + list(ctx.good[i][:k // 2]) + [r for n in names for r in ctx.great[n][i][: k // (2 * len(names)) + 1]]
        gold = np.array([ctx.world.gold_reward(p.id, r) for r in pool])
        med = np.median(gold)
        for region, sel in (("high", np.flatnonzero(gold > med)), ("low", np.flatnonzero(gold <= med))):
            if len(sel) < 2:
                continue
            for _ in range(m):
                a, b = rng.choice(sel, 2, replace=False)
                if gold[a] != gold[b]:
                    pairs.append(Pair(p.id, p.text, pool[a], pool[b], "a" if gold[a] > gold[b] else "b",
                                      float(gold[a]), float(gold[b]), region=region))
    rows = []
    for arm, proxy in proxies.items():
        res = asyncio.run(rubric_agreement(proxy, pairs))
        for region in ("high", "low"):
            if region in res and res[region]["n"]:
                r = res[region]
                rows.append({"seed": ctx.seed, "arm": arm, "region": region, "agreement": float(r["agreement"]),
                             "pairs": int(r["n"]), "proxy_ties": r["ties"] / r["n"]})
    return rows


def theory_rows(ctx: SeedContext, cfg: SimConfig, proxies: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Proposition 1 on base samples: predicted win rate and KL of the tilted policy per proxy."""
    from rubrax.theory import tilted_from_samples

    n = ctx.base_gold_PxN.shape[1]
    idx = np.repeat(np.arange(len(ctx.prompt_ids)), n)
    texts = [t for rs in ctx.base_samples for t in rs]
    rows = []
    for arm, proxy in proxies.items():
        s, v = score_proxy(proxy, ctx, idx, texts)
        proxy_PxN, valid_PxN = s.reshape(-1, n), v.reshape(-1, n)
        scale = float(np.std(proxy_PxN[valid_PxN])) if valid_PxN.any() else 0.0
        if not scale > 0:
            continue
        betas = scale * np.logspace(-2.5, 1.5, cfg.eval.theory_betas)
        st = tilted_from_samples(ctx.base_gold_PxN, proxy_PxN, betas, valid=valid_PxN)
        win, kl, rew = (np.asarray(x).mean(axis=-1) for x in (st.win_rate, st.kl, st.expected_reward))
        for b, w, k, r in zip(betas, win, kl, rew):
            rows.append({"seed": ctx.seed, "arm": arm, "beta": float(b), "kl": float(k), "win_rate": float(w), "gold": float(r)})
    return rows


# ----------------------------------------------------------------------------- the whole run


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _rubric_records(rubrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"prompt_id": r.prompt_id, "prompt": r.prompt, "rubrics": [{"criterion": c.text, "weight": c.weight} for c in r.criteria]}
        for r in rubrics.values()
    ]


def run_experiment(cfg: SimConfig, out_dir: str | os.PathLike, log: Log = print) -> dict[str, Any]:
    """Runs every arm for every seed; writes per-arm JSONL under out_dir/arms (skipping
    arms already there, and resuming an interrupted one from its checkpoints under
    out_dir/runs) and returns all rows."""
    out = Path(out_dir)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    (out / "rubrics").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"curves": [], "agreement": [], "theory": [], "base": []}
    for seed in cfg.seeds:
        done = {arm: out / "arms" / f"seed{seed}_{arm}.jsonl" for arm in cfg.arms}
        extra = {name: out / "arms" / f"seed{seed}_{name}.jsonl" for name in ("agreement", "theory", "base")}
        if all(p.exists() for p in [*done.values(), *extra.values()]):
            log(f"[seed {seed}] already complete in {out}; reusing")
        else:
            _run_seed(cfg, seed, out, done, extra, log)
        for arm in cfg.arms:
            results["curves"] += _read_jsonl(done[arm])
        for name in ("agreement", "theory", "base"):
            results[name] += _read_jsonl(extra[name])
        log(f"[seed {seed}] done, {time.perf_counter() - t_start:.0f}s elapsed")
    return {**results, "elapsed_s": time.perf_counter() - t_start}


def _run_seed(cfg: SimConfig, seed: int, out: Path, done: Mapping[str, Path], extra: Mapping[str, Path], log: Log) -> None:
    """Everything of one seed that is not on disk yet; its checkpoints are removed at the end."""
    work = out / "runs"
    ctx = build_seed(cfg, seed, log, work)
    proxies, rubrics = build_proxies(ctx, cfg, log, work)
    for arm, rb in rubrics.items():
        write_jsonl(out / "rubrics" / f"seed{seed}_{arm}.jsonl", _rubric_records(rb))
    if not extra["base"].exists():
        write_jsonl(extra["base"], [_base_record(ctx)])
    if not extra["agreement"].exists():
        write_jsonl(extra["agreement"], agreement_rows(ctx, cfg, {a: p for a, p in proxies.items() if a != "gold"}))
    if not extra["theory"].exists():
        write_jsonl(extra["theory"], theory_rows(ctx, cfg, proxies))
    for arm in cfg.arms:
        if not done[arm].exists():
            rows = run_sft_arm(ctx, cfg, log, work) if arm == "sft_great" else run_rl_arm(ctx, cfg, arm, proxies[arm], log, work)
            write_jsonl(done[arm], rows)
    for ckpt in work.glob(f"seed{seed}_*/checkpoints"):  # the metrics.jsonl files stay
        shutil.rmtree(ckpt, ignore_errors=True)


def _base_record(ctx: SeedContext) -> dict[str, Any]:
    met = [[ctx.world.gold_breakdown(p.id, r).met for r in rs] for p, rs in zip(ctx.world.prompts, ctx.base_samples)]
    return {
        "seed": ctx.seed, "gold_mean": float(ctx.base_gold_PxN.mean()),
        "excellent_any": float(np.mean([[m["excellent"] > 0 for m in ms] for ms in met])),
        "advanced_frac": float(np.mean([[m["advanced"] for m in ms] for ms in met])),
        "samples": [rs[:3] for rs in ctx.base_samples], **ctx.timings,
    }

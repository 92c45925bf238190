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
 5. each RL arm: GRPO (rubrax.rl.step) from the base policy for `rl.steps` steps, all
    prompts x `group_size` rollouts per step, identical settings. Tracked per step,
    on the step's own rollouts (samples of the current policy, before its update):
      gold      mean r*(x, y)
      win_rate  mean F0_x(r*(x, y)) with F0_x the base policy's empirical gold CDF on
                prompt x, ties counted half: P(y beats a base sample) -- exactly the
                quantity Proposition 1 predicts (rubrax.theory.tilted_from_samples)
      proxy     mean proxy reward
      kl        mean over rollouts of sum_t [log pi(y_t|.) - log pi_base(y_t|.)]
                (the k1 Monte-Carlo estimate of KL(pi || pi_base) per response)
    plus a final evaluation on `eval_samples_per_prompt` fresh samples after the last
    update. The SFT arm is evaluated the same way every `eval_every` steps.
 6. Table 2 analogue: agreement of each proxy's preference with the gold preference
    on response pairs from the high-gold and the low-gold half of a mixed pool.
 7. theory link: tilted_from_samples(gold, proxy, beta) on the base samples predicts
    win rate against KL for every proxy.

Outputs are written as each piece finishes (arms/*.jsonl, rubrics, pairs), so a
crashed run rerun with the same output folder skips what is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
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
    prompt_tokens_PxL: np.ndarray
    prompt_mask_PxL: np.ndarray
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


def sample_config(cfg: SimConfig, tokenizer: WordTokenizer, n: int):
    from rubrax.policy import SampleConfig

    return SampleConfig(
        max_new_tokens=cfg.rl.max_new_tokens,
        temperature=cfg.rl.temperature,
        n=n,
        stop_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        prompt_bucket=8,  # world prompts are 6 tokens; the default bucket (32) would waste 4x
    )


@dataclasses.dataclass
class Rollouts:
    texts: list[str]
    prompt_index: np.ndarray  # [B]
    tokens_BxC: np.ndarray
    mask_BxC: np.ndarray
    logp_BxC: np.ndarray
    kl_B: np.ndarray  # sum_t log pi(y_t) - log pi_base(y_t) per response (k1)


def sample_policy(ctx: SeedContext, cfg: SimConfig, params: Any, key: Any, n: int) -> Rollouts:
    """n samples per prompt (prompt-major rows), drawn in chunks of rl.group_size so that
    every call has the rollout shape: one sampler and one logprob compilation in all."""
    import jax

    from rubrax.policy import sample

    g = cfg.rl.group_size
    if n % g:
        raise ValueError(f"sample_policy: n={n} must be a multiple of rl.group_size={g}")
    P = len(ctx.prompt_ids)
    scfg = sample_config(cfg, ctx.tokenizer, g)
    chunks = []
    for c in range(n // g):
        out = sample(params, ctx.prompt_tokens_PxL, ctx.prompt_mask_PxL, jax.random.fold_in(key, c), scfg, config=ctx.model_config)
        tokens, mask, logp = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
        chunks.append((tokens, mask, logp, _kl_to_base(ctx, g, tokens, mask, logp)))

    def merge(k: int) -> np.ndarray:  # [chunks][P*g, ...] -> [P*n, ...], prompt-major
        x = np.stack([ch[k] for ch in chunks])
        x = x.reshape(len(chunks), P, g, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(P * n, *x.shape[3:])

    tokens = merge(0)
    texts = [ctx.tokenizer.decode_completion(row) for row in tokens]
    return Rollouts(texts, np.repeat(np.arange(P), n), tokens, merge(1), merge(2), merge(3))


@functools.lru_cache(maxsize=8)
def _ref_logprob_fn(model_config: Any):
    import jax

    from rubrax.policy import logprobs

    return jax.jit(functools.partial(logprobs, config=model_config))


def _kl_to_base(ctx: SeedContext, n: int, tokens_BxC: np.ndarray, mask_BxC: np.ndarray, logp_BxC: np.ndarray) -> np.ndarray:
    """Per-response k1 estimate sum_t (log pi(y_t) - log pi_base(y_t)), from the sampler's logprobs."""
    prompt = np.repeat(ctx.prompt_tokens_PxL, n, axis=0)
    pmask = np.repeat(ctx.prompt_mask_PxL, n, axis=0)
    tokens = np.concatenate([prompt, tokens_BxC], axis=1).astype(np.int32)
    mask = np.concatenate([pmask, mask_BxC], axis=1).astype(np.int32)
    ref = np.asarray(_ref_logprob_fn(ctx.model_config)(ctx.base_params, tokens, mask))[:, prompt.shape[1]:]
    return ((logp_BxC - ref) * mask_BxC.astype(np.float64)).sum(axis=1)


def _sft_arrays(tokenizer: WordTokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    from rubrax.data.sft import SFTExample, encode_sft

    examples = [SFTExample(p, r) for p, r in zip(prompts, responses)]
    return encode_sft(tokenizer, examples, max_length=max_length, pad_to=max_length)


# ----------------------------------------------------------------------------- per-seed set-up


def build_seed(cfg: SimConfig, seed: int, log: Log) -> SeedContext:
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
    max_len = 8 + cfg.rl.max_new_tokens

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
    res = train_sft(params0, mcfg, data, train_cfg, desc=f"base sft s{seed}")
    base_params = res.params
    timings["base_sft_s"] = time.perf_counter() - t0
    log(f"[seed {seed}] base policy: SFT {cfg.sft.steps} steps on {len(demos_r)} demonstrations, "
        f"final loss {res.last_metrics.get('loss', float('nan')):.3f} ({timings['base_sft_s']:.1f}s)")

    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p.text}]) for p in world.prompts]
    width = max(len(x) for x in prompt_ids)
    ptoks = np.full((len(prompt_ids), width), tok.pad_token_id, np.int32)
    pmask = np.zeros((len(prompt_ids), width), np.int32)
    for i, ids in enumerate(prompt_ids):  # left padding
        ptoks[i, width - len(ids):] = ids
        pmask[i, width - len(ids):] = 1

    ctx = SeedContext(
        seed=seed, world=world, tokenizer=tok, model_config=mcfg, base_params=base_params,
        prompt_tokens_PxL=ptoks, prompt_mask_PxL=pmask, base_samples=[], base_gold_PxN=np.zeros((0, 0)),
        base_sorted_PxN=np.zeros((0, 0)), good=[], great={}, timings=timings,
    )
    t1 = time.perf_counter()
    n = cfg.eval.base_samples_per_prompt
    ro = sample_policy(ctx, cfg, base_params, jax.random.fold_in(jax.random.PRNGKey(seed), 10**6), n)
    ctx.base_samples = [ro.texts[i * n:(i + 1) * n] for i in range(len(world.prompts))]
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


def train_bt(ctx: SeedContext, cfg: SimConfig, arm: str, log: Log) -> Any:
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
    max_len = 8 + cfg.rl.max_new_tokens
    data = pairs_lib.encode_pairs(ctx.tokenizer, ps.pairs, max_length=max_len, pad_to=max_len)
    params = bt.init_params(ctx.model_config, jax.random.PRNGKey(ctx.seed + 7), backbone=ctx.base_params)
    steps = max(1, cfg.bt.epochs * (len(ps.pairs) // cfg.bt.batch_size))
    train_cfg = TrainConfig(
        optim=OptimConfig(learning_rate=cfg.bt.lr, schedule="cosine", warmup_ratio=0.1),
        batch_size=cfg.bt.batch_size, num_epochs=cfg.bt.epochs, seed=ctx.seed, progress=False, log_every=steps,
    )
    res = bt.train_reward_model(params, ctx.model_config, data, train_cfg, desc=f"{arm} s{ctx.seed}")
    reward = bt.BTReward(res.params, ctx.model_config, ctx.tokenizer, max_length=max_len, batch_size=64, length_multiple=max_len)
    ctx.timings[f"{arm}_train_s"] = time.perf_counter() - t0
    log(f"[seed {ctx.seed}] {arm}: {len(ps.pairs)} pairs, {steps} steps, train loss "
        f"{res.last_metrics.get('loss', float('nan')):.3f} ({ctx.timings[f'{arm}_train_s']:.1f}s)")
    return reward


def build_proxies(ctx: SeedContext, cfg: SimConfig, log: Log) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """{arm: reward function} for every RL arm in cfg.arms, and the rubrics per rubric arm."""
    from rubrax.rewards.rubric import RubricReward

    proxies: dict[str, Any] = {}
    rubrics: dict[str, dict[str, Any]] = {}
    if "gold" in cfg.arms:
        proxies["gold"] = GoldReward(ctx.world)
    for arm in BT_ARMS:
        if arm in cfg.arms:
            proxies[arm] = train_bt(ctx, cfg, arm, log)
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


class RLRunner:
    """One compiled GRPO update shared by every arm and seed (same shapes, same settings)."""

    def __init__(self, cfg: SimConfig, model_config: Any, params: Any):
        import jax
        import optax

        from rubrax.rl.state import TrainState
        from rubrax.rl.step import RLConfig, Trainer, model_logits_fn
        from rubrax.sharding import make_mesh

        self.cfg = cfg
        self.rl_cfg = RLConfig(group_size=cfg.rl.group_size, kl_coef=cfg.rl.kl_coef, temperature=cfg.rl.temperature)
        warmup = max(1, int(0.1 * cfg.rl.steps))
        schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.rl.lr, warmup), optax.constant_schedule(cfg.rl.lr)], [warmup])
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
        self.logits_fn = model_logits_fn(model_config)
        state = TrainState.create(params, self.tx, seed=0)
        # One device: the experiment's batches are tiny, and sharding them over fake CPU
        # devices (the test set-up) only adds overhead.
        self.trainer = Trainer(self.rl_cfg, self.logits_fn, self.tx, state, params, mesh=make_mesh(jax.devices()[:1]))
        self._TrainState = TrainState

    def new_state(self, params: Any, seed: int):
        import jax
        import jax.numpy as jnp

        params = jax.tree.map(jnp.copy, params)  # the update donates its state
        return self.trainer.place_state(self._TrainState.create(params, self.tx, seed=seed))


def _step_row(ctx: SeedContext, arm: str, step: int, ro: Rollouts, gold: np.ndarray, proxy: np.ndarray | None,
              proxy_valid: np.ndarray | None, kl: np.ndarray) -> dict[str, Any]:
    win = ctx.win_rate(ro.prompt_index, gold)
    row = {
        "seed": ctx.seed, "arm": arm, "step": step, "gold": float(gold.mean()), "win_rate": float(win.mean()),
        "win_rate_se": float(win.std(ddof=1) / np.sqrt(len(win))) if len(win) > 1 else 0.0,
        "kl": float(kl.mean()), "length": float(np.mean([len(t.split()) for t in ro.texts])),
        "proxy": float("nan"), "proxy_invalid": 0,
    }
    if proxy is not None:
        ok = proxy_valid.astype(bool)
        row["proxy"] = float(proxy[ok].mean()) if ok.any() else float("nan")
        row["proxy_invalid"] = int((~ok).sum())
    return row


def run_rl_arm(ctx: SeedContext, cfg: SimConfig, runner: RLRunner, arm: str, proxy: Any, log: Log) -> list[dict[str, Any]]:
    import jax

    from rubrax.rl.batch import make_batch

    g = cfg.rl.group_size
    state = runner.new_state(ctx.base_params, seed=ctx.seed)
    ref = runner.trainer.place_ref(ctx.base_params)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    root = jax.random.PRNGKey(10_000 + ctx.seed)
    for step in range(cfg.rl.steps):
        ro = sample_policy(ctx, cfg, state.params, jax.random.fold_in(root, step), g)
        gold = ctx.world.gold_rewards([ctx.prompt_ids[i] for i in ro.prompt_index], ro.texts)
        scores, valid = score_proxy(proxy, ctx, ro.prompt_index, ro.texts)
        rows.append(_step_row(ctx, arm, step, ro, gold, scores, valid, ro.kl_B))
        batch = make_batch(ctx.prompt_tokens_PxL, ctx.prompt_mask_PxL, ro.tokens_BxC, ro.mask_BxC, ro.logp_BxC, scores, valid, group_size=g)
        state, _ = runner.trainer(state, batch, ref)
    rows.append(final_eval(ctx, cfg, arm, state.params, cfg.rl.steps, proxy))
    for r in rows:
        r["elapsed_s"] = time.perf_counter() - t0
    log(f"[seed {ctx.seed}] {arm:24s} win rate {rows[0]['win_rate']:.3f} -> {rows[-1]['win_rate']:.3f}  "
        f"gold {rows[0]['gold']:.3f} -> {rows[-1]['gold']:.3f}  proxy {rows[0]['proxy']:.3f} -> {rows[-1]['proxy']:.3f}  "
        f"KL {rows[-1]['kl']:.2f}  ({time.perf_counter() - t0:.1f}s)")
    return rows


def final_eval(ctx: SeedContext, cfg: SimConfig, arm: str, params: Any, step: int, proxy: Any | None) -> dict[str, Any]:
    import jax

    n = cfg.eval.eval_samples_per_prompt
    ro = sample_policy(ctx, cfg, params, jax.random.fold_in(jax.random.PRNGKey(20_000 + ctx.seed), step), n)
    gold = ctx.world.gold_rewards([ctx.prompt_ids[i] for i in ro.prompt_index], ro.texts)
    scores, valid = score_proxy(proxy, ctx, ro.prompt_index, ro.texts) if proxy is not None else (None, None)
    row = _step_row(ctx, arm, step, ro, gold, scores, valid, ro.kl_B)
    row["final"] = True
    row["samples"] = ro.texts[:: max(1, n // 2)][: 2 * len(ctx.prompt_ids)]
    return row


def run_sft_arm(ctx: SeedContext, cfg: SimConfig, log: Log) -> list[dict[str, Any]]:
    """SFT of the base policy on great responses (all great generators), evaluated like RL arms."""
    import jax
    import jax.numpy as jnp

    from rubrax.train.optim import OptimConfig, make_optimizer
    from rubrax.train.sft import sft_loss
    from rubrax.train.trainer import init_state, make_train_step

    t0 = time.perf_counter()
    names = sorted(ctx.great)
    per = -(-cfg.sft.great_per_prompt // len(names))
    prompts, responses = [], []
    for i, p in enumerate(ctx.world.prompts):
        for name in names:
            for r in ctx.great[name][i][:per]:
                prompts.append(p.text)
                responses.append(r)
    data = _sft_arrays(ctx.tokenizer, prompts, responses, 8 + cfg.rl.max_new_tokens)
    steps = cfg.sft.great_steps
    tx = make_optimizer(OptimConfig(learning_rate=cfg.sft.great_lr, schedule="constant", warmup_ratio=0.1), steps)
    step_fn = make_train_step(functools.partial(sft_loss, config=ctx.model_config), tx)
    state = init_state(jax.tree.map(jnp.copy, ctx.base_params), tx)
    rng = np.random.default_rng([ctx.seed, 5])
    nex, bs = len(responses), cfg.sft.batch_size
    order = np.concatenate([rng.permutation(nex) for _ in range(steps * bs // nex + 1)])
    rows = [final_eval(ctx, cfg, "sft_great", state.params, 0, None)]
    for step in range(steps):
        idx = order[step * bs:(step + 1) * bs]
        state, _ = step_fn(state, {k: v[idx][None] for k, v in data.items()})
        if (step + 1) % cfg.rl.eval_every == 0 or step + 1 == steps:
            rows.append(final_eval(ctx, cfg, "sft_great", state.params, step + 1, None))
    for r in rows:
        r["final"] = r["step"] == steps
        r["elapsed_s"] = time.perf_counter() - t0
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
    arms already there, so a crashed run resumes) and returns all rows."""
    out = Path(out_dir)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    (out / "rubrics").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    curves: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    theory: list[dict[str, Any]] = []
    base_stats: list[dict[str, Any]] = []
    runner: RLRunner | None = None
    for seed in cfg.seeds:
        done = {arm: out / "arms" / f"seed{seed}_{arm}.jsonl" for arm in cfg.arms}
        extra = {name: out / "arms" / f"seed{seed}_{name}.jsonl" for name in ("agreement", "theory", "base")}
        if all(p.exists() for p in [*done.values(), *extra.values()]):
            log(f"[seed {seed}] already complete in {out}; reusing")
        else:
            ctx = build_seed(cfg, seed, log)
            proxies, rubrics = build_proxies(ctx, cfg, log)
            for arm, rb in rubrics.items():
                write_jsonl(out / "rubrics" / f"seed{seed}_{arm}.jsonl", _rubric_records(rb))
            if not extra["base"].exists():
                write_jsonl(extra["base"], [{
                    "seed": seed, "gold_mean": float(ctx.base_gold_PxN.mean()),
                    "excellent_any": float(np.mean([[ctx.world.gold_breakdown(p.id, r).met["excellent"] > 0 for r in rs] for p, rs in zip(ctx.world.prompts, ctx.base_samples)])),
                    "advanced_frac": float(np.mean([[ctx.world.gold_breakdown(p.id, r).met["advanced"] for r in rs] for p, rs in zip(ctx.world.prompts, ctx.base_samples)])),
                    "samples": [rs[:3] for rs in ctx.base_samples], **ctx.timings,
                }])
            if not extra["agreement"].exists():
                write_jsonl(extra["agreement"], agreement_rows(ctx, cfg, {a: p for a, p in proxies.items() if a != "gold"}))
            if not extra["theory"].exists():
                write_jsonl(extra["theory"], theory_rows(ctx, cfg, proxies))
            for arm in cfg.arms:
                if done[arm].exists():
                    continue
                if arm == "sft_great":
                    rows = run_sft_arm(ctx, cfg, log)
                else:
                    if runner is None:
                        runner = RLRunner(cfg, ctx.model_config, ctx.base_params)
                    rows = run_rl_arm(ctx, cfg, runner, arm, proxies[arm], log)
                write_jsonl(done[arm], rows)
        for arm in cfg.arms:
            curves += _read_jsonl(done[arm])
        agreement += _read_jsonl(extra["agreement"])
        theory += _read_jsonl(extra["theory"])
        base_stats += _read_jsonl(extra["base"])
        log(f"[seed {seed}] done, {time.perf_counter() - t_start:.0f}s elapsed")
    return {"curves": curves, "agreement": agreement, "theory": theory, "base": base_stats,
            "elapsed_s": time.perf_counter() - t_start}

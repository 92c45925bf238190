"""The experiment's stages, each a function of the run context writing under the run folder.

Every stage is resumable on its own (its outputs are written item by item and a rerun
does only what is missing; endpoint calls are cached in <run>/cache, so a call completed
before a crash is never sent again) and returns a `StageResult`: the clients it used (for
the cost ledger) and a few figures. Layout of a run folder:

    pools/<pool>.jsonl                       candidate responses (rubrax generate format)
    rubrics/initial.jsonl                    initial rubrics (prompt only)
    rubrics/<arm>.jsonl, .lineage.jsonl      RTD-refined rubrics of each arm with a pool
    runs/<arm>/                              GRPO run (checkpoints/, metrics.jsonl)
    policies/<arm>/                          the exported HF folder
    responses/base.jsonl, responses/<arm>.jsonl   held-out responses (greedy by default)
    winrate/<arm>.jsonl, winrate/summary.json     judge outcomes in both orders, win rates
    healthbench/<arm>.jsonl, healthbench/summary.json   (when a HealthBench rubric set is given)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rubrax.data.rubrics import RubricFormatError
from rubrax.pipeline.config import ExperimentConfig


class StageError(RuntimeError):
    """A stage that could not complete (failed calls, missing outputs); a rerun resumes it."""


@dataclasses.dataclass
class StageResult:
    clients: list[Any] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
    """The run: its config, folder, and every endpoint client the current stage made (so
    that a stage that fails still has its calls and cost counted)."""

    cfg: ExperimentConfig
    out: Path
    progress: bool = False
    clients: list[Any] = dataclasses.field(default_factory=list)

    @property
    def cache_dir(self) -> str:
        return os.fspath(self.out / "cache")

    def path(self, *parts: str) -> Path:
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def client(self, endpoint: Any) -> Any:
        from rubrax.elicit.client import ChatClient

        client = ChatClient(endpoint.client_config(self.cache_dir))
        self.clients.append(client)
        return client

    def rubric_path(self, arm: Any) -> Path:
        return self.path("rubrics", "initial.jsonl" if arm.pool is None or arm.pairs == 0 else f"{arm.name}.jsonl")


def _close(clients: Sequence[Any]) -> None:
    async def close_all() -> None:
        for c in clients:
            await c.aclose()

    asyncio.run(close_all())


def _train_prompts(ctx: Context) -> list[tuple[str, str]]:
    from rubrax.data.rubrics import read_prompts

    return read_prompts(ctx.cfg.train_prompts)


def _test_prompts(ctx: Context) -> list[tuple[str, str]]:
    from rubrax.data.rubrics import read_prompts

    return read_prompts(ctx.cfg.test_prompts)


# --------------------------------------------------------------------------- pools


def pool_path(ctx: Context, name: str) -> Path:
    pool = ctx.cfg.pools[name]
    return Path(pool.file) if pool.file else ctx.path("pools", f"{name}.jsonl")


def read_pool(ctx: Context, name: str, prompt_ids: Sequence[str]) -> dict[str, list[Any]]:
    """{prompt_id: [Candidate]} of a pool, the first rtd.pool_size per prompt; every prompt
    needs at least one pair (errors name the file, the line and the field)."""
    from rubrax.data.rubrics import iter_jsonl, parse_response
    from rubrax.elicit.rtd import Candidate

    path = os.fspath(pool_path(ctx, name))
    pools: dict[str, list[Any]] = {}
    lines: dict[str, int] = {}
    seen: dict[tuple[str, str], int] = {}
    for line, rec in iter_jsonl(path):
        r = parse_response(rec, source=path, line=line)
        if r.key in seen:
            raise RubricFormatError(path, line, "response_id", f"duplicate (prompt_id, response_id) {r.key} (first on line {seen[r.key]})")
        seen[r.key] = line
        lines.setdefault(r.prompt_id, line)
        pools.setdefault(r.prompt_id, []).append(Candidate(r.response_id, r.response, r.source_model))
    for pid in prompt_ids:
        n = len(pools.get(pid, ()))
        if n < 2:
            raise RubricFormatError(path, lines.get(pid), "prompt_id", f"pool {name!r} has {n} response(s) for prompt_id {pid!r}; a pair needs 2")
    return {pid: pools[pid][: ctx.cfg.pool_size] for pid in prompt_ids}


def _used_pools(cfg: ExperimentConfig) -> list[str]:
    return list(dict.fromkeys(a.pool for a in cfg.arms if a.pool is not None and a.pairs > 0))


def stage_pools(ctx: Context) -> StageResult:
    """Candidate responses of every pool's source models to the train prompts."""
    from rubrax.generate import GenerateConfig, generate_from_endpoints

    prompts = _train_prompts(ctx)
    s = ctx.cfg.sampling
    gen = GenerateConfig(temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_tokens"])
    result = StageResult()
    for name, pool in ctx.cfg.pools.items():
        if pool.file:
            continue
        clients = [ctx.client(ep) for ep, _ in pool.sources]
        result.clients += clients

        async def run(clients=clients, pool=pool, name=name) -> Any:
            return await generate_from_endpoints(prompts, clients, pool_path(ctx, name), gen, workers=2 * sum(c.config.concurrency for c in clients),
                                                 progress=ctx.progress, n_per_client=[n for _, n in pool.sources])

        try:
            summary = asyncio.run(run())
        finally:
            _close(clients)
        result.info[name] = summary.line()
        if summary.done < summary.items:
            raise StageError(f"pools: {summary.items - summary.done} responses of pool {name!r} failed; rerun to retry them")
    for name in _used_pools(ctx.cfg):
        read_pool(ctx, name, [pid for pid, _ in prompts])  # every prompt has a pair
    return result


# --------------------------------------------------------------------------- rubrics


def stage_rubrics(ctx: Context) -> StageResult:
    """Initial rubrics from the prompts alone (the proposer, temperature 0 by default)."""
    from rubrax.elicit.llm import LLMProposer
    from rubrax.elicit.pipeline import propose_rubrics

    prompts = _train_prompts(ctx)
    client = ctx.client(ctx.cfg.proposer)
    proposer = LLMProposer(client, temperature=ctx.cfg.proposer_temperature, max_tokens=ctx.cfg.proposer_max_tokens)
    try:
        summary = asyncio.run(propose_rubrics(prompts, proposer, ctx.path("rubrics", "initial.jsonl"), workers=2 * client.config.concurrency,
                                              progress=ctx.progress))
    finally:
        _close([client])
    if summary.done < summary.items:
        reasons = "; ".join(f"{pid}: {why}" for pid, why in proposer.failures[:3])
        raise StageError(f"rubrics: {summary.items - summary.done} of {summary.items} proposals failed ({reasons}); rerun to retry them")
    return StageResult([client], {"rubrics": summary.line(), "warnings": len(proposer.warnings)})


def stage_rtd(ctx: Context) -> StageResult:
    """Each arm with a pool: `pairs` rounds of RTD from the initial rubric (used pairs dropped)."""
    from rubrax.data.rubrics import load_rubrics
    from rubrax.elicit.llm import LLMProposer, LLMVerifier
    from rubrax.elicit.pipeline import refine_rubrics

    cfg = ctx.cfg
    initial = load_rubrics(ctx.path("rubrics", "initial.jsonl"))
    pids = [pid for pid, _ in _train_prompts(ctx)]
    missing = [pid for pid in pids if pid not in initial]
    if missing:
        raise StageError(f"rtd: no initial rubric for prompt_id {missing[:5]}; rerun the rubrics stage")
    pclient, vclient = ctx.client(cfg.proposer), ctx.client(cfg.verifier)
    proposer = LLMProposer(pclient, temperature=cfg.proposer_temperature, max_tokens=cfg.proposer_max_tokens)
    verifier = LLMVerifier(vclient, mode=cfg.verifier_mode)
    result = StageResult([pclient, vclient])
    try:
        for arm in cfg.arms:
            if arm.pool is None or arm.pairs == 0:
                continue
            pools = read_pool(ctx, arm.pool, pids)
            out = ctx.rubric_path(arm)
            summary = asyncio.run(refine_rubrics(
                initial, pools, proposer, verifier, out, out.with_suffix(".lineage.jsonl"), rounds=arm.pairs, drop_used=cfg.drop_used,
                seed=cfg.rtd_seed, workers=max(1, vclient.config.concurrency // 4), progress=ctx.progress,
            ))
            result.info[arm.name] = summary.line()
    finally:
        _close([pclient, vclient])
    return result


# --------------------------------------------------------------------------- GRPO, export


def grpo_recipe(ctx: Context, arm: Any) -> Any:
    """The `rubrax rl train` recipe of one arm: the config's "grpo" with the train prompts and
    the arm's rubric reward (the verifier through the run's cache)."""
    from rubrax.rl.recipe import parse_recipe

    cfg = ctx.cfg
    verifier = {"model": cfg.verifier.model, **dict(cfg.verifier.client), "cache_dir": ctx.cache_dir, "mode": cfg.verifier_mode}
    if verifier.get("price_per_mtok") is not None:
        verifier["price_per_mtok"] = tuple(verifier["price_per_mtok"])
    reward = {"name": "rubric", "kwargs": {"rubrics": os.fspath(ctx.rubric_path(arm)), "mode": "weighted_mean", "verifier": verifier}}
    return parse_recipe({**cfg.grpo, "train": cfg.train_prompts, "reward": reward}, f"{cfg.source}: grpo")


def _curve_hooks(ctx: Context, recipe: Any, judge: Any) -> Any:
    """make_hooks for run_recipe: the held-out win rate against the base's responses every
    eval.curve_every steps (logged as eval/win_rate in the run's metrics.jsonl)."""
    from rubrax.data.rubrics import read_responses

    e = ctx.cfg.eval
    refs = {r.prompt_id: r.response for r in read_responses(base_responses(ctx))}
    records = [{"prompt_id": pid, "prompt": p} for pid, p in _test_prompts(ctx)]
    width = int(recipe.loop.get("max_prompt_tokens", 512))

    def make(tokenizer: Any, model_config: Any) -> list[Any]:
        from rubrax.policy import SampleConfig
        from rubrax.rl.hooks import winrate_eval_hook
        from rubrax.rl.prompts import load_prompts

        prompts = load_prompts(records, tokenizer, max_prompt_tokens=width, chat_template=True)
        if prompts.skipped:
            raise StageError(f"grpo: {prompts.skipped} test prompts are longer than grpo.loop.max_prompt_tokens={width}")
        sample = SampleConfig(max_new_tokens=e["max_tokens"], temperature=e["temperature"], top_p=e["top_p"], n=1,
                              prompt_bucket=recipe.sample.prompt_bucket)
        references = [refs[str(pid)] for pid in prompts.columns["prompt_id"]]
        return [winrate_eval_hook(prompts, references, judge, tokenizer, model_config, sample, max_prompt_tokens=width,
                                  both_orders=e["both_orders"], seed=e["seed"], batch_size=e["batch_prompts"])]

    return make


def stage_grpo(ctx: Context) -> StageResult:
    """GRPO of the base policy with each arm's rubric reward (resumes from checkpoints);
    with eval.curve_every, the held-out win rate against the base along the way."""
    from rubrax.elicit.llm import LLMJudge
    from rubrax.rl.recipe import build_reward, run_recipe

    result = StageResult()
    every = ctx.cfg.eval["curve_every"]
    for arm in ctx.cfg.arms:
        run_dir = ctx.path("runs", arm.name, ".")
        done = run_dir / "done.json"
        if done.exists():
            result.info[arm.name] = json.loads(done.read_text())
            continue
        recipe = grpo_recipe(ctx, arm)
        reward = build_reward(recipe.reward)
        ctx.clients.append(reward.verifier.client)
        judge_client = ctx.client(ctx.cfg.judge) if every else None
        hooks = _curve_hooks(ctx, recipe, LLMJudge(judge_client, seed=ctx.cfg.eval["seed"])) if every else None
        try:  # the loop closes the reward; the judge's loops (one per evaluation) have ended
            out = run_recipe(recipe, out_dir=os.fspath(run_dir), progress=ctx.progress, reward_fn=reward, make_hooks=hooks,
                             **({"eval_every": every} if every else {}))
        finally:
            if judge_client is not None:
                judge_client.close()
        result.clients += [reward.verifier.client] + ([judge_client] if judge_client is not None else [])
        final = {k: v for k, v in out.history[-1].items() if k in ("step", "reward_mean", "kl", "reward_invalid")} if out.history else {}
        done.write_text(json.dumps({"steps": int(out.state.step), **final}) + "\n")
        result.info[arm.name] = json.loads(done.read_text())
    return result


def stage_export(ctx: Context) -> StageResult:
    """Each arm's final policy as an HF folder (policies/<arm>)."""
    from rubrax.rl.export import export_run

    result = StageResult()
    for arm in ctx.cfg.arms:
        target = ctx.path("policies", arm.name)
        if not (target / "rubrax_export.json").exists():
            export_run(ctx.path("runs", arm.name), target)
        result.info[arm.name] = json.loads((target / "rubrax_export.json").read_text())["step"]
    return result


# --------------------------------------------------------------------------- evaluation


def base_policy_dir(ctx: Context) -> str:
    from rubrax.rl.export import base_model_dir

    return os.fspath(base_model_dir(ctx.cfg.grpo["model"]))


def _policy_responses(ctx: Context, name: str, folder: str) -> Any:
    from rubrax.generate import GenerateConfig, generate_from_policy, load_local_policy

    e = ctx.cfg.eval
    gen = GenerateConfig(temperature=e["temperature"], top_p=e["top_p"], max_tokens=e["max_tokens"])
    return generate_from_policy(_test_prompts(ctx), load_local_policy(folder, name=name), ctx.path("responses", f"{name}.jsonl"), gen,
                                batch_prompts=e["batch_prompts"], seed=e["seed"], progress=ctx.progress,
                                num_devices=ctx.cfg.grpo.get("loop", {}).get("num_devices"))  # the devices the RL runs use


def base_responses(ctx: Context) -> Path:
    """responses/base.jsonl (made once: by the grpo stage when it draws win-rate curves, else here)."""
    path = ctx.path("responses", "base.jsonl")
    _policy_responses(ctx, "base", base_policy_dir(ctx))  # resumable: nothing to do when complete
    return path


def stage_responses(ctx: Context) -> StageResult:
    """Held-out responses of the base policy and of every arm (decoding settings of "eval")."""
    base_responses(ctx)
    result = StageResult(info={"base": "done"})
    for arm in ctx.cfg.arms:
        result.info[arm.name] = _policy_responses(ctx, arm.name, os.fspath(ctx.path("policies", arm.name))).line()
    return result


async def _judge_arm(judge: Any, responses: Sequence[Any], refs: Mapping[str, Any], out: Path, both_orders: bool, workers: int) -> dict[str, Any]:
    from rubrax.elicit.pipeline import ResumableJsonl, run_workers

    sink = ResumableJsonl(out, key=lambda rec: str(rec["prompt_id"]))
    todo = [r for r in responses if r.prompt_id not in sink.done or sink.done[r.prompt_id]["outcome"] is None]

    async def one(r: Any) -> None:
        ref = refs[r.prompt_id]
        key = f"{r.prompt_id}/{r.response_id}/{ref.response_id}"
        orders = (False, True) if both_orders else (None,)
        prefs = await asyncio.gather(*(judge.compare(r.prompt, r.response, ref.response, key=key, swap=s) for s in orders))
        ok = None not in prefs
        sink.add({"prompt_id": r.prompt_id, "response_id": r.response_id, "reference_id": ref.response_id, "prefs": list(prefs),
                  "outcome": sum(p == "a" for p in prefs) / len(prefs) if ok else None})

    await run_workers(todo, one, workers)
    sink.finalize([r.prompt_id for r in responses])
    return sink.done


def stage_winrate(ctx: Context) -> StageResult:
    """Each arm against the base with the pairwise judge: bootstrap CI, position-flip rate."""
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.llm import LLMJudge
    from rubrax.eval.winrate import win_rate

    e = ctx.cfg.eval
    refs = {r.prompt_id: r for r in read_responses(ctx.path("responses", "base.jsonl"))}
    client = ctx.client(ctx.cfg.judge)
    judge = LLMJudge(client, seed=e["seed"])
    summary = {}
    try:
        for arm in ctx.cfg.arms:
            responses = read_responses(ctx.path("responses", f"{arm.name}.jsonl"))
            done = asyncio.run(_judge_arm(judge, responses, refs, ctx.path("winrate", f"{arm.name}.jsonl"), e["both_orders"],
                                          2 * client.config.concurrency))
            recs = [done[r.prompt_id] for r in responses]
            wr = win_rate([r["outcome"] for r in recs], n_boot=e["bootstrap"], seed=e["seed"])
            pairs = [r["prefs"] for r in recs if len(r["prefs"]) == 2 and None not in r["prefs"]]
            flip = sum(a != b for a, b in pairs) / len(pairs) if pairs else None
            summary[arm.name] = {**dataclasses.asdict(wr), "flip_rate": flip}
    finally:
        _close([client])
    ctx.path("winrate", "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if any(s["failed"] for s in summary.values()):
        raise StageError(f"winrate: some judgements failed ({ {k: s['failed'] for k, s in summary.items()} }); rerun to retry them")
    return StageResult([client], summary)


def stage_healthbench(ctx: Context) -> StageResult:
    """HealthBench-style score (per-criterion grading, signed points) when a rubric set is given."""
    from rubrax.data.rubrics import load_rubrics, read_responses
    from rubrax.elicit.llm import LLMVerifier
    from rubrax.elicit.pipeline import grade_responses

    if ctx.cfg.healthbench is None:
        return StageResult(info={"skipped": "no healthbench rubric set in the config"})
    rubrics = load_rubrics(ctx.cfg.healthbench, scale="points")
    test_ids = {pid for pid, _ in _test_prompts(ctx)}
    missing = sorted(test_ids - set(rubrics))
    if missing:
        raise RubricFormatError(ctx.cfg.healthbench, None, "prompt_id", f"no rubric for test prompt_id {missing[:5]}")
    client = ctx.client(ctx.cfg.verifier)
    verifier = LLMVerifier(client, mode="per_criterion")
    summary = {}
    try:
        for name in ["base"] + [a.name for a in ctx.cfg.arms]:
            out = ctx.path("healthbench", f"{name}.jsonl")
            asyncio.run(grade_responses(read_responses(ctx.path("responses", f"{name}.jsonl")), rubrics, verifier, out, mode="healthbench",
                                        workers=2 * client.config.concurrency, progress=ctx.progress))
            scores = [json.loads(x)["score"] for x in open(out)]
            valid = [s for s in scores if s is not None]
            summary[name] = {"score": sum(valid) / len(valid) if valid else None, "n": len(valid), "invalid": len(scores) - len(valid)}
    finally:
        _close([client])
    ctx.path("healthbench", "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return StageResult([client], summary)


def stage_report(ctx: Context) -> StageResult:
    from rubrax.pipeline.report import write_report

    path = write_report(ctx)
    print(f"report: {path}", file=sys.stderr)
    return StageResult(info={"report": os.fspath(path.relative_to(ctx.out))})  # relative: a moved run folder stays valid


STAGE_FNS = {
    "pools": stage_pools, "rubrics": stage_rubrics, "rtd": stage_rtd, "grpo": stage_grpo, "export": stage_export,
    "responses": stage_responses, "winrate": stage_winrate, "healthbench": stage_healthbench, "report": stage_report,
}

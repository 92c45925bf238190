"""`--dry-run`: each stage's number of endpoint calls (and RL steps) from the config alone.

Counts, for P train prompts and Q test prompts:
- pools: P x (sum of the sources' n), per pool made from endpoints;
- rubrics: P proposer calls;
- rtd: per pool, P x sum over rounds t < T of (min(pool_size, pool) - 2t verifier calls
  + 1 proposer call), T the most rounds any arm takes from that pool: arms on the same pool
  share their first rounds (identical requests, answered once by the cache);
- grpo: per arm, total_steps x prompts_per_step x group_size verifier calls at most,
  plus with eval.curve_every k: (evaluations: every k-th step and the last) x Q judge
  calls (x 2 with both orders)
  (identical completions are graded once); verify "per_criterion" multiplies by the
  criteria of the rubric, which only exist after the rubric stages: counted as 1 call per
  completion and flagged;
- responses: no endpoint call ((arms + 1) x Q local generations);
- winrate: arms x Q judge calls, x 2 with both orders;
- healthbench: (arms + 1) x the criteria of the test prompts' HealthBench rubrics.
"""

from __future__ import annotations

import math
from typing import Any

from rubrax.pipeline.config import ExperimentConfig


def _pool_sizes(cfg: ExperimentConfig, name: str, prompt_ids: list[str]) -> dict[str, int]:
    from rubrax.data.rubrics import iter_jsonl

    pool = cfg.pools[name]
    if not pool.file:
        return {pid: pool.size for pid in prompt_ids}
    sizes: dict[str, int] = {}
    for _, rec in iter_jsonl(pool.file):
        sizes[str(rec.get("prompt_id"))] = sizes.get(str(rec.get("prompt_id")), 0) + 1
    return {pid: sizes.get(pid, 0) for pid in prompt_ids}


def _rtd_calls(cfg: ExperimentConfig, train_ids: list[str]) -> tuple[int, int]:
    rounds_by_pool: dict[str, int] = {}
    for arm in cfg.arms:
        if arm.pool is not None and arm.pairs:
            rounds_by_pool[arm.pool] = max(rounds_by_pool.get(arm.pool, 0), arm.pairs)
    verifier = proposer = 0
    for name, rounds in rounds_by_pool.items():
        for size in _pool_sizes(cfg, name, train_ids).values():
            pool = min(cfg.pool_size, size)
            for t in range(rounds):
                left = pool - 2 * t if cfg.drop_used else pool
                if left < 2:
                    break
                verifier += left
                proposer += 1
    return verifier, proposer


def _rl_steps(cfg: ExperimentConfig, n_train: int) -> tuple[int, int]:
    """(total steps, completions per step) of one arm's GRPO run."""
    loop, rl = cfg.grpo.get("loop", {}), cfg.grpo.get("rl", {})
    per_step = int(loop.get("prompts_per_step", 1))
    steps = loop.get("total_steps")
    if steps is None:
        steps = max(1, math.ceil(float(cfg.grpo.get("epochs", 1)) * n_train / per_step))
    return int(steps), per_step * int(rl.get("group_size", 8))


def _prompt_ids(path: str, n: int | None, split: str) -> list[str]:
    """The file's prompt ids, or n placeholder ids when the file is not there yet."""
    import os

    from rubrax.data.rubrics import read_prompts

    if os.path.exists(path):
        return [pid for pid, _ in read_prompts(path)]
    if n is None:
        raise FileNotFoundError(f"{path} not found (give prompts.n_{split} for a dry run without it)")
    return [f"{split}-{i}" for i in range(n)]


def count_calls(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per stage: {stage, calls: {role/model: n}, rl_steps?, note?}."""
    from rubrax.data.rubrics import load_rubrics

    train_ids = _prompt_ids(cfg.train_prompts, cfg.n_train, "train")
    test_ids = _prompt_ids(cfg.test_prompts, cfg.n_test, "test")
    P, Q, A = len(train_ids), len(test_ids), len(cfg.arms)
    rows = []
    pools: dict[str, int] = {}
    for pool in cfg.pools.values():
        for ep, n in pool.sources:
            pools[f"{pool.name}: {ep.model}"] = P * n
    rows.append({"stage": "pools", "calls": pools})
    rows.append({"stage": "rubrics", "calls": {f"proposer: {cfg.proposer.model}": P}})
    v, p = _rtd_calls(cfg, train_ids)
    rows.append({"stage": "rtd", "calls": {f"verifier: {cfg.verifier.model}": v, f"proposer: {cfg.proposer.model}": p}})
    steps, per_step = _rl_steps(cfg, P)
    note = "at most; x criteria per rubric with verify per_criterion" if cfg.verifier_mode == "per_criterion" else "at most"
    grpo = {f"verifier: {cfg.verifier.model}": A * steps * per_step}
    every = cfg.eval["curve_every"]
    if every:  # the win-rate curve: evaluations at every k-th step and at the end
        evals = steps // every + (1 if steps % every else 0)
        grpo[f"judge: {cfg.judge.model} (curve)"] = A * evals * Q * (2 if cfg.eval["both_orders"] else 1)
    rows.append({"stage": "grpo", "calls": grpo, "rl_steps": A * steps, "note": f"{steps} steps per arm x {A} arms; {note}"})
    rows.append({"stage": "export", "calls": {}})
    rows.append({"stage": "responses", "calls": {}, "note": f"{(A + 1) * Q} local generations"})
    rows.append({"stage": "winrate", "calls": {f"judge: {cfg.judge.model}": A * Q * (2 if cfg.eval["both_orders"] else 1)}})
    if cfg.healthbench is None:
        rows.append({"stage": "healthbench", "calls": {}, "note": "no HealthBench rubric set: skipped"})
    else:
        rubrics = load_rubrics(cfg.healthbench, scale="points")
        criteria = sum(len(rubrics[pid].criteria) for pid in test_ids if pid in rubrics)
        rows.append({"stage": "healthbench", "calls": {f"verifier: {cfg.verifier.model}": (A + 1) * criteria}})
    rows.append({"stage": "report", "calls": {}})
    return rows


def format_calls(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        total = sum(row["calls"].values())
        detail = ", ".join(f"{k}={v}" for k, v in row["calls"].items())
        extra = (f" rl_steps={row['rl_steps']}" if "rl_steps" in row else "") + (f" ({row['note']})" if row.get("note") else "")
        lines.append(f"{row['stage']:>12}: calls={total}{' [' + detail + ']' if detail else ''}{extra}")
    lines.append(f"{'total':>12}: calls={sum(sum(r['calls'].values()) for r in rows)} rl_steps={sum(r.get('rl_steps', 0) for r in rows)}")
    return "\n".join(lines)

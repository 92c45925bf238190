"""Runs the experiment's stages in order, each skipped when complete.

A stage is complete when <run>/stages/<stage>.json exists: written (atomically) when the
stage finished, it holds the stage's part of the config, its fingerprint, the calls,
cache hits, failures, tokens and cost of every endpoint it used, and its figures. A
rerun skips complete stages and resumes at the first incomplete one, which itself
resumes item by item. A stage completed under a different config is an error (use a
new run folder, or delete that stage's marker and outputs). <run>/config.json keeps
the config of the latest invocation and <run>/cost.json the cost of every stage and
the total.

`--stages` runs a subset; the stages before each of them must be complete.
Tests kill the process at a stage boundary with RUBRAX_KILL_AFTER_STAGE=<stage>
(SIGKILL right after the stage's marker is written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rubrax.pipeline.config import STAGES, ConfigError, ExperimentConfig
from rubrax.pipeline.stages import STAGE_FNS, Context, StageResult


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _endpoints(clients: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Stats of the stage's clients, summed per model (a model may serve several roles)."""
    out: dict[str, dict[str, Any]] = {}
    unique = list({id(c): c for c in clients}.values())
    for c in unique:
        stats = dataclasses.asdict(c.stats)
        acc = out.setdefault(c.config.model, {k: 0 for k in stats})
        for k, v in stats.items():
            acc[k] = None if v is None or acc[k] is None else acc[k] + v
    return out


def _cost(endpoints: dict[str, dict[str, Any]]) -> float | None:
    costs = [e["cost_usd"] for e in endpoints.values() if e["calls"] or e["batch_requests"]]
    return None if any(c is None for c in costs) else float(sum(costs))


def marker_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _check_done(out: Path, cfg: ExperimentConfig, stage: str) -> bool:
    path = marker_path(out, stage)
    if not path.exists():
        return False
    marker = json.loads(path.read_text())
    if marker["fingerprint"] != cfg.fingerprint(stage):
        changed = sorted(k for k in cfg.stage_config(stage) if marker["config"].get(k) != cfg.stage_config(stage)[k])
        raise ConfigError(cfg.source, changed[0] if changed else stage,
                          f"stage {stage!r} of {out} was completed with another value; use a new --out, or delete {path} and its outputs")
    return True


def _attempts_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.attempts.jsonl"


def write_cost(out: Path) -> dict[str, Any]:
    """cost.json: each stage's cost, failed attempts included (their calls were paid too)."""
    stages, attempts = {}, {}
    for stage in STAGES:
        path, tries = marker_path(out, stage), _attempts_path(out, stage)
        if path.exists():
            stages[stage] = json.loads(path.read_text())["cost_usd"]
        if tries.exists():
            attempts[stage] = [json.loads(x)["cost_usd"] for x in tries.read_text().splitlines() if x.strip()]
    costs = list(stages.values()) + [c for cs in attempts.values() for c in cs]
    known = [c for c in costs if c is not None]
    total = {"stages": stages, "failed_attempts": attempts, "total_usd": float(sum(known)), "complete": all(c is not None for c in costs)}
    _write_json(out / "cost.json", total)
    return total


def _record_attempt(out: Path, stage: str, clients: Sequence[Any], err: Exception) -> None:
    """A failed stage's calls and cost (a SIGKILL leaves no such record: its completed calls
    are in the cache, and the rerun counts them as cache hits, not as cost)."""
    if not clients:
        return
    endpoints = _endpoints(clients)
    with open(_attempts_path(out, stage), "a", encoding="utf-8") as f:
        f.write(json.dumps({"error": f"{type(err).__name__}: {err}"[:500], "endpoints": endpoints, "cost_usd": _cost(endpoints)}) + "\n")
    write_cost(out)


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike, *, stages: Sequence[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the stages; returns the cost summary."""
    out = Path(out)
    wanted = list(STAGES) if not stages else list(stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg.raw)
    ctx = Context(cfg, out, progress)
    for stage in STAGES:
        if stage not in wanted:
            continue
        if _check_done(out, cfg, stage):
            print(f"stage {stage}: complete, skipped", file=sys.stderr)
            continue
        for before in STAGES[: STAGES.index(stage)]:
            if before not in wanted and not _check_done(out, cfg, before):
                raise ValueError(f"stage {stage!r} needs stage {before!r} first (run it, or leave out --stages)")
        print(f"stage {stage}: running", file=sys.stderr)
        ctx.clients.clear()
        try:
            result = STAGE_FNS[stage](ctx)
        except Exception as err:
            _record_attempt(out, stage, ctx.clients, err)
            raise
        endpoints = _endpoints(ctx.clients + result.clients)
        _write_json(marker_path(out, stage), {"stage": stage, "fingerprint": cfg.fingerprint(stage), "config": cfg.stage_config(stage),
                                              "endpoints": endpoints, "cost_usd": _cost(endpoints), "info": result.info})
        for model, s in endpoints.items():
            cost = "unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
            print(f"  {stage} {model}: calls={s['calls']} cache_hits={s['cache_hits']} failures={s['failures']} "
                  f"prompt_tokens={s['prompt_tokens']} completion_tokens={s['completion_tokens']} cost={cost}", file=sys.stderr)
        write_cost(out)
        if os.environ.get("RUBRAX_KILL_AFTER_STAGE") == stage:
            os.kill(os.getpid(), signal.SIGKILL)
    total = write_cost(out)
    print(f"total cost: ${total['total_usd']:.4f}{'' if total['complete'] else ' (+ endpoints without a price)'}", file=sys.stderr)
    return total

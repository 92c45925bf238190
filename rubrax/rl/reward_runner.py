"""Rewards of a step's rollouts, computed off the main thread, that cannot hang the run.

The reward function is called concurrently on chunks of `chunk_size` rows (default: one
group), each under a deadline of `timeout_s`, by `rubrax.rewards.deadline.DeadlineRunner`
(an asyncio loop in a daemon thread, so the main thread can sample while judges answer;
sync rewards on a bounded daemon pool whose hung workers are abandoned and replaced;
async ones cancelled). A chunk that times out, raises or returns something malformed
becomes `valid=False` (counted in "timeouts" / "exceptions" / "malformed", never a 0
reward; the first of each kind warned once with a sample). `InvalidStreak` stops a run
whose rewards are all invalid for `LoopConfig.max_invalid_steps` consecutive steps.
Every record field other than the prompt is passed as a keyword column, repeated G times.
Multi-host: each process scores only the rows it feeds (whole groups), and the failure
counts are summed over processes. A combined reward (WeightedSum, e.g. a recipe's
"rewards" list) also reports each component: reward/<name>/mean over the component's
valid rows and reward/<name>/invalid, per step (`component_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rubrax.rewards.base import RewardBatch
from rubrax.rewards.deadline import FAILURE_KINDS, DeadlineRunner
from rubrax.rl.prompts import PromptSet
from rubrax.rl.rollouts import Rollouts
from rubrax.sharding import local_rows

log = logging.getLogger("rubrax.rl")


class RewardRunner(DeadlineRunner):
    """The loop's reward runner: `submit(prompts, completions, columns)` -> Future of
    (RewardBatch, {"timeouts", "exceptions", "malformed": rows, + component sums})."""

    def __init__(self, reward_fn: Any, *, timeout_s: float | None, chunk_size: int, max_workers: int | None = None):
        super().__init__(reward_fn, timeout_s=timeout_s, chunk_size=chunk_size, max_workers=max_workers)
        # declared up front, so every step (and every host) reports the same keys
        self.components = tuple(getattr(self.fn, "component_names", ()))

    async def _all(self, prompts, completions, columns):
        rb, counts = await super()._all(prompts, completions, columns)
        return rb, {**counts, **component_counts(rb, self.components)}


def failure_metrics(counts: Mapping[str, Any]) -> dict[str, int]:
    """The per-step metrics of reward failures: reward_timeouts, reward_exceptions, reward_malformed."""
    return {f"reward_{k}": int(counts.get(k, 0)) for k in FAILURE_KINDS}


class RewardsAllInvalid(RuntimeError):
    """Every reward of a run was invalid for too many consecutive steps."""


class InvalidStreak:
    """Counts consecutive steps in which no row got a valid reward; raises after `limit`."""

    def __init__(self, limit: int | None):
        self.limit, self.steps, self.first = limit, 0, None

    def update(self, step: int, valid_rows: int, counts: Mapping[str, Any], sample: Any) -> None:
        if valid_rows:
            self.steps, self.first = 0, None
            return
        self.steps += 1
        self.first = step if self.first is None else self.first
        if self.limit is not None and self.steps >= self.limit:
            raise RewardsAllInvalid(
                f"every reward was invalid in {self.steps} consecutive steps ({self.first}..{step}; "
                f"{', '.join(f'{k}={int(counts.get(k, 0))}' for k in FAILURE_KINDS)} in the last one; sample: {sample!r}). "
                "The run stops (LoopConfig.max_invalid_steps) instead of training on nothing; fix the reward "
                "and rerun with the same out_dir to resume from the last checkpoint.")


def fed_and_scored_rows(mesh, rows: int, group_size: int) -> tuple[slice, slice]:
    """(rows this process feeds to the update, rows it scores). One host: all, all.
    Several: its own rows (`local_rows`) for both, so judge calls are not repeated per
    host, unless that block would split a group (group-aware rewards see whole groups:
    then it scores all rows)."""
    if jax.process_count() == 1:
        return slice(None), slice(None)
    fed = local_rows(mesh, rows)
    whole_groups = fed.start % group_size == 0 and (fed.stop - fed.start) % group_size == 0
    return fed, fed if whole_groups else slice(None)


def component_counts(batch: RewardBatch, names: Sequence[str]) -> dict[str, float | int]:
    """Sums that give each component's mean and invalid count (summable over hosts)."""
    out: dict[str, float | int] = {}
    for name in names:
        scores, valid = batch.components.get(name, (np.zeros(len(batch), np.float32), np.zeros(len(batch), bool)))
        out[f"reward/{name}/sum"] = float(scores[valid].sum(dtype=np.float64))
        out[f"reward/{name}/valid"] = int(valid.sum())
        out[f"reward/{name}/invalid"] = int((~valid).sum())
    return out


def component_metrics(counts: Mapping[str, float | int]) -> dict[str, float | int]:
    """Per component of the reward: reward/<name>/mean (over its valid rows; NaN when
    none) and reward/<name>/invalid, from the (host-summed) `component_counts`."""
    out: dict[str, float | int] = {}
    for key in counts:
        if key.startswith("reward/") and key.endswith("/sum"):
            name = key[len("reward/"): -len("/sum")]
            n = counts[f"reward/{name}/valid"]
            out[f"reward/{name}/mean"] = counts[key] / n if n else float("nan")
            out[f"reward/{name}/invalid"] = counts[f"reward/{name}/invalid"]
    return out


def sum_over_hosts(counts: dict[str, float | int]) -> dict[str, float | int]:
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    # float64 holds the counts exactly (< 2^53) and the component score sums
    totals = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.float64)).sum(axis=0)
    return {k: int(v) if isinstance(counts[k], int) else float(v) for k, v in zip(keys, totals)}


def reward_inputs(prompts: PromptSet, ro: Rollouts, group_size: int):
    """(prompt texts, completions, columns) with every per-prompt field repeated G times."""
    rows = np.repeat(ro.indices, group_size)
    texts = [prompts.texts[i] for i in rows]
    columns = {k: [v[i] for i in rows] for k, v in prompts.columns.items()}
    return texts, ro.completions, columns

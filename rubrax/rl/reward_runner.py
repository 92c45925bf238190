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
counts are summed over processes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from rubrax.rewards.deadline import FAILURE_KINDS, DeadlineRunner
from rubrax.rl.prompts import PromptSet
from rubrax.rl.rollouts import Rollouts
from rubrax.sharding import local_rows

log = logging.getLogger("rubrax.rl")


class RewardRunner(DeadlineRunner):
    """The loop's reward runner: `submit(prompts, completions, columns)` -> Future of
    (RewardBatch, {"timeouts", "exceptions", "malformed": rows})."""


def failure_metrics(counts: dict[str, int]) -> dict[str, int]:
    """The per-step metrics of reward failures: reward_timeouts, reward_exceptions, reward_malformed."""
    return {f"reward_{k}": int(counts.get(k, 0)) for k in FAILURE_KINDS}


class RewardsAllInvalid(RuntimeError):
    """Every reward of a run was invalid for too many consecutive steps."""


class InvalidStreak:
    """Counts consecutive steps in which no row got a valid reward; raises after `limit`."""

    def __init__(self, limit: int | None):
        self.limit, self.steps, self.first = limit, 0, None

    def update(self, step: int, valid_rows: int, counts: dict[str, int], sample: Any) -> None:
        if valid_rows:
            self.steps, self.first = 0, None
            return
        self.steps += 1
        self.first = step if self.first is None else self.first
        if self.limit is not None and self.steps >= self.limit:
            raise RewardsAllInvalid(
                f"every reward was invalid in {self.steps} consecutive steps ({self.first}..{step}; "
                f"{', '.join(f'{k}={v}' for k, v in counts.items())} in the last one; sample: {sample!r}). "
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


def sum_over_hosts(counts: dict[str, int]) -> dict[str, int]:
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    totals = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.int64)).sum(axis=0)
    return {k: int(v) for k, v in zip(keys, totals)}


def reward_inputs(prompts: PromptSet, ro: Rollouts, group_size: int):
    """(prompt texts, completions, columns) with every per-prompt field repeated G times."""
    rows = np.repeat(ro.indices, group_size)
    texts = [prompts.texts[i] for i in rows]
    columns = {k: [v[i] for i in rows] for k, v in prompts.columns.items()}
    return texts, ro.completions, columns

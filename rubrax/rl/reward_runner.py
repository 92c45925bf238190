"""Rewards of a step's rollouts, computed off the main thread.

The reward function's async form is called concurrently on chunks of `chunk_size` rows
(default: one group), each under `timeout_s`, on an asyncio loop in a background thread
(so the main thread can sample while judges answer). A chunk that raises or times out
becomes `valid=False` (counted in "timeouts" / "exceptions", never a 0 reward). Every
record field other than the prompt is passed as a keyword column, repeated G times.
Multi-host: each process scores only the rows it feeds (whole groups), and the failure
counts are summed over processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rubrax.rewards.base import RewardBatch, as_reward_fn
from rubrax.rl.prompts import PromptSet
from rubrax.rl.rollouts import Rollouts
from rubrax.sharding import local_rows

log = logging.getLogger("rubrax.rl")


class RewardRunner:
    """Runs reward calls on an asyncio loop in a background thread, so the main thread
    can sample (device work) while judges answer. Counts failures."""

    def __init__(self, reward_fn: Any, *, timeout_s: float | None, chunk_size: int):
        self.fn = as_reward_fn(reward_fn)
        self.timeout_s, self.chunk_size = timeout_s, chunk_size
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rubrax-rewards", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]):
        """Starts the reward computation; returns a Future of (RewardBatch, {"timeouts", "exceptions"})."""
        return asyncio.run_coroutine_threadsafe(self._all(list(prompts), list(completions), dict(columns)), self._loop)

    async def _one(self, prompts, completions, columns) -> tuple[RewardBatch, str | None]:
        n = len(completions)
        try:
            out = await asyncio.wait_for(self.fn.acall(prompts, completions, **columns), self.timeout_s)
            if len(out) != n:
                raise ValueError(f"reward returned {len(out)} scores for {n} completions")
            return out, None
        except asyncio.TimeoutError:
            return RewardBatch.invalid(n, f"timeout after {self.timeout_s}s"), "timeouts"
        except Exception as err:  # a failing judge must not end a long run: the rows become invalid
            return RewardBatch.invalid(n, f"{type(err).__name__}: {err}"), "exceptions"

    async def _all(self, prompts, completions, columns):
        c = self.chunk_size
        calls = [
            self._one(prompts[s : s + c], completions[s : s + c], {k: list(v[s : s + c]) for k, v in columns.items()})
            for s in range(0, len(completions), c)
        ]
        parts = await asyncio.gather(*calls)
        counts = {"timeouts": 0, "exceptions": 0}
        for batch, failure in parts:
            if failure:
                counts[failure] += len(batch)
                if counts[failure] == len(batch):
                    log.warning("reward call failed (%s); its %d rows are masked: %s", failure, len(batch), batch.info[0].get("error"))
        rb = RewardBatch(
            np.concatenate([p.scores for p, _ in parts]),
            np.concatenate([p.valid for p, _ in parts]),
            tuple(i for p, _ in parts for i in p.info),
        )
        return rb, counts

    def close(self) -> None:
        """Closes the reward's connections on the loop that made them (no "Unclosed client
        session" at exit), then stops the loop."""
        aclose = getattr(self.fn, "aclose", None)
        if aclose is not None:
            try:
                asyncio.run_coroutine_threadsafe(aclose(), self._loop).result(timeout=30)
            except Exception as err:  # closing must not hide the run's own outcome
                log.warning("closing the reward function failed: %s: %s", type(err).__name__, err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


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

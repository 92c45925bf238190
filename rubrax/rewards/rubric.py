"""The rubric reward: grades completions against stored rubrics (`RubricReward`).

The rubric types and their aggregation (Criterion, Rubric, verdicts, `aggregate`;
see that module for the formulas) live in the leaf module `rubrax.rubric` and are
re-exported here. Each completion is graded by a verifier (k times, majority vote),
then aggregated; failures are values (`valid=False`), never a silent 0.

Host side only: no jax.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.data.rubrics import load_rubrics
from rubrax.rewards.base import RewardBatch, RewardFnBase, _check_lengths
from rubrax.rubric import (
    AGGREGATIONS,
    VERDICTS,
    Criterion,
    Rubric,
    Score,
    Verdict,
    aggregate,
    clean_verdicts,
    majority_vote,
    with_ids,
)

__all__ = [
    "AGGREGATIONS",
    "VERDICTS",
    "Criterion",
    "Rubric",
    "RubricReward",
    "Score",
    "Verdict",
    "aggregate",
    "clean_verdicts",
    "grade_response",
    "majority_vote",
    "with_ids",
]


# --------------------------------------------------------------------------- reward


async def grade_response(verifier: Any, rubric: Rubric, completion: str, *, k: int = 1) -> tuple[dict[str, str], list[str]]:
    """Verdicts for every criterion (majority of k gradings when k > 1) and the failures seen.

    A verifier exception is a failure (its verdicts unknown), never a crash of the batch.
    """
    # Verifiers with `grade_detailed` (the LLM one) report failures and take a sample
    # index, so that k votes are k distinct requests rather than k cache hits.
    detailed = getattr(verifier, "grade_detailed", None)
    if detailed is not None:
        calls = [detailed(rubric, completion, sample=i) for i in range(k)]
    else:
        calls = [verifier.grade(rubric, completion) for _ in range(k)]
    if k == 1:  # no extra task per completion: a simulated verifier stays as cheap as a call
        try:
            results = [await calls[0]]
        except Exception as err:
            results = [err]
    else:
        results = await asyncio.gather(*calls, return_exceptions=True)
    gradings, failures = [], []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            failures.append(f"{type(r).__name__}: {r}")
            continue
        if detailed is not None:
            failures.extend(r.failures)
            r = r.verdicts
        gradings.append(clean_verdicts(rubric, r))
    if not gradings:
        return {cid: "unknown" for cid in rubric.ids()}, failures
    verdicts = gradings[0] if k == 1 else majority_vote(gradings, rubric.ids())
    return verdicts, failures


class RubricReward(RewardFnBase):
    """The rubric reward: grades each completion against the rubric of its prompt.

    Reads the `prompt_id` column to find the rubric. Each completion is graded `k`
    times (concurrently, with `asyncio.gather`; k > 1 takes the per-criterion
    `majority_vote`) by `verifier.grade(rubric, completion)`, then `aggregate`d.

    Failures are values: a missing rubric, a verifier exception or no usable verdict
    gives `valid=False`; info carries verdicts, unknown count and failures.

    Args:
      rubrics: {prompt_id: Rubric}, or a sequence of Rubric, or a path to a rubrics
        file (read with `rubrax.data.rubrics.load_rubrics`).
      verifier: any `rubrax.elicit.protocols.Verifier`.
      mode: "weighted_mean" (paper) or "healthbench".
      k: number of gradings per completion (majority vote when > 1).
    """

    name = "rubric"

    def __init__(self, rubrics: Mapping[str, Rubric] | Sequence[Rubric] | str, verifier: Any, *, mode: str = "weighted_mean", k: int = 1):
        if mode not in AGGREGATIONS:
            raise ValueError(f"RubricReward: mode must be one of {AGGREGATIONS}, got {mode!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"RubricReward: k must be a positive int, got {k!r}")
        if isinstance(rubrics, str):
            rubrics = load_rubrics(rubrics)
        if not isinstance(rubrics, Mapping):
            rubrics = {r.prompt_id: r for r in rubrics}
        self.rubrics = dict(rubrics)
        self.verifier = verifier
        self.mode = mode
        self.k = k
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        """Synchronous form. Runs on one event loop kept for this reward, so that an LLM
        verifier's connections live across batches (a fresh `asyncio.run` per batch would
        drop them)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self.acall(prompts, completions, **columns))
        return super().__call__(prompts, completions, **columns)

    async def aclose(self) -> None:
        """Closes the verifier's connections (an LLM verifier's client) and this reward's own loop."""
        close = getattr(self.verifier, "aclose", None)
        if close is not None:
            await close()
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()

    async def acall(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        n = _check_lengths(prompts, completions, columns)
        if "prompt_id" not in columns:
            raise ValueError("RubricReward needs a `prompt_id` column to find each completion's rubric")
        prompt_ids = [str(p) for p in columns["prompt_id"]]
        jobs, where = [], []
        for i, pid in enumerate(prompt_ids):
            rubric = self.rubrics.get(pid)
            if rubric is not None:
                jobs.append(grade_response(self.verifier, rubric, completions[i], k=self.k))
                where.append(i)
        graded = dict(zip(where, await asyncio.gather(*jobs)))
        scores = np.zeros(n, np.float32)
        valid = np.zeros(n, bool)
        info = []
        for i, pid in enumerate(prompt_ids):
            if i not in graded:
                info.append({"prompt_id": pid, "error": f"no rubric for prompt_id {pid!r}"})
                continue
            verdicts, failures = graded[i]
            s = aggregate(self.rubrics[pid], verdicts, self.mode)
            scores[i] = s.score if s.valid else 0.0
            valid[i] = s.valid
            info.append({"prompt_id": pid, "verdicts": verdicts, "unknown": s.unknown, "failures": failures})
        return RewardBatch(scores, valid, tuple(info))

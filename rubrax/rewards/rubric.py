"""Rubrics: criteria, their validation, aggregation of verdicts, and `RubricReward`.

A rubric is a per-prompt list of binary criteria c_i with weights w_i. A verifier
says yes / no / unknown per criterion. Two aggregations (`aggregate`):

- "weighted_mean" (the paper, Sec. 3): r = sum_i w_i V_i / sum_i w_i over the
  criteria with w_i > 0 (weights 1..3). Negative-weight criteria (pitfalls) take no
  part; use "healthbench" for signed rubrics.
- "healthbench" (HealthBench's score): r = clip(sum_{i met} w_i / sum_{i: w_i>0} w_i,
  0, 1): met positive criteria add their points, met pitfalls (w_i < 0) subtract
  theirs, the denominator is the total of positive points.

In both, an "unknown" verdict (verifier failed or could not decide) is left out of
the numerator and the denominator, and counted. When no positive criterion has a
known verdict the score is undefined: `valid=False`, never a silent 0.

Host side only: no jax.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from rubrax.rewards.base import RewardBatch, RewardFnBase, _check_lengths, register_reward

Verdict = Literal["yes", "no", "unknown"]
VERDICTS: tuple[str, ...] = ("yes", "no", "unknown")
AGGREGATIONS: tuple[str, ...] = ("weighted_mean", "healthbench")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One binary criterion, phrased so that "yes" is good (or, with a negative
    weight, so that "yes" is a pitfall).

    `weight` is 1..3 in the paper and signed points in HealthBench; it must be a
    finite non-zero number. `tags` carries HealthBench's tags (e.g. "axis:accuracy").
    """

    id: str
    text: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError(f"criterion id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"criterion {self.id!r}: text must be a non-empty string")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float, np.integer, np.floating)):
            raise ValueError(f"criterion {self.id!r}: weight must be a number, got {self.weight!r}")
        weight = float(self.weight)
        if not math.isfinite(weight) or weight == 0.0:
            raise ValueError(f"criterion {self.id!r}: weight must be finite and non-zero, got {self.weight!r}")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclasses.dataclass(frozen=True)
class Rubric:
    """The criteria of one prompt. Criterion ids are unique within a rubric."""

    prompt_id: str
    prompt: str
    criteria: tuple[Criterion, ...]

    def __post_init__(self) -> None:
        criteria = tuple(self.criteria)
        for c in criteria:
            if not isinstance(c, Criterion):
                raise TypeError(f"rubric {self.prompt_id!r}: criteria must be Criterion objects, got {type(c).__name__}")
        dup = [cid for cid, n in Counter(c.id for c in criteria).items() if n > 1]
        if dup:
            raise ValueError(f"rubric {self.prompt_id!r}: duplicate criterion ids {dup}")
        object.__setattr__(self, "criteria", criteria)

    def ids(self) -> list[str]:
        return [c.id for c in self.criteria]

    def by_id(self) -> dict[str, Criterion]:
        return {c.id: c for c in self.criteria}

    @property
    def total_weight(self) -> float:
        return float(sum(c.weight for c in self.criteria))


def with_ids(criteria: Iterable[Criterion | tuple[str, float] | Mapping[str, Any]]) -> tuple[Criterion, ...]:
    """Numbers criteria c1..cN (their order), keeping text, weight and tags.

    Accepts Criterion objects, (text, weight) pairs or {criterion, weight} dicts, so
    that a proposer's output and a loaded record get the same ids.
    """
    out = []
    for i, c in enumerate(criteria, start=1):
        if isinstance(c, Criterion):
            out.append(dataclasses.replace(c, id=f"c{i}"))
        elif isinstance(c, Mapping):
            out.append(Criterion(f"c{i}", c["criterion"], c.get("weight", 1.0)))
        else:
            text, weight = c
            out.append(Criterion(f"c{i}", text, weight))
    return tuple(out)


# --------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class Score:
    """The aggregate of one grading. `score` is NaN when not `valid`.

    `known` / `unknown` count the criteria (of those that take part in `mode`) with a
    yes/no verdict and with an unknown one.
    """

    score: float
    valid: bool
    known: int
    unknown: int

    def __float__(self) -> float:
        return self.score


def aggregate(rubric: Rubric, verdicts: Mapping[str, str], mode: str = "weighted_mean") -> Score:
    """Aggregates per-criterion verdicts into one score (see the module docstring).

    Ids missing from `verdicts`, and values other than "yes"/"no", count as unknown;
    ids not in the rubric are ignored.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate: mode must be one of {AGGREGATIONS}, got {mode!r}")
    num = den = 0.0
    known = unknown = 0
    for c in rubric.criteria:
        if mode == "weighted_mean" and c.weight < 0:
            continue
        v = verdicts.get(c.id, "unknown")
        if v not in ("yes", "no"):
            unknown += 1
            continue
        known += 1
        if c.weight > 0:
            den += c.weight
        if v == "yes":
            num += c.weight
    if den <= 0.0:
        return Score(math.nan, False, known, unknown)
    score = num / den
    if mode == "healthbench":
        score = min(1.0, max(0.0, score))
    return Score(score, True, known, unknown)


def majority_vote(gradings: Sequence[Mapping[str, str]], ids: Sequence[str]) -> dict[str, str]:
    """Per-criterion majority over k gradings (the paper's Table 2 uses k=5).

    Unknown verdicts abstain; "yes" wins with more yes than no votes, "no" with more
    no than yes votes; a tie (including no vote at all) is "unknown".
    """
    out = {}
    for cid in ids:
        yes = sum(1 for g in gradings if g.get(cid) == "yes")
        no = sum(1 for g in gradings if g.get(cid) == "no")
        out[cid] = "yes" if yes > no else "no" if no > yes else "unknown"
    return out


def clean_verdicts(rubric: Rubric, verdicts: Mapping[str, Any]) -> dict[str, str]:
    """One verdict per rubric id: yes / no / unknown (anything else is unknown)."""
    out = {}
    for cid in rubric.ids():
        v = verdicts.get(cid, "unknown")
        out[cid] = v if v in ("yes", "no") else "unknown"
    return out


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


@register_reward("rubric")
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
            from rubrax.data.rubrics import load_rubrics

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

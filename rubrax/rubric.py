"""Rubric types: criteria, rubrics, verdicts and their aggregation into a score.

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

A leaf of the package: it imports nothing else from rubrax, so data formats
(rubrax.data.rubrics), rewards (rubrax.rewards.rubric) and elicitation
(rubrax.elicit) all build on it. Host side only: no jax.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

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

"""Rubrics: criteria, their validation, aggregation of verdicts, and `RubricReward`.

A rubric is a per-prompt list of binary criteria c_i with weights w_i. A verifier
says yes / no / unknown per criterion. The paper's aggregation is the weighted
mean over positive weights: sum_i w_i V_i / sum_i w_i (weights 1..3). HealthBench
uses signed points (negative = pitfall). Host side only: no jax.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Verdict = Literal["yes", "no", "unknown"]
VERDICTS: tuple[str, ...] = ("yes", "no", "unknown")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One binary criterion. `weight` is 1..3 (paper) or signed points (HealthBench)."""

    id: str
    text: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Rubric:
    """The criteria of one prompt."""

    prompt_id: str
    prompt: str
    criteria: tuple[Criterion, ...]

    def ids(self) -> list[str]:
        return [c.id for c in self.criteria]

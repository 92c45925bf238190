"""Win rate against a reference set through the pairwise judge, with bootstrap intervals.

The paper's evaluation (Sec. 5): a gold judge (GPT-4.1) compares each policy response
with a reference response (Qwen3-8B) to the same held-out prompt, in a random order.
Outcome per item: 1 = the policy's response wins, 0 = the reference wins; with
`both_orders` the judge sees both orders and the outcome is their mean (0.5 = split).
Items whose judgement failed are left out and counted.

Win rate = mean outcome; its confidence interval is the percentile bootstrap over items:
resample the n outcomes with replacement `n_boot` times and take the (1-c)/2 and
(1+c)/2 quantiles of the resampled means.

Judge-bias checks (`JudgeBias`), because position and length biases distort both the
reward and the evaluation:
    flip_rate            pairs judged in both orders whose winner changed with the order
                         (an unbiased, consistent judge: 0; a judge that always picks the
                         response shown first: 1)
    first_position_rate  judgements that picked the response shown first (0.5 unbiased)
    length_corr          Pearson correlation of the outcome with the length difference
                         (words of the response minus words of the reference)
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    failed: int
    confidence: float

    def line(self) -> str:
        return f"win_rate={self.win_rate:.4f} ci_low={self.ci_low:.4f} ci_high={self.ci_high:.4f} n={self.n} failed={self.failed}"


def bootstrap_ci(outcomes: Sequence[float], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `outcomes`."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def win_rate(outcomes: Sequence[float | None], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate of outcomes in [0, 1]; None = a failed judgement (excluded, counted)."""
    ok = [float(o) for o in outcomes if o is not None]
    failed = len(outcomes) - len(ok)
    if not ok:
        return WinRate(float("nan"), float("nan"), float("nan"), 0, failed, confidence)
    lo, hi = bootstrap_ci(ok, n_boot=n_boot, confidence=confidence, seed=seed)
    return WinRate(float(np.mean(ok)), lo, hi, len(ok), failed, confidence)


@dataclasses.dataclass(frozen=True)
class WinItem:
    """One comparison: `response` (the policy's) against `reference`, for `prompt`."""

    key: str
    prompt: str
    response: str
    reference: str


async def judge_outcome(judge: Any, item: WinItem, *, both_orders: bool = False) -> float | None:
    """1 if the judge prefers item.response, 0 if item.reference, None if it failed.

    With both_orders: the mean over the two display orders (None if either failed).
    """
    if not both_orders:
        pref = await judge.compare(item.prompt, item.response, item.reference, key=item.key)
        return None if pref is None else float(pref == "a")
    return outcome_of_orders(*await judge_orders(judge, item))


async def judge_orders(judge: Any, item: WinItem) -> tuple[str | None, str | None]:
    """The judge's preference ("a" = item.response, "b" = item.reference, None = failed)
    with the response shown first, then with the reference shown first."""
    p1, p2 = await asyncio.gather(
        judge.compare(item.prompt, item.response, item.reference, key=item.key, swap=False),
        judge.compare(item.prompt, item.response, item.reference, key=item.key, swap=True),
    )
    return p1, p2


def outcome_of_orders(p1: str | None, p2: str | None) -> float | None:
    """Mean outcome over the two display orders (None if either failed)."""
    if p1 is None or p2 is None:
        return None
    return (float(p1 == "a") + float(p2 == "a")) / 2.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan for fewer than 2 points or a constant input."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def word_count(text: str) -> int:
    return len(text.split())


@dataclasses.dataclass(frozen=True)
class JudgeBias:
    """Position and length bias of a pairwise judge (see the module docstring); nan where
    there is nothing to measure (no pair judged in both orders, constant outcomes)."""

    flip_rate: float
    first_position_rate: float
    length_corr: float
    n_both_orders: int

    def line(self) -> str:
        return (f"flip_rate={self.flip_rate:.4f} first_position_rate={self.first_position_rate:.4f} "
                f"length_corr={self.length_corr:.4f} n_both_orders={self.n_both_orders}")


def judge_bias(items: Sequence[WinItem], outcomes: Sequence[float | None],
               orders: Sequence[tuple[str | None, str | None] | None] = ()) -> JudgeBias:
    """Bias figures of judged `items`: `outcomes` as from `judge_outcome`, `orders` the
    (response-first, reference-first) preferences of pairs judged in both orders (None
    for a pair judged once)."""
    both = [o for o in orders if o is not None and None not in o]
    flips = [o[0] != o[1] for o in both]
    first = [o[0] == "a" for o in both] + [o[1] == "b" for o in both]
    judged = [(it, out) for it, out in zip(items, outcomes) if out is not None]
    diff = [word_count(it.response) - word_count(it.reference) for it, _ in judged]
    return JudgeBias(
        flip_rate=float(np.mean(flips)) if flips else float("nan"),
        first_position_rate=float(np.mean(first)) if first else float("nan"),
        length_corr=pearson([out for _, out in judged], diff),
        n_both_orders=len(both),
    )

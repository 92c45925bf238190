"""Agreement of rubric preferences with gold preferences, split by reward region (Table 2).

For each response pair (a, b) with a gold preference, the rubric prefers the response
with the higher rubric score (the paper grades each response 5 times and takes the
per-criterion majority: `RubricReward(k=5)`). Agreement = fraction of pairs where the
rubric's preference equals the gold one. A rubric tie counts `tie_credit` (0 by
default: a rubric that cannot separate two responses does not agree with a judge that
can); a pair with an invalid rubric score is left out and counted.

Regions: a pair is "high" when its mean gold reward is at or above `threshold` (default:
the median of the pairs' mean gold rewards), else "low"; or pass regions explicitly.
The paper reports 40.3% -> 49.2% agreement on high-reward pairs and 66.2% -> 69.8% on
low-reward pairs as rubrics are refined.

Per criterion (`criterion_agreement`): over the pairs where the criterion has a known
verdict on both responses, "separating" pairs are those where it says yes to one response
only; its agreement is the fraction of separating pairs where the yes goes to the gold
winner. "both_yes" pairs are ties the criterion cannot break (a saturated criterion: the
ties that refinement targets), "both_no" ones a criterion nobody meets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pair:
    """A response pair of one prompt with the gold preference ("a" or "b")."""

    prompt_id: str
    prompt: str
    response_a: str
    response_b: str
    gold: str
    gold_reward_a: float | None = None
    gold_reward_b: float | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.gold not in ("a", "b"):
            raise ValueError(f"Pair {self.prompt_id!r}: gold must be 'a' or 'b', got {self.gold!r}")


def assign_regions(pairs: Sequence[Pair], threshold: float | None = None) -> list[str]:
    """"high" / "low" per pair: explicit `region`, else mean gold reward vs `threshold`."""
    means = []
    for p in pairs:
        if p.region is None and (p.gold_reward_a is None or p.gold_reward_b is None):
            raise ValueError(f"Pair {p.prompt_id!r}: needs a region or both gold rewards")
        means.append(np.nan if p.region is not None else (p.gold_reward_a + p.gold_reward_b) / 2.0)
    finite = [m for m in means if np.isfinite(m)]
    if threshold is None and finite:
        threshold = float(np.median(finite))
    return [p.region if p.region is not None else ("high" if m >= threshold else "low") for p, m in zip(pairs, means)]


def preference(score_a: float | None, score_b: float | None) -> str | None:
    """"a", "b", "tie", or None when either score is missing (invalid)."""
    if score_a is None or score_b is None:
        return None
    return "a" if score_a > score_b else "b" if score_b > score_a else "tie"


def agreement(prefs: Sequence[str | None], pairs: Sequence[Pair], regions: Sequence[str], *, tie_credit: float = 0.0) -> dict[str, dict[str, float]]:
    """{region: {agreement, n, ties, invalid}} plus "all"."""
    out = {}
    for name in sorted(set(regions)) + ["all"]:
        idx = [i for i, r in enumerate(regions) if name == "all" or r == name]
        used = [i for i in idx if prefs[i] is not None]
        credit = sum(1.0 if prefs[i] == pairs[i].gold else tie_credit if prefs[i] == "tie" else 0.0 for i in used)
        out[name] = {
            "agreement": credit / len(used) if used else float("nan"),
            "n": len(used),
            "ties": sum(prefs[i] == "tie" for i in used),
            "invalid": len(idx) - len(used),
        }
    return out


async def rubric_agreement(reward: Any, pairs: Sequence[Pair], *, threshold: float | None = None, tie_credit: float = 0.0) -> dict[str, dict[str, float]]:
    """Scores both responses of every pair with `reward` (e.g. RubricReward(k=5)) and
    returns `agreement` by region."""
    return (await rubric_agreement_detail(reward, pairs, threshold=threshold, tie_credit=tie_credit))[0]


async def rubric_agreement_detail(reward: Any, pairs: Sequence[Pair], *, threshold: float | None = None,
                                  tie_credit: float = 0.0) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """`rubric_agreement` and the per-criterion table (`criterion_agreement`) from the
    verdicts the rubric reward reports in its info."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    completions = [r for p in pairs for r in (p.response_a, p.response_b)]
    pids = [p.prompt_id for p in pairs for _ in (0, 1)]
    batch = await reward.acall(prompts, completions, prompt_id=pids)
    scores = [float(s) if v else None for s, v in zip(batch.scores, batch.valid)]
    prefs = [preference(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))]
    table = agreement(prefs, pairs, assign_regions(pairs, threshold), tie_credit=tie_credit)
    verdicts = [info.get("verdicts") or {} for info in batch.info]
    return table, criterion_agreement(pairs, verdicts[0::2], verdicts[1::2], getattr(reward, "rubrics", {}))


def criterion_agreement(pairs: Sequence[Pair], verdicts_a: Sequence[dict[str, str]], verdicts_b: Sequence[dict[str, str]],
                        rubrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (prompt_id, criterion id) seen in the verdicts (see module docstring):
    {prompt_id, criterion, text, weight, pairs, separating, agreement, both_yes, both_no,
    unknown}; agreement is nan when no pair was separated."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for pair, va, vb in zip(pairs, verdicts_a, verdicts_b):
        for cid in dict.fromkeys([*va, *vb]):
            rubric = rubrics.get(pair.prompt_id)
            crit = rubric.by_id().get(cid) if rubric is not None else None
            row = rows.setdefault((pair.prompt_id, cid), {
                "prompt_id": pair.prompt_id, "criterion": cid, "text": getattr(crit, "text", ""),
                "weight": getattr(crit, "weight", float("nan")), "pairs": 0, "separating": 0, "agree": 0,
                "both_yes": 0, "both_no": 0, "unknown": 0})
            a, b = va.get(cid, "unknown"), vb.get(cid, "unknown")
            if "unknown" in (a, b) or a not in ("yes", "no") or b not in ("yes", "no"):
                row["unknown"] += 1
                continue
            row["pairs"] += 1
            if a == b:
                row["both_yes" if a == "yes" else "both_no"] += 1
            else:
                row["separating"] += 1
                row["agree"] += ("a" if a == "yes" else "b") == pair.gold
    out = []
    for row in rows.values():
        agree = row.pop("agree")
        row["agreement"] = agree / row["separating"] if row["separating"] else float("nan")
        out.append(row)
    return out


def format_criterion_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of `criterion_agreement` rows."""
    head = f"{'prompt_id':<16} {'criterion':<10} {'w':>4} {'pairs':>5} {'sep':>4} {'agree':>6} {'yes/yes':>7} {'no/no':>5}  text"
    lines = [head]
    for r in rows:
        lines.append(f"{str(r['prompt_id'])[:16]:<16} {str(r['criterion'])[:10]:<10} {r['weight']:>4g} {r['pairs']:>5} "
                     f"{r['separating']:>4} {r['agreement']:>6.3f} {r['both_yes']:>7} {r['both_no']:>5}  {r['text'][:60]}")
    return "\n".join(lines)

"""Refinement-through-Differentiation (RTD), written once against the Proposer / Verifier protocols.

- `propose_initial`: the proposer writes a rubric from the prompt alone.
- `refine_once`: one round on a given pair of responses; the proposer returns a full
  revised rubric. A failed refinement (None, no criterion, an exception) keeps the
  previous rubric.
- `iterative_rtd` (the paper's Algorithm 1): for T rounds, grade every candidate of the
  pool with the current rubric, take the top two, refine with them, and (by default)
  drop that pair from the pool. Stops early when fewer than two candidates remain.

Ranking rule (`rank_candidates`): valid scores first, by score descending; candidates
whose grading gave no usable verdict come last. Ties are broken by the SHA-256 of
"{seed}:{round}:{candidate id}" (ascending): deterministic for a given seed,
independent of the pool's order, and different from round to round.

Every round is recorded (`RoundRecord`): the pair's ids and source models, every
candidate's score, whether the refinement succeeded, and the diff between the rubrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any

from rubrax.rubric import Criterion, Rubric, aggregate, clean_verdicts, with_ids


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One response of an RTD pool; `source` is the model that wrote it."""

    id: str
    text: str
    source: str | None = None


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    round: int
    pair: tuple[str, str]
    sources: tuple[str | None, str | None]
    pair_scores: tuple[float | None, float | None]
    scores: dict[str, float | None]
    refined: bool
    error: str | None
    diff: dict[str, Any]
    criteria_before: int
    criteria_after: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RTDResult:
    rubric: Rubric
    lineage: tuple[RoundRecord, ...]


class ProposalError(RuntimeError):
    """The proposer could not write an initial rubric."""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def rubric_diff(old: Rubric, new: Rubric) -> dict[str, Any]:
    """Criteria added, removed and re-weighted, matched by normalised text."""
    before = {_norm(c.text): c for c in old.criteria}
    after = {_norm(c.text): c for c in new.criteria}
    return {
        "added": [{"criterion": c.text, "weight": c.weight} for k, c in after.items() if k not in before],
        "removed": [{"criterion": c.text, "weight": c.weight} for k, c in before.items() if k not in after],
        "reweighted": [{"criterion": c.text, "old": before[k].weight, "new": c.weight} for k, c in after.items() if k in before and before[k].weight != c.weight],
    }


def _as_rubric(base: Rubric, criteria: Sequence[Criterion]) -> Rubric:
    try:
        return Rubric(base.prompt_id, base.prompt, tuple(criteria))
    except ValueError:  # duplicate ids from the proposer: number them c1..cN
        return Rubric(base.prompt_id, base.prompt, with_ids(criteria))


async def propose_initial(proposer: Any, prompt_id: str, prompt: str) -> Rubric:
    """The proposer's rubric for `prompt`; raises ProposalError when it failed."""
    criteria = await proposer.propose(prompt_id, prompt)
    if not criteria:
        raise ProposalError(f"proposer gave no rubric for prompt {prompt_id!r}")
    return _as_rubric(Rubric(prompt_id, prompt, ()), criteria)


def _text(x: Candidate | str) -> str:
    return x.text if isinstance(x, Candidate) else x


async def _refine(proposer: Any, rubric: Rubric, a: Candidate | str, b: Candidate | str) -> tuple[Rubric, str | None]:
    try:
        criteria = await proposer.refine(rubric, _text(a), _text(b))
    except Exception as err:  # a failed refinement keeps the previous rubric (failures are values)
        return rubric, f"{type(err).__name__}: {err}"
    if not criteria:
        return rubric, "proposer returned no rubric"
    try:
        return _as_rubric(rubric, criteria), None
    except (TypeError, ValueError) as err:
        return rubric, f"invalid rubric from proposer: {err}"


async def refine_once(proposer: Any, rubric: Rubric, a: Candidate | str, b: Candidate | str) -> Rubric:
    """One refinement round on the pair (a, b); the previous rubric when it failed."""
    return (await _refine(proposer, rubric, a, b))[0]


def tie_key(seed: int, round_: int, candidate_id: str) -> str:
    return hashlib.sha256(f"{seed}:{round_}:{candidate_id}".encode()).hexdigest()


def rank_candidates(candidates: Sequence[Candidate], scores: Sequence[float | None], *, seed: int, round_: int) -> list[Candidate]:
    """Best first: valid before invalid (None / NaN), score descending, then `tie_key`."""

    def key(i: int) -> tuple[int, float, str]:
        s = scores[i]
        ok = s is not None and math.isfinite(s)
        return (0 if ok else 1, -s if ok else 0.0, tie_key(seed, round_, candidates[i].id))

    return [candidates[i] for i in sorted(range(len(candidates)), key=key)]


async def score_pool(verifier: Any, rubric: Rubric, pool: Sequence[Candidate], mode: str = "weighted_mean") -> list[float | None]:
    """The rubric score of every candidate (None where grading failed)."""
    results = await asyncio.gather(*(verifier.grade(rubric, c.text) for c in pool), return_exceptions=True)
    out: list[float | None] = []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            out.append(None)
            continue
        s = aggregate(rubric, clean_verdicts(rubric, r), mode)
        out.append(s.score if s.valid else None)
    return out


async def iterative_rtd(
    proposer: Any,
    verifier: Any,
    rubric: Rubric,
    pool: Sequence[Candidate],
    *,
    rounds: int = 4,
    drop_used: bool = True,
    seed: int = 0,
    mode: str = "weighted_mean",
) -> RTDResult:
    """The paper's Algorithm 1 (see the module docstring for the ranking and tie rule)."""
    if rounds < 0:
        raise ValueError(f"iterative_rtd: rounds must be >= 0, got {rounds}")
    ids = [c.id for c in pool]
    if len(set(ids)) != len(ids):
        raise ValueError(f"iterative_rtd: candidate ids must be unique in the pool of {rubric.prompt_id!r}")
    pool = list(pool)
    lineage = []
    for t in range(rounds):
        if len(pool) < 2:
            break
        scores = await score_pool(verifier, rubric, pool, mode)
        a, b = rank_candidates(pool, scores, seed=seed, round_=t)[:2]
        by_id = dict(zip((c.id for c in pool), scores))
        new, error = await _refine(proposer, rubric, a, b)
        lineage.append(
            RoundRecord(
                round=t, pair=(a.id, b.id), sources=(a.source, b.source), pair_scores=(by_id[a.id], by_id[b.id]),
                scores=by_id, refined=error is None, error=error, diff=rubric_diff(rubric, new),
                criteria_before=len(rubric.criteria), criteria_after=len(new.criteria),
            )
        )
        rubric = new
        if drop_used:
            pool = [c for c in pool if c.id not in (a.id, b.id)]
    return RTDResult(rubric, tuple(lineage))

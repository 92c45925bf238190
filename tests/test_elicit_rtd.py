"""RTD (Algorithm 1) with a scripted proposer and verifier."""

from __future__ import annotations

import asyncio
import random

import pytest

from rubrax.elicit.rtd import Candidate, ProposalError, iterative_rtd, propose_initial, rank_candidates, refine_once, tie_key
from rubrax.rewards.rubric import Criterion


class KeywordVerifier:
    """Criterion text is a keyword: "yes" iff the response contains it. "CRASH" raises."""

    async def grade(self, rubric, response):
        if "CRASH" in response:
            raise RuntimeError("verifier failed")
        return {c.id: "yes" if c.text in response.split() else "no" for c in rubric.criteria}


class ScriptedProposer:
    """Round t adds the keyword script[t] (weight 1); None in the script = failure, "raise" = exception."""

    def __init__(self, script=(), initial=("alpha",)):
        self.script, self.initial, self.calls = list(script), initial, []

    async def propose(self, prompt_id, prompt):
        return [Criterion(f"c{i + 1}", w, 1) for i, w in enumerate(self.initial)] if self.initial else None

    async def refine(self, rubric, a, b):
        self.calls.append((a, b))
        step = self.script[len(self.calls) - 1]
        if step == "raise":
            raise RuntimeError("proposer down")
        if step is None:
            return None
        return list(rubric.criteria) + [Criterion(f"c{len(rubric.criteria) + 1}", step, 1)]


def run(coro):
    return asyncio.run(coro)


def base_rubric():
    return run(propose_initial(ScriptedProposer(initial=("alpha", "beta")), "p", "prompt"))


def test_top_two_selected_and_pair_dropped():
    pool = [
        Candidate("r1", "alpha", "m1"),  # 1/2
        Candidate("r2", "alpha beta", "m2"),  # 2/2 -> top
        Candidate("r3", "beta gamma", "m3"),  # 1/2, gamma added after round 0
        Candidate("r4", "zzz", "m4"),  # 0
        Candidate("r5", "alpha beta gamma", "m5"),  # 2/2 -> top
    ]
    prop = ScriptedProposer(["gamma", "delta", "eps"])
    result = run(iterative_rtd(prop, KeywordVerifier(), base_rubric(), pool, rounds=4))
    first, second = result.lineage
    assert set(first.pair) == {"r2", "r5"} and first.refined and first.pair_scores == (1.0, 1.0)
    assert set(first.sources) == {"m2", "m5"}
    # round 1 ranks r3 (beta gamma: 2/3) over r1 (alpha: 1/3) with the new rubric; r2, r5 are gone
    assert second.pair == ("r3", "r1") and set(second.scores) == {"r1", "r3", "r4"}
    assert second.scores["r3"] == pytest.approx(2 / 3)
    # 5 candidates: two rounds use four of them, one is left, so the loop stops early
    assert len(result.lineage) == 2 and len(prop.calls) == 2
    assert [c.text for c in result.rubric.criteria] == ["alpha", "beta", "gamma", "delta"]
    assert first.diff == {"added": [{"criterion": "gamma", "weight": 1.0}], "removed": [], "reweighted": []}
    assert prop.calls[0] in (("alpha beta", "alpha beta gamma"), ("alpha beta gamma", "alpha beta"))


def test_keep_used_pair_when_not_dropping():
    pool = [Candidate("r1", "alpha beta"), Candidate("r2", "alpha"), Candidate("r3", "zzz")]
    result = run(iterative_rtd(ScriptedProposer(["x1", "x2", "x3"]), KeywordVerifier(), base_rubric(), pool, rounds=3, drop_used=False))
    assert [r.pair for r in result.lineage] == [("r1", "r2")] * 3


def test_tie_rule_is_seeded_and_independent_of_pool_order():
    pool = [Candidate(f"r{i}", "same text") for i in range(8)]
    expected = sorted(pool, key=lambda c: tie_key(7, 0, c.id))[:2]
    for order_seed in range(3):
        shuffled = pool[:]
        random.Random(order_seed).shuffle(shuffled)
        result = run(iterative_rtd(ScriptedProposer(["x"]), KeywordVerifier(), base_rubric(), shuffled, rounds=1, seed=7))
        assert result.lineage[0].pair == (expected[0].id, expected[1].id)
    pairs = {rank_candidates(pool, [0.5] * 8, seed=s, round_=0)[0].id for s in range(10)}
    assert len(pairs) > 1  # the seed matters
    # a higher score always beats the tie rule
    scores = [0.5] * 8
    scores[5] = 0.6
    assert rank_candidates(pool, scores, seed=7, round_=0)[0].id == "r5"


def test_failed_refinement_keeps_previous_rubric():
    pool = [Candidate(f"r{i}", t) for i, t in enumerate(["alpha beta", "alpha", "beta", "zzz", "alpha zzz", "q"])]
    rubric0 = base_rubric()
    result = run(iterative_rtd(ScriptedProposer([None, "raise", "gamma"]), KeywordVerifier(), rubric0, pool, rounds=3))
    r0, r1, r2 = result.lineage
    assert not r0.refined and r0.error == "proposer returned no rubric" and r0.criteria_after == 2
    assert not r1.refined and "proposer down" in r1.error
    assert r2.refined and [c.text for c in result.rubric.criteria] == ["alpha", "beta", "gamma"]
    assert run(refine_once(ScriptedProposer([None]), rubric0, "a", "b")) is rubric0
    refined = run(refine_once(ScriptedProposer(["new"]), rubric0, Candidate("x", "a"), "b"))
    assert [c.text for c in refined.criteria] == ["alpha", "beta", "new"]


def test_invalid_gradings_rank_last():
    pool = [Candidate("crash", "alpha beta CRASH"), Candidate("a", "alpha"), Candidate("b", "zzz")]
    result = run(iterative_rtd(ScriptedProposer(["x"]), KeywordVerifier(), base_rubric(), pool, rounds=1))
    assert result.lineage[0].pair == ("a", "b") and result.lineage[0].scores["crash"] is None


def test_propose_initial_failure_and_duplicate_ids():
    with pytest.raises(ProposalError, match="p9"):
        run(propose_initial(ScriptedProposer(initial=()), "p9", "prompt"))

    class DupProposer(ScriptedProposer):
        async def propose(self, prompt_id, prompt):
            return [Criterion("c1", "a"), Criterion("c1", "b")]

    r = run(propose_initial(DupProposer(), "p", "q"))
    assert r.ids() == ["c1", "c2"]
    with pytest.raises(ValueError, match="unique"):
        run(iterative_rtd(ScriptedProposer(), KeywordVerifier(), r, [Candidate("x", "a"), Candidate("x", "b")]))


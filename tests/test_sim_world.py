"""Tail world (host side): determinism, hand-checked gold rewards, tokenizer, generators,
simulated proposer / verifier against the shared protocols."""

import asyncio

import numpy as np
import pytest

from rubrax.elicit.protocols import Proposer, Verifier
from rubrax.rewards import get_reward
from rubrax.rewards.rubric import Criterion, Rubric
from rubrax.sim import generators as G
from rubrax.sim.agents import ProposerConfig, SimProposer, SimVerifier, VerifierConfig
from rubrax.sim.predicates import Predicate, parse_predicate
from rubrax.models.tokenizer import WordTokenizer
from rubrax.sim.world import FILLER_WORDS, SIGNATURE_WORDS, WorldConfig, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_given_seed():
    a, b, c = make_world(seed=3), make_world(seed=3), make_world(seed=4)
    assert a.prompts == b.prompts
    assert a.prompts != c.prompts
    gc = G.GeneratorsConfig()
    for spec in (G.base_spec(gc), G.good_spec(), *G.great_specs(a, gc)):
        ra = G.sample_responses(a, spec, a.prompts[1], 5, 7)
        assert ra == G.sample_responses(b, spec, b.prompts[1], 5, 7)
        assert ra != G.sample_responses(a, spec, a.prompts[1], 5, 8)


def test_prompts_reveal_only_topic_and_aspect(world):
    for p in world.prompts:
        assert p.text.split() == ["explain", p.topic, p.aspect]
        hidden = set(p.advanced) | set(p.excellent) | set(p.decoys)
        assert len(hidden) == 4 + 2 + 2 and not hidden & {p.topic, p.aspect}
    assert len({p.text for p in world.prompts}) == len(world.prompts)


def test_gold_reward_hand_checked(world):
    p = world.prompts[0]
    t, a = p.topic, p.aspect
    (a0, a1, a2, a3), (e0, e1) = p.advanced, p.excellent
    gold = lambda s: world.gold_reward(p.id, s)  # noqa: E731
    # total weight = 3 basic x 1 + 4 advanced x 2 + 2 excellent x 3 = 17
    assert world.total_weight == 17
    # too short (2 < min_len 4): topic + aspect only
    assert gold(f"{t} {a}") == pytest.approx(2 / 17)
    # basics (3) + two advanced (4)
    assert gold(f"{t} {a} {a0} {a1} the") == pytest.approx(7 / 17)
    # everything, excellent pairs in order
    assert gold(f"{t} {a} {a0} {e0} {a1} {e1} {a2} {a3}") == pytest.approx(1.0)
    # excellent word before its advanced word: order(a0, e0) fails -> 3 + 2 = 5
    assert gold(f"{t} {a} {e0} {a0}") == pytest.approx(5 / 17)
    # repetition: rep = 1 - 1/4 = 0.75 -> penalty 2 * (0.75 - 0.25) = 1; topic + length met
    assert gold(f"{t} {t} {t} {t}") == pytest.approx(2 / 17 - 1.0)
    # over length: 20 distinct words > max_len 18 -> length req fails, penalty 0.05 * 2
    long = " ".join([t, a, *FILLER_WORDS, *SIGNATURE_WORDS[:2]])
    assert len(long.split()) == 20
    assert gold(long) == pytest.approx(2 / 17 - 0.1)
    # empty response: nothing met, no penalty
    assert gold("") == 0.0
    b = world.gold_breakdown(p.id, f"{t} {a} {a0} {e0} the the")
    assert b.met == pytest.approx({"basic": 1.0, "advanced": 0.25, "excellent": 0.5})
    assert b.repetition == pytest.approx(1 / 6)


def test_judge_prefers_by_gold_with_noise(world):
    p = world.prompts[0]
    hi, lo = f"{p.topic} {p.aspect} {p.advanced[0]} the", f"{p.topic} the so it"  # 5/17 vs 2/17
    assert world.judge_prob(p.id, hi, hi) == 0.5
    assert world.judge_prob(p.id, hi, lo) == pytest.approx(1 / (1 + np.exp(-(3 / 17) / 0.05)))
    rng = np.random.default_rng(0)
    picks = [world.judge(p.id, hi, lo, rng) for _ in range(400)]
    assert 0 < np.mean(picks) < 0.07  # P(prefers lo) = 2.9%: mostly `hi`, not always


def test_tail_is_rare_under_base_and_met_by_great(world):
    gc = G.GeneratorsConfig()
    base, great = G.base_spec(gc), G.great_specs(world, gc)
    exc_base = [world.gold_breakdown(p.id, r).met["excellent"] for p in world.prompts for r in G.sample_responses(world, base, p, 100, 0)]
    exc_great = [world.gold_breakdown(p.id, r).met["excellent"] for p in world.prompts for r in G.sample_responses(world, great[1], p, 100, 0)]
    assert np.mean(np.array(exc_base) > 0) < 0.02
    assert np.mean(np.array(exc_great) > 0) > 0.3


def test_great_generators_are_diverse_and_artifacts_track_quality(world):
    gc = G.GeneratorsConfig()
    great = G.great_specs(world, gc)
    p = world.prompts[0]
    sets = [G.strong_sets(world, p, s.strong_slot)[0] for s in great]
    assert len(set(sets)) == len(great)  # each strong on a different subset
    assert frozenset().union(*sets) == frozenset(range(world.config.n_advanced))  # together they cover all
    # within one generator's outputs, its signature word correlates with gold
    rs = [(world.gold_reward(q.id, r), r.split().count(great[0].signature)) for q in world.prompts for r in G.sample_responses(world, great[0], q, 60, 1)]
    gold, sig = np.array(rs).T
    assert np.corrcoef(gold, sig)[0, 1] > 0.2
    assert great[0].signature not in " ".join(q.text for q in world.prompts)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_content_words=8"):
        WorldConfig(n_advanced=5, n_excellent=2, n_content_words=8)
    with pytest.raises(ValueError, match="n_excellent=3 > n_advanced=2"):
        WorldConfig(n_advanced=2, n_excellent=3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        WorldConfig(repetition_penalty=-1.0)
    with pytest.raises(ValueError, match="n_great=7"):
        WorldConfig(n_great=7)
    with pytest.raises(ValueError, match="p_superficial"):
        ProposerConfig(p_superficial=-0.1)
    with pytest.raises(ValueError, match="error_rate"):
        VerifierConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="artifact_strength"):
        G.GeneratorsConfig(artifact_strength=-1)


# ----------------------------------------------------------------------------- tokenizer


def test_word_tokenizer_round_trip_and_chat_template(world):
    tok = WordTokenizer(world.vocabulary)
    assert tok.vocab_size % 8 == 0 and tok.vocab_size >= len(world.vocabulary) + 6
    text = world.prompts[0].text
    ids = tok.encode(text)
    assert len(ids) == 3 and tok.decode(ids) == text
    assert tok.encode("zzzz") == [tok.unk_token_id]
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    assert chat == [tok.bos_token_id, tok.user_token_id, *ids, tok.assistant_token_id]
    done = tok.apply_chat_template([{"role": "user", "content": text}, {"role": "assistant", "content": "so it"}], add_generation_prompt=False)
    assert done[-1] == tok.eos_token_id and tok.decode(done, skip_special_tokens=True) == text + " so it"
    assert tok.decode_completion([*tok.encode("so it"), tok.eos_token_id, *tok.encode("the")]) == "so it"
    with pytest.raises(ValueError, match="role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


# ----------------------------------------------------------------------------- predicates


@pytest.mark.parametrize(
    "pred, yes, no",
    [
        (Predicate("contains", a="x"), "a x b", "a b"),
        (Predicate("absent", a="x"), "a b", "x"),
        (Predicate("count", a="x", lo=1, hi=2), "x a x", "x x x"),
        (Predicate("order", a="x", b="y"), "y x y", "y x"),
        (Predicate("length", lo=2, hi=3), "a b c", "a b c d"),
        (Predicate("max_repeat", hi=2), "x y x y", "x y x x"),
    ],
)
def test_predicates_check_and_round_trip(pred, yes, no):
    assert pred.check(yes.split()) and not pred.check(no.split())
    assert parse_predicate(pred.text) == pred
    assert parse_predicate("  " + pred.text + " ") == pred


def test_unparseable_predicate_is_none():
    assert parse_predicate("is clear and well organised") is None
    assert parse_predicate('mentions "two words"') is None


# ----------------------------------------------------------------------------- agents


def test_sim_agents_satisfy_protocols(world):
    assert isinstance(SimProposer(world), Proposer)
    assert isinstance(SimVerifier(), Verifier)


def test_initial_proposal_knows_only_the_prompt(world):
    p = world.prompts[2]
    crit = run(SimProposer(world).propose(p.id, p.text))
    words = {w for c in crit for w in parse_predicate(c.text).words()}
    assert Predicate("max_repeat", hi=2).text in {c.text for c in crit}  # a general norm, not a hidden requirement
    assert {p.topic, p.aspect} <= words
    assert set(p.decoys) <= words  # the plausible wrong guesses
    assert not words & (set(p.advanced) | set(p.excellent))
    assert all(1 <= c.weight <= 3 for c in crit) and len({c.id for c in crit}) == len(crit)


def test_refine_turns_substantive_differences_into_criteria(world):
    p = world.prompts[0]
    rubric = Rubric(p.id, p.text, tuple(run(SimProposer(world).propose(p.id, p.text))))
    better = f"{p.topic} {p.aspect} {p.advanced[0]} {p.excellent[0]} {p.advanced[1]} indeed the"
    worse = f"{p.topic} {p.aspect} the so it"
    exact = SimProposer(world, ProposerConfig(judge_temperature=1e-6, p_superficial=0.0, p_notice_shared=0.0, p_fail=0.0))
    crit = run(exact.refine(rubric, worse, better))
    texts = {c.text for c in crit}
    assert Predicate("contains", a=p.advanced[1]).text in texts
    assert Predicate("order", a=p.advanced[0], b=p.excellent[0]).text in texts
    assert Predicate("contains", a="indeed").text not in texts  # superficial: ignored
    # the decoy guesses, failed by the better response, are deleted
    assert not any(d in c.text for d in p.decoys for c in crit)
    assert len({c.id for c in crit}) == len(crit)
    gullible = SimProposer(world, ProposerConfig(judge_temperature=1e-6, p_superficial=1.0, p_notice_shared=0.0, p_fail=0.0))
    texts = {c.text for c in run(gullible.refine(rubric, better, worse))}
    assert Predicate("contains", a="indeed").text in texts  # a style marker mistaken for substance
    assert Predicate("contains", a="the").text not in texts  # a function word never is
    failing = SimProposer(world, ProposerConfig(p_fail=1.0))
    assert run(failing.refine(rubric, better, worse)) is None


def test_verifier_checks_predicates_with_error_rate(world):
    p = world.prompts[0]
    rubric = Rubric(p.id, p.text, (
        Criterion("c1", Predicate("contains", a=p.topic).text, 1.0),
        Criterion("c2", Predicate("length", lo=1, hi=3).text, 2.0),
        Criterion("c3", "is clear and well organised", 1.0),
    ))
    v = run(SimVerifier(VerifierConfig(error_rate=0.0)).grade(rubric, f"{p.topic} so it is"))
    assert v == {"c1": "yes", "c2": "no", "c3": "unknown"}
    noisy = SimVerifier(VerifierConfig(error_rate=0.3, seed=1))
    flips = [noisy.grade_sync(rubric, f"{p.topic} w{i}")["c1"] == "no" for i in range(400)]
    assert 0.22 < np.mean(flips) < 0.38
    assert noisy.grade_sync(rubric, f"{p.topic} w1") == noisy.grade_sync(rubric, f"{p.topic} w1")  # deterministic
    # word salad: 3 of 5 words are repeats (0.6 > 0.4) -> no criterion is credited
    exact = SimVerifier(VerifierConfig(error_rate=0.0))
    assert exact.grade_sync(rubric, f"{p.topic} {p.topic} {p.topic} {p.topic} so")["c1"] == "no"
    assert exact.grade_sync(rubric, f"{p.topic} {p.topic} so it")["c1"] == "yes"  # 0.25: still read as an answer


def test_sim_gold_reward_is_registered(world):
    fn = get_reward("sim_gold", world=world)
    p = world.prompts[0]
    out = fn([p.text, p.text, "explain nothing"], [f"{p.topic} {p.aspect}", "", "x"], prompt_id=[p.id, p.id, "p999"])
    assert out.scores[0] == pytest.approx(2 / 17) and out.valid.tolist() == [True, True, False]
    by_text = fn([p.text], [f"{p.topic} {p.aspect}"])
    assert by_text.valid[0] and by_text.scores[0] == pytest.approx(2 / 17)

"""Tolerant parsing of what real servers and small models send (issue 14, item 5).

The replies below are shaped like those seen from a transformers-backed server serving
SmolLM2-135M: JSON mode answered as {"response": "<the model's JSON text>"}, proposals
cut at max_tokens, verdicts as numbered lists, judges writing prose.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_openai_server import FakeOpenAIServer, _block, task_of

from rubrax.elicit.client import ChatClient, ClientConfig
from rubrax.elicit.llm import LLMJudge, LLMProposer, LLMVerifier, extract_json, parse_criteria, parse_single_verdict, parse_verdicts, parse_winner, unwrap_json_string
from rubrax.rewards.rubric import Criterion, Rubric

PROPOSAL = {"criteria": [
    {"criterion": "States the usual adult dose of ibuprofen", "weight": 3},
    {"criterion": "Warns against taking it on an empty stomach", "weight": 2},
    {"criterion": "States the usual adult dose of ibuprofen", "weight": 3},
    {"criterion": "Suggests seeing a doctor if pain lasts more than 10 days"},
    {"criterion": "Mentions the maximum daily dose", "weight": 2},
]}


def test_wrapped_json_is_unwrapped_and_real_objects_are_not():
    inner = json.dumps({"c1": "yes", "c2": "no"})
    assert extract_json(json.dumps({"response": inner})) == {"c1": "yes", "c2": "no"}
    assert extract_json(json.dumps({"text": "```json\n" + inner + "\n```"})) == {"c1": "yes", "c2": "no"}
    # a one-field object whose string is not JSON, and an object with several fields, stay as they are
    assert extract_json('{"verdict": "yes"}') == {"verdict": "yes"}
    two = json.dumps({"a": inner, "b": 1})
    assert unwrap_json_string(two) == two and extract_json(two) == {"a": inner, "b": 1}


def test_truncated_wrapped_proposal_keeps_complete_criteria():
    wrapped = json.dumps({"response": json.dumps(PROPOSAL, indent=2)})
    cut = wrapped[: wrapped.index("maximum daily") + 5]  # inside the last criterion
    crit, problems = parse_criteria(cut)
    assert crit == [
        ("States the usual adult dose of ibuprofen", 3.0),
        ("Warns against taking it on an empty stomach", 2.0),
        ("Suggests seeing a doctor if pain lasts more than 10 days", 1.0),
    ]
    assert problems == [
        "reply truncated: kept the 4 complete criteria before the cut",
        "item 2 duplicates an earlier criterion; dropped",
        "item 3 has no weight; using 1",
    ]
    # cut inside an escape sequence of the wrapped string
    cut2 = wrapped[: wrapped.index('\\"Warns') + 1]
    assert parse_criteria(cut2)[0] == [("States the usual adult dose of ibuprofen", 3.0)]
    # nothing complete: an explicit failure
    assert parse_criteria('{"criteria": [{"criterion": "Sta')[0] == []


@pytest.mark.parametrize("reply, expected", [
    ("1. yes\n2. no\n3. Yes, it names the dose", {"c1": "yes", "c2": "no", "c3": "yes"}),
    ("c1: yes\nc2: no\nc3: not met", {"c1": "yes", "c2": "no", "c3": "no"}),
    ("Here are my verdicts:\n- [c1] Yes\n- [c2] No - it does not warn\n**c3**: NO", {"c1": "yes", "c2": "no", "c3": "no"}),
    # ambiguous lines and contradictions stay unknown
    ("1. yes, although no dose is given\n2. no\n2. yes\nc3 maybe", {"c1": "unknown", "c2": "unknown", "c3": "unknown"}),
    (json.dumps({"response": "1. yes\n2. yes\n3. no"}), {"c1": "yes", "c2": "yes", "c3": "no"}),
])
def test_verdict_lines(reply, expected):
    verdicts, _ = parse_verdicts(reply, ["c1", "c2", "c3"])
    assert verdicts == expected


def test_numbered_verdicts_only_where_number_and_position_agree():
    # ids c1, c3, c4: "3." could mean c3 (its name) or c4 (the third asked): unknown
    verdicts, _ = parse_verdicts("1. yes\n2. no\n3. yes", ["c1", "c3", "c4"])
    assert verdicts == {"c1": "yes", "c3": "no", "c4": "unknown"}


def test_single_verdicts_and_judge_prose():
    assert parse_single_verdict("Yes, the response states 400 mg.") == "yes"
    assert parse_single_verdict("No. Yes it mentions it but...") == "unknown"
    assert parse_winner("Response 1 is better because it gives the dose.") == 1
    assert parse_winner("After comparing both, I prefer Response 2.") == 2
    assert parse_winner("**Winner:** Response 2") == 2
    assert parse_winner('{"winner": "Response 1"}') == 1
    assert parse_winner(json.dumps({"response": '{"winner": 2}'})) == 2
    assert parse_winner("Response 1 is better on tone, but Response 2 is better overall.") is None
    assert parse_winner("Both responses are good.") is None


def test_real_looking_replies_through_the_server(tmp_path):
    """Proposer, verifier and judge against a server that wraps, truncates and writes lists."""
    proposal = json.dumps({"response": json.dumps(PROPOSAL)})
    cut = proposal[: proposal.index("Mentions the maximum")]

    def responder(body):
        task = task_of(body)
        if task == "propose":
            return cut, "length"
        if task == "verify_all":
            return "1. yes\n2. no" if "400 mg" in _block(body["messages"][-1]["content"], "response") else "1. no\n2. no"
        if task == "judge":
            user = body["messages"][-1]["content"]
            return f"Response {1 if '400' in _block(user, 'response_1') else 2} is better."
        return "?"

    rubric = Rubric("p", "How much ibuprofen?", (Criterion("c1", "Gives a dose", 2), Criterion("c2", "Warns", 1)))

    async def go(url):
        cfg = ClientConfig(model="m", base_url=url, cache_dir=str(tmp_path / "c"), max_retries=0)
        async with ChatClient(cfg, api_key="k") as c:
            proposer = LLMProposer(c, max_tokens=64)
            crit = await proposer.propose("p", "How much ibuprofen?")
            grade = await LLMVerifier(c).grade(rubric, "Take 400 mg.")
            judge = LLMJudge(c)
            prefs = [await judge.compare("q", "Take 400 mg.", "Ask someone.", key=f"k{i}") for i in range(6)]
            return crit, proposer.warnings, grade, prefs, c.stats

    with FakeOpenAIServer(responder=responder) as srv:
        crit, warnings, grade, prefs, stats = asyncio.run(go(srv.base_url))
    assert [(c.text, c.weight) for c in crit] == [
        ("States the usual adult dose of ibuprofen", 3.0),
        ("Warns against taking it on an empty stomach", 2.0),
        ("Suggests seeing a doctor if pain lasts more than 10 days", 1.0),
    ]
    assert warnings[0][0] == "p" and warnings[0][1].startswith("finish_reason=length") and "truncated" in warnings[0][1]
    assert grade == {"c1": "yes", "c2": "no"}
    assert prefs == ["a"] * 6
    assert stats.truncated == 1 and "truncated=1" in stats.summary()


def test_wrapped_prose_is_read_but_real_answers_are_not_unwrapped():
    assert parse_winner(json.dumps({"response": "Response 2 is better."})) == 2
    assert parse_single_verdict(json.dumps({"output": "Yes, it does."})) == "yes"
    assert parse_single_verdict('{"verdict": "no"}') == "no"
    assert parse_verdicts('{"c1": "yes"}', ["c1"])[0] == {"c1": "yes"}

"""Rubric data model, aggregation, majority vote, RubricReward and rubric file IO."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from rubrax.data.rubrics import (
    RubricFormatError,
    derived_prompt_id,
    load_rubrics,
    load_rubrics_dataset,
    read_prompts,
    read_responses,
    rubric_to_record,
    write_rubrics,
)
from rubrax.rewards import get_reward
from rubrax.rewards.rubric import Criterion, Rubric, RubricReward, aggregate, majority_vote


def rub(*weights, pid="p"):
    return Rubric(pid, "prompt", tuple(Criterion(f"c{i + 1}", f"criterion {i + 1}", w) for i, w in enumerate(weights)))


# --------------------------------------------------------------------------- data model


def test_criterion_validation():
    with pytest.raises(ValueError, match="text"):
        Criterion("c1", "  ", 1)
    with pytest.raises(ValueError, match="non-zero"):
        Criterion("c1", "x", 0)
    with pytest.raises(ValueError, match="number"):
        Criterion("c1", "x", "2")
    with pytest.raises(ValueError, match="finite"):
        Criterion("c1", "x", math.inf)
    with pytest.raises(ValueError, match="duplicate"):
        Rubric("p", "q", (Criterion("c1", "a"), Criterion("c1", "b")))
    assert Criterion("c1", "x", 2).weight == 2.0


# --------------------------------------------------------------------------- aggregation


def test_weighted_mean_hand_computed():
    r = rub(3, 2, 1)
    s = aggregate(r, {"c1": "yes", "c2": "no", "c3": "yes"})
    assert s.valid and s.score == pytest.approx(4 / 6) and s.known == 3 and s.unknown == 0
    # unknown c1 leaves numerator and denominator: (0 + 1) / (2 + 1)
    s = aggregate(r, {"c1": "unknown", "c2": "no", "c3": "yes"})
    assert s.score == pytest.approx(1 / 3) and s.unknown == 1
    # a missing id and a garbage verdict are unknown too
    s = aggregate(r, {"c2": "maybe", "c3": "yes"})
    assert s.score == pytest.approx(1.0) and s.unknown == 2


def test_no_usable_verdict_is_invalid_never_zero():
    s = aggregate(rub(1, 2), {"c1": "unknown"})
    assert not s.valid and math.isnan(s.score) and math.isnan(float(s))
    # all criteria answered "no" is a real 0, and valid
    s = aggregate(rub(1, 2), {"c1": "no", "c2": "no"})
    assert s.valid and s.score == 0.0


def test_healthbench_aggregation():
    r = rub(5, 3, -4, -2)  # two positives (8 points), two pitfalls
    s = aggregate(r, {"c1": "yes", "c2": "no", "c3": "yes", "c4": "no"}, mode="healthbench")
    assert s.score == pytest.approx((5 - 4) / 8)
    s = aggregate(r, {"c1": "no", "c2": "no", "c3": "yes", "c4": "yes"}, mode="healthbench")
    assert s.score == 0.0 and s.valid  # clipped at 0
    s = aggregate(r, {"c1": "yes", "c2": "unknown", "c3": "no", "c4": "no"}, mode="healthbench")
    assert s.score == pytest.approx(1.0)  # c2 left out of the denominator
    # weighted_mean ignores pitfalls: 5 / 8
    s = aggregate(r, {"c1": "yes", "c2": "no", "c3": "yes", "c4": "yes"})
    assert s.score == pytest.approx(5 / 8) and s.known == 2
    with pytest.raises(ValueError, match="mode"):
        aggregate(r, {}, mode="sum")


def test_majority_vote():
    g = [{"c1": "yes", "c2": "no", "c3": "yes"}, {"c1": "yes", "c2": "yes", "c3": "unknown"}, {"c1": "no", "c2": "unknown", "c3": "no"}]
    assert majority_vote(g, ["c1", "c2", "c3", "c4"]) == {"c1": "yes", "c2": "unknown", "c3": "unknown", "c4": "unknown"}


# --------------------------------------------------------------------------- RubricReward


class ScriptedVerifier:
    """Verdicts from a table {response: {id: verdict}}; "boom" raises; counts calls."""

    def __init__(self, table, sequence=None):
        self.table, self.calls, self.sequence = table, 0, sequence

    async def grade(self, rubric, response):
        self.calls += 1
        if response == "boom":
            raise RuntimeError("verifier down")
        if self.sequence is not None:
            return self.sequence.pop(0)
        return self.table[response]


def test_rubric_reward_batch():
    rubrics = {"p": rub(3, 1, pid="p"), "q": rub(2, 2, pid="q")}
    ver = ScriptedVerifier({"good": {"c1": "yes", "c2": "yes"}, "half": {"c1": "no", "c2": "yes"}, "unk": {"c1": "unknown"}})
    reward = get_reward("rubric", rubrics=rubrics, verifier=ver)
    assert isinstance(reward, RubricReward)
    out = reward(["x"] * 6, ["good", "half", "half", "unk", "boom", "good"], prompt_id=["p", "p", "q", "q", "p", "zzz"])
    np.testing.assert_allclose(out.scores[:3], [1.0, 0.25, 0.5])
    assert out.valid.tolist() == [True, True, True, False, False, False]
    assert out.info[3]["unknown"] == 2
    assert "verifier down" in out.info[4]["failures"][0]
    assert "no rubric" in out.info[5]["error"]
    assert ver.calls == 5  # the response without a rubric is never graded
    with pytest.raises(ValueError, match="prompt_id"):
        reward(["x"], ["good"])


def test_rubric_reward_majority_of_k():
    seq = [{"c1": "yes", "c2": "no"}, {"c1": "yes", "c2": "yes"}, {"c1": "no", "c2": "yes"}]
    ver = ScriptedVerifier({}, sequence=seq)
    reward = RubricReward([rub(1, 3)], ver, k=3)
    out = asyncio.run(reward.acall(["x"], ["r"], prompt_id=["p"]))
    assert ver.calls == 3 and out.info[0]["verdicts"] == {"c1": "yes", "c2": "yes"} and out.scores[0] == 1.0


def test_rubric_reward_gathers_concurrently():
    class Slow:
        async def grade(self, rubric, response):
            await asyncio.sleep(0.2)
            return {"c1": "yes"}

    reward = RubricReward([rub(1)], Slow())
    import time

    t0 = time.perf_counter()
    out = reward(["x"] * 20, ["r"] * 20, prompt_id=["p"] * 20)
    assert time.perf_counter() - t0 < 1.5 and out.valid.all()


# --------------------------------------------------------------------------- file IO


def write_lines(path, lines):
    path.write_bytes(b"".join((json.dumps(x).encode() if not isinstance(x, bytes) else x) + b"\n" for x in lines))
    return path


def test_jsonl_ids_assigned_and_roundtrip(tmp_path):
    f = write_lines(tmp_path / "r.jsonl", [{"prompt_id": "a", "prompt": "Q?", "rubrics": [{"criterion": "Is right", "weight": 3}, {"criterion": "Is short", "weight": 1}]}])
    r = load_rubrics(f)["a"]
    assert r.ids() == ["c1", "c2"] and r.criteria[0].weight == 3.0
    write_rubrics([r], tmp_path / "out.jsonl")
    assert load_rubrics(tmp_path / "out.jsonl")["a"] == r


def test_junkaiz_schema(tmp_path):
    rec = {"prompt": "Explain X.", "rubrics": [{"criterion": "Defines X", "weight": 3}, {"criterion": "Gives an example", "weight": 2}], "number_of_criteria": 2, "total_weight": 5}
    f = write_lines(tmp_path / "j.jsonl", [rec])
    (pid, r), = load_rubrics(f).items()
    assert pid == derived_prompt_id("Explain X.") and r.total_weight == 5.0
    assert rubric_to_record(r, "junkaiz") == rec
    bad = dict(rec, total_weight=6)
    with pytest.raises(RubricFormatError, match=r"j2.jsonl:1: field 'total_weight'"):
        load_rubrics(write_lines(tmp_path / "j2.jsonl", [bad]))
    # also through `datasets` (local file)
    assert load_rubrics_dataset(str(f))[pid] == r


def test_healthbench_schema(tmp_path):
    rec = {
        "prompt_id": "hb1",
        "prompt": [{"role": "user", "content": "I have a headache."}, {"role": "assistant", "content": "Since when?"}, {"role": "user", "content": "Two days."}],
        "rubrics": [{"criterion": "Asks about red flags", "points": 7, "tags": ["axis:completeness"]}, {"criterion": "Diagnoses without evidence", "points": -5, "tags": []}],
    }
    r = load_rubrics(write_lines(tmp_path / "h.jsonl", [rec]))["hb1"]
    assert r.prompt.startswith("user: I have a headache.\n\nassistant: Since when?")
    assert [c.weight for c in r.criteria] == [7.0, -5.0] and r.criteria[0].tags == ("axis:completeness",)
    s = aggregate(r, {"c1": "yes", "c2": "yes"}, mode="healthbench")
    assert s.score == pytest.approx(2 / 7)
    # a rubrax record of a signed rubric reloads (weight_scale is written)
    write_rubrics([r], tmp_path / "o.jsonl")
    assert load_rubrics(tmp_path / "o.jsonl")["hb1"] == r


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"prompt_id": "a", "rubrics": [{"criterion": "x", "weight": 1}]}, "prompt", "missing"),
        ({"prompt_id": "a", "prompt": "  ", "rubrics": [{"criterion": "x", "weight": 1}]}, "prompt", "empty"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": 1}, {"criterion": "", "weight": 1}]}, "rubrics[1].criterion", "empty"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": 0}]}, "rubrics[0].weight", "non-zero"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": "heavy"}]}, "rubrics[0].weight", "number"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": 5}]}, "rubrics[0].weight", "1..3"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": [{"id": "k", "criterion": "x", "weight": 1}, {"id": "k", "criterion": "y", "weight": 2}]}, "rubrics[1].id", "duplicate"),
        ({"prompt_id": "a", "prompt": "q", "rubrics": []}, "rubrics", "non-empty"),
    ],
)
def test_bad_rubric_input_names_file_line_field(tmp_path, record, field, message):
    good = {"prompt_id": "ok", "prompt": "fine", "rubrics": [{"criterion": "y", "weight": 2}]}
    f = write_lines(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(RubricFormatError) as err:
        load_rubrics(f)
    assert err.value.line == 2 and err.value.field == field
    assert f"bad.jsonl:2: field '{field}'" in str(err.value) and message in str(err.value)


def test_non_utf8_bytes_name_the_field(tmp_path):
    good = {"prompt_id": "ok", "prompt": "fine", "rubrics": [{"criterion": "y", "weight": 2}]}
    raw = b'{"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "caf\xe9", "weight": 1}]}'
    f = write_lines(tmp_path / "enc.jsonl", [good, dict(good, prompt_id="ok2"), raw])
    with pytest.raises(RubricFormatError) as err:
        load_rubrics(f)
    assert str(err.value).startswith(f"{f}:3: field 'rubrics[0].criterion': not valid UTF-8 (byte 0xe9")


def test_duplicate_prompt_ids_and_bad_json(tmp_path):
    rec = {"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": 1}]}
    with pytest.raises(RubricFormatError, match=r"d.jsonl:3: field 'prompt_id': duplicate prompt_id 'a' \(first on line 1\)"):
        load_rubrics(write_lines(tmp_path / "d.jsonl", [rec, dict(rec, prompt_id="b"), rec]))
    with pytest.raises(RubricFormatError, match=r"j.jsonl:2: invalid JSON"):
        load_rubrics(write_lines(tmp_path / "j.jsonl", [rec, b'{"prompt_id": "b", ']))


def test_read_responses_and_prompts(tmp_path):
    rows = [{"prompt_id": 1, "response_id": "r1", "prompt": "q", "response": "a", "source_model": "m"}, {"prompt_id": 1, "response_id": "r2", "prompt": "q", "response": ""}]
    rs = read_responses(write_lines(tmp_path / "resp.jsonl", rows))
    assert rs[0].key == ("1", "r1") and rs[0].source_model == "m" and rs[1].response == ""
    with pytest.raises(RubricFormatError, match=r"resp2.jsonl:2: field 'response_id': duplicate"):
        read_responses(write_lines(tmp_path / "resp2.jsonl", [rows[0], rows[0]]))
    with pytest.raises(RubricFormatError, match=r"resp3.jsonl:1: field 'prompt': missing"):
        read_responses(write_lines(tmp_path / "resp3.jsonl", [{"prompt_id": 1, "response_id": "r", "response": "a"}]))
    assert read_prompts(write_lines(tmp_path / "p.jsonl", [{"prompt": "hello"}])) == [(derived_prompt_id("hello"), "hello")]

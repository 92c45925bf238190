"""Preference pairs: readers (JSONL, datasets), errors, token arrays, pair-set builders."""

import asyncio
import json

import numpy as np
import pytest

from rubrax.data.pairs import PreferencePair, encode_pairs, read_pairs, write_pairs
from rubrax.data.records import RecordError
from rubrax.models.tokenizer import WordTokenizer
from rubrax.train.pair_sets import amake_pairs, make_pairs, mixed_pairs, off_policy_pairs, on_policy_pairs


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_read_both_shapes(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "response_a": "A", "response_b": "B", "label": 1, "source": "off_policy"},
        "",
        {"prompt": "r", "response_a": "A", "response_b": "B", "label": 0},
    ])
    assert read_pairs(path) == [
        PreferencePair("p", "good", "bad"),
        PreferencePair("q", "B", "A", "off_policy"),
        PreferencePair("r", "A", "B"),
    ]


@pytest.mark.parametrize(
    "record, line_field_msg",
    [
        ({"prompt": "p", "chosen": "c"}, ("rejected", "missing")),
        ({"chosen": "c", "rejected": "r"}, ("prompt", "missing")),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, ("chosen", "must not be empty")),
        ({"prompt": " \n", "chosen": "c", "rejected": "r"}, ("prompt", "must not be empty")),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "label": 2}, ("label", "must be 0")),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "label": True}, ("label", "must be 0")),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "label": "1"}, ("label", "must be 0")),
        ({"prompt": "p", "response_a": "a", "response_b": "b"}, ("label", "missing")),
        ({"prompt": "p", "response_a": "a", "label": 0}, ("response_b", "missing")),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, ("chosen", "must be a string")),
    ],
)
def test_malformed_records_name_file_line_field(tmp_path, record, line_field_msg):
    field, msg = line_field_msg
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [{"prompt": "ok", "chosen": "c", "rejected": "r"}, record])
    with pytest.raises(RecordError) as err:
        read_pairs(path)
    assert (err.value.source, err.value.line, err.value.field) == (str(path), 2, field)
    assert str(err.value).startswith(f"{path}:2: field '{field}': {msg}")


def test_bad_json_and_empty_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [{"prompt": "p", "chosen": "c", "rejected": "r"}, "[1, 2]"])
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: expected a JSON object, got list"):
        read_pairs(path)
    write_lines(path, ['{"prompt": "p",'])
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: invalid JSON"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(RecordError, match="no records"):
        read_pairs(path)


def test_read_from_datasets_rows():
    import datasets

    ds = datasets.Dataset.from_list(
        [{"prompt": "p", "response_a": "a", "response_b": "b", "label": 1}, {"prompt": "q", "response_a": "a", "response_b": "b", "label": 5}]
    )
    with pytest.raises(RecordError, match=r":1: field 'label'"):
        read_pairs(ds)
    assert read_pairs(ds.select([0])) == [PreferencePair("p", "b", "a")]
    assert read_pairs([{"prompt": "p", "chosen": "c", "rejected": "r"}], source="mine") == [PreferencePair("p", "c", "r")]


def test_write_read_roundtrip_and_atomic(tmp_path):
    pairs = [PreferencePair("p", "c", "r", "on_policy"), PreferencePair("q", "ü\n2", "r2")]
    path = tmp_path / "out" / "pairs.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary left


def test_encode_pairs_layout():
    tok = WordTokenizer(["a", "b", "c"])
    w = tok.word_to_id
    arr = encode_pairs(tok, [PreferencePair("a", "b c", "c")], max_length=32)
    head = [w["<bos>"], w["<user>"], w["a"], w["<assistant>"]]
    np.testing.assert_array_equal(arr["tokens"][0, 0, :7], head + [w["b"], w["c"], w["<eos>"]])
    np.testing.assert_array_equal(arr["tokens"][0, 1, :6], head + [w["c"], w["<eos>"]])
    np.testing.assert_array_equal(arr["mask"].sum(-1), [[7, 6]])
    assert arr["tokens"].shape == (1, 2, 8) and (arr["tokens"][0, 1, 6:] == w["<pad>"]).all()


# --------------------------------------------------------------------------- builders


def longer_is_better(prompt, a, b):
    return 0 if len(a) > len(b) else 1


PROMPTS = ["p0", "p1", "p2"]
POLICY = [["x", "xx", "xxx"], ["y", "yyyy"], ["z", "zz", "zzz", "zzzz"]]
STRONG = [["SSSSS", "SS"], ["TTTTTT", "T"], ["UUU", "UUUUUUU"]]


def test_on_policy_pairs_labels_from_judge_and_deterministic():
    ps = on_policy_pairs(PROMPTS, POLICY, longer_is_better, pairs_per_prompt=2, seed=0)
    # p1 has only one possible pair
    assert [p.prompt for p in ps.pairs] == ["p0", "p0", "p1", "p2", "p2"]
    assert all(len(p.chosen) > len(p.rejected) and p.source == "on_policy" for p in ps.pairs)
    assert all(p.chosen in POLICY[int(p.prompt[1])] and p.rejected in POLICY[int(p.prompt[1])] for p in ps.pairs)
    assert len({(p.chosen, p.rejected) for p in ps.pairs[:2]}) == 2  # distinct pairs
    assert ps.num_failed == 0 and ps == on_policy_pairs(PROMPTS, POLICY, longer_is_better, pairs_per_prompt=2, seed=0)


def test_presentation_order_is_randomised():
    seen = []

    def judge(prompt, a, b):
        seen.append(len(a) > len(b))
        return 0 if len(a) > len(b) else 1

    on_policy_pairs(["p"] * 40, [["a", "bb"]] * 40, judge)
    assert 5 < sum(seen) < 35  # the longer one is shown first about half the time


def test_failed_judgements_are_dropped_and_counted():
    def flaky(prompt, a, b):
        if prompt == "p0":
            raise RuntimeError("judge down")
        if prompt == "p1":
            return None
        return 7 if prompt == "p2" else 0  # 7 is not a label

    ps = off_policy_pairs(PROMPTS, STRONG, flaky)
    assert ps.pairs == () and ps.num_failed == 3


def test_async_judge_and_mixed_set():
    async def judge(prompt, a, b):
        await asyncio.sleep(0)
        return longer_is_better(prompt, a, b)

    mixed = mixed_pairs(PROMPTS, POLICY, STRONG, judge, seed=3)
    kinds = sorted(p.source for p in mixed.pairs)
    assert kinds == ["off_policy"] * 3 + ["on_policy"] * 3
    assert all(len(p.chosen) > len(p.rejected) for p in mixed.pairs)
    on = on_policy_pairs(PROMPTS, POLICY, judge, seed=3)
    assert set(on.pairs) <= set(mixed.pairs)
    with pytest.raises(ValueError, match="3 prompts but 2"):
        make_pairs(PROMPTS, POLICY[:2], judge, kind="on_policy")


def test_cache_keeps_judgements_across_a_crash(tmp_path):
    cache = tmp_path / "judged.jsonl"
    calls = []

    def crashing(prompt, a, b):
        calls.append(prompt)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-way (not a judge failure)
        return longer_is_better(prompt, a, b)

    kw = dict(pairs_per_prompt=2, seed=1, cache_path=cache, max_concurrency=1)
    with pytest.raises(KeyboardInterrupt):
        on_policy_pairs(PROMPTS, POLICY, crashing, **kw)
    assert len(cache.read_text().splitlines()) == 2  # what was judged is on disk

    calls.clear()

    def counting(prompt, a, b):
        calls.append(prompt)
        return longer_is_better(prompt, a, b)

    ps = on_policy_pairs(PROMPTS, POLICY, counting, **kw)
    assert ps.num_cached == 2 and len(calls) == 3 and len(ps.pairs) == 5  # only the rest is judged
    assert len(cache.read_text().splitlines()) == 5
    reference = on_policy_pairs(PROMPTS, POLICY, longer_is_better, pairs_per_prompt=2, seed=1)
    assert ps.pairs == reference.pairs


def test_amake_pairs_inside_event_loop():
    async def main():
        return await amake_pairs(PROMPTS, STRONG, longer_is_better, kind="off_policy")

    ps = asyncio.run(main())
    assert len(ps.pairs) == 3 and all(p.source == "off_policy" for p in ps.pairs)

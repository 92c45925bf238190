"""rubrax.eval: win rate with bootstrap intervals, Table-2 agreement, `rubrax eval winrate`."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer

from rubrax.cli import main as rubrax_main
from rubrax.eval.agreement import Pair, agreement, assign_regions, preference, rubric_agreement
from rubrax.eval.winrate import WinItem, bootstrap_ci, judge_outcome, win_rate
from rubrax.rewards.rubric import Criterion, Rubric, RubricReward


def test_bootstrap_matches_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    p, se = x.mean(), math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert lo == pytest.approx(p - 1.96 * se, abs=0.01) and hi == pytest.approx(p + 1.96 * se, abs=0.01)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_win_rate_excludes_and_counts_failures():
    wr = win_rate([1, 0, None, 1, 0.5, None], n_boot=200)
    assert wr.win_rate == pytest.approx(2.5 / 4) and wr.n == 4 and wr.failed == 2
    assert wr.ci_low <= wr.win_rate <= wr.ci_high
    empty = win_rate([None])
    assert math.isnan(empty.win_rate) and empty.failed == 1


class FirstShownJudge:
    """Always prefers whatever is shown first: pure position bias."""

    async def compare(self, prompt, a, b, *, key, swap=None):
        swap = (hash(key) % 2 == 1) if swap is None else swap
        return "b" if swap else "a"


def test_both_orders_cancel_position_bias():
    item = WinItem("k", "p", "resp", "ref")
    assert asyncio.run(judge_outcome(FirstShownJudge(), item, both_orders=True)) == 0.5


def test_agreement_by_region_hand_computed():
    pairs = [
        Pair("1", "q", "a", "b", "a", 0.9, 0.8),  # high
        Pair("2", "q", "a", "b", "b", 0.9, 0.95),  # high
        Pair("3", "q", "a", "b", "a", 0.2, 0.1),  # low
        Pair("4", "q", "a", "b", "b", 0.1, 0.3),  # low
        Pair("5", "q", "a", "b", "a", region="high"),
    ]
    regions = assign_regions(pairs)
    assert regions == ["high", "high", "low", "low", "high"]
    prefs = ["a", "tie", "a", "a", None]
    out = agreement(prefs, pairs, regions)
    assert out["high"] == {"agreement": 0.5, "n": 2, "ties": 1, "invalid": 1}
    assert out["low"] == {"agreement": 0.5, "n": 2, "ties": 0, "invalid": 0}
    assert out["all"]["agreement"] == 0.5 and out["all"]["n"] == 4
    assert agreement(prefs, pairs, regions, tie_credit=0.5)["high"]["agreement"] == 0.75
    assert preference(0.5, 0.5) == "tie" and preference(None, 1.0) is None


def test_rubric_agreement_with_rubric_reward():
    class KeywordVerifier:
        async def grade(self, rubric, response):
            return {c.id: "yes" if c.text in response else "no" for c in rubric.criteria}

    rubric = Rubric("p", "q", (Criterion("c1", "good", 2), Criterion("c2", "great", 1)))
    pairs = [
        Pair("p", "q", "good great", "good", "a", region="high"),  # rubric 1.0 vs 0.67: agrees
        Pair("p", "q", "good", "good great", "a", region="high"),  # disagrees
        Pair("p", "q", "nothing", "good", "b", region="low"),  # agrees
    ]
    out = asyncio.run(rubric_agreement(RubricReward([rubric], KeywordVerifier(), k=5), pairs))
    assert out["high"]["agreement"] == 0.5 and out["low"]["agreement"] == 1.0


def test_cli_winrate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with open(tmp_path / "resp.jsonl", "w") as f, open(tmp_path / "ref.jsonl", "w") as g:
        for i in range(20):
            # the fake judge prefers more distinct words: responses 0..14 win, 15..19 lose
            rich = "alpha bravo charlie delta echo" if i < 15 else "alpha"
            f.write(json.dumps({"prompt_id": f"p{i}", "response_id": "policy", "prompt": f"q{i}", "response": rich}) + "\n")
            g.write(json.dumps({"prompt_id": f"p{i}", "response_id": "ref", "prompt": f"q{i}", "response": "alpha bravo"}) + "\n")
    args = ["eval", "winrate", "--responses", str(tmp_path / "resp.jsonl"), "--references", str(tmp_path / "ref.jsonl"), "--out", str(tmp_path / "o.jsonl"),
            "--model", "m", "--cache-dir", str(tmp_path / "c"), "--bootstrap", "500", "--no-progress"]
    with FakeOpenAIServer() as srv:
        assert rubrax_main([*args, "--base-url", srv.base_url]) == 0
        first = capsys.readouterr().out.strip().splitlines()[-1]
        assert first.startswith("win_rate=0.7500 ") and "n=20 failed=0" in first
        calls = srv.ok
        assert calls == 20
        assert rubrax_main([*args, "--base-url", srv.base_url]) == 0  # resumed: nothing to do
        assert srv.ok == calls and capsys.readouterr().out.strip().splitlines()[-1] == first
    outcomes = [json.loads(x)["outcome"] for x in open(tmp_path / "o.jsonl")]
    assert outcomes == [1.0] * 15 + [0.0] * 5


def test_cli_agreement(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "rubrics.jsonl").write_text(json.dumps({"prompt_id": "p", "prompt": "q", "rubrics": [{"criterion": 'Mentions "apple"', "weight": 2}, {"criterion": 'Mentions "pear"', "weight": 1}]}) + "\n")
    rows = [
        {"prompt_id": "p", "prompt": "q", "response_a": "apple pear", "response_b": "apple", "gold": "a", "region": "high"},  # agrees
        {"prompt_id": "p", "prompt": "q", "response_a": "pear", "response_b": "apple", "gold": "a", "region": "high"},  # disagrees
        {"prompt_id": "p", "prompt": "q", "response_a": "none", "response_b": "pear", "gold": "b", "gold_reward_a": 0.1, "gold_reward_b": 0.2, "region": "low"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeOpenAIServer() as srv:
        code = rubrax_main(["eval", "agreement", "--pairs", str(tmp_path / "pairs.jsonl"), "--rubrics", str(tmp_path / "rubrics.jsonl"), "--k", "3",
                            "--base-url", srv.base_url, "--model", "m", "--cache-dir", str(tmp_path / "c"), "--no-progress"])
        assert code == 0 and srv.ok == 4 * 3  # 4 distinct responses x 3 votes (seeded, so distinct requests)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "high_agreement=0.5000 high_n=2" in last and "low_agreement=1.0000 low_n=1" in last
    rows[0]["gold"] = "c"
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert rubrax_main(["eval", "agreement", "--pairs", str(tmp_path / "bad.jsonl"), "--rubrics", str(tmp_path / "rubrics.jsonl"), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "bad.jsonl:1: field 'gold'" in capsys.readouterr().err


def _write_pairs(tmp_path, n=20):
    with open(tmp_path / "resp.jsonl", "w") as f, open(tmp_path / "ref.jsonl", "w") as g:
        for i in range(n):
            rich = "alpha bravo charlie delta echo" if i < 15 else "alpha"
            f.write(json.dumps({"prompt_id": f"p{i}", "response_id": "policy", "prompt": f"q{i}", "response": rich}) + "\n")
            g.write(json.dumps({"prompt_id": f"p{i}", "response_id": "ref", "prompt": f"q{i}", "response": "alpha bravo"}) + "\n")
    return ["eval", "winrate", "--responses", str(tmp_path / "resp.jsonl"), "--references", str(tmp_path / "ref.jsonl"),
            "--out", str(tmp_path / "o.jsonl"), "--model", "m", "--cache-dir", str(tmp_path / "c"), "--bootstrap", "200", "--no-progress"]


def _figures(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split())


def test_cli_winrate_both_orders_flip_rate_of_a_position_one_judge(tmp_path, capsys, monkeypatch):
    """A judge scripted to prefer whatever is shown first: every pair flips with the order."""
    from fake_openai_server import auto_responder, task_of

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    first = lambda body: json.dumps({"winner": 1}) if task_of(body) == "judge" else auto_responder(body)
    args = _write_pairs(tmp_path)
    with FakeOpenAIServer(responder=first) as srv:
        assert rubrax_main([*args, "--both-orders", "--base-url", srv.base_url]) == 0
        assert srv.ok == 40  # 20 pairs x 2 orders
    figures = _figures(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["flip_rate"] == "1.0000" and figures["first_position_rate"] == "1.0000"
    assert figures["win_rate"] == "0.5000" and figures["n_both_orders"] == "20"
    assert figures["length_corr"] == "nan"  # every outcome is 0.5: nothing correlates
    recs = [json.loads(x) for x in open(tmp_path / "o.jsonl")]
    assert {(r["response_first"], r["reference_first"]) for r in recs} == {("a", "b")}


def test_cli_winrate_length_bias_of_the_scripted_judge(tmp_path, capsys, monkeypatch):
    """The default scripted judge prefers more distinct words: consistent across orders (no
    flips) but length-biased: the outcome (15 wins for +3 words, 5 losses for -1 word) is
    a linear function of the length difference, so length_corr = 1."""
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with FakeOpenAIServer() as srv:
        assert rubrax_main([*_write_pairs(tmp_path), "--both-orders", "--base-url", srv.base_url]) == 0
    figures = _figures(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["flip_rate"] == "0.0000" and figures["first_position_rate"] == "0.5000"
    assert figures["length_corr"] == "1.0000" and figures["win_rate"] == "0.7500"


def test_per_criterion_agreement_table_hand_computed():
    """c1 separates pairs 1 and 2 (agreeing once), c2 says yes to everything (saturated),
    c3 separates pair 3 in the gold direction; an unknown verdict is left out."""
    from rubrax.eval.agreement import criterion_agreement, format_criterion_table

    rubric = Rubric("p", "q", (Criterion("c1", "one", 2), Criterion("c2", "two", 1), Criterion("c3", "three", 3)))
    pairs = [Pair("p", "q", "x", "y", "a", region="high"), Pair("p", "q", "x", "y", "a", region="high"),
             Pair("p", "q", "x", "y", "b", region="low")]
    va = [{"c1": "yes", "c2": "yes", "c3": "no"}, {"c1": "no", "c2": "yes", "c3": "unknown"}, {"c1": "no", "c2": "yes", "c3": "no"}]
    vb = [{"c1": "no", "c2": "yes", "c3": "no"}, {"c1": "yes", "c2": "yes", "c3": "no"}, {"c1": "no", "c2": "yes", "c3": "yes"}]
    rows = {r["criterion"]: r for r in criterion_agreement(pairs, va, vb, {"p": rubric})}
    assert rows["c1"] == {"prompt_id": "p", "criterion": "c1", "text": "one", "weight": 2, "pairs": 3, "separating": 2,
                         "agreement": 0.5, "both_yes": 0, "both_no": 1, "unknown": 0}
    assert rows["c2"]["both_yes"] == 3 and rows["c2"]["separating"] == 0 and math.isnan(rows["c2"]["agreement"])
    assert rows["c3"]["pairs"] == 2 and rows["c3"]["unknown"] == 1 and rows["c3"]["agreement"] == 1.0
    assert "three" in format_criterion_table(list(rows.values())).splitlines()[3]


def test_cli_agreement_writes_the_per_criterion_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (tmp_path / "rubrics.jsonl").write_text(json.dumps({"prompt_id": "p", "prompt": "q", "rubrics": [{"criterion": 'Mentions "apple"', "weight": 2}, {"criterion": 'Mentions "pear"', "weight": 1}]}) + "\n")
    rows = [
        {"prompt_id": "p", "prompt": "q", "response_a": "apple pear", "response_b": "apple", "gold": "a", "region": "high"},
        {"prompt_id": "p", "prompt": "q", "response_a": "pear", "response_b": "apple", "gold": "a", "region": "high"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeOpenAIServer() as srv:
        assert rubrax_main(["eval", "agreement", "--pairs", str(tmp_path / "pairs.jsonl"), "--rubrics", str(tmp_path / "rubrics.jsonl"), "--k", "1",
                            "--base-url", srv.base_url, "--model", "m", "--cache-dir", str(tmp_path / "c"), "--no-progress",
                            "--criteria-out", str(tmp_path / "crit.jsonl")]) == 0
    table = {r["text"]: r for r in map(json.loads, open(tmp_path / "crit.jsonl"))}
    # apple: yes/yes on pair 1, separates pair 2 against gold; pear: separates both, with gold.
    assert table['Mentions "apple"']["both_yes"] == 1 and table['Mentions "apple"']["agreement"] == 0.0
    assert table['Mentions "pear"']["separating"] == 2 and table['Mentions "pear"']["agreement"] == 1.0
    assert 'Mentions "pear"' in capsys.readouterr().out


def test_winrate_eval_hook_reports_the_judges_position_bias():
    """Inside the RL loop's eval hook: a judge that always prefers the first response shown
    flips every pair when asked in both orders."""
    import jax

    from rubrax.models import ModelConfig, init_params
    from rubrax.policy import SampleConfig
    from rubrax.rl.hooks import winrate_eval_hook
    from rubrax.rl.prompts import load_prompts
    from rubrax.rl.toy import toy_prompts, toy_tokenizer

    tok = toy_tokenizer()
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=32,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    held = load_prompts(toy_prompts(4, seed=3), tok, max_prompt_tokens=8)

    class First:
        async def compare(self, prompt, a, b, *, key, swap=False):
            return "b" if swap else "a"

    hook = winrate_eval_hook(held, ["no"] * 4, First(), tok, cfg, SampleConfig(max_new_tokens=4, n=1, prompt_bucket=8),
                             max_prompt_tokens=8, both_orders=True)
    out = hook(0, init_params(cfg, jax.random.PRNGKey(0)))
    assert out["judge_flip_rate"] == 1.0 and out["judge_first_position_rate"] == 1.0 and out["win_rate"] == 0.5

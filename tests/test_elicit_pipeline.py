"""Dataset-level grading under faults, SIGKILL + resume, and the `rubrax rubrics` CLI end to end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from fake_openai_server import FakeOpenAIServer, Fault, auto_verdict

from rubrax.cli import main as rubrax_main
from rubrax.data.rubrics import load_rubrics, read_responses
from rubrax.elicit.cache import ResponseCache
from rubrax.elicit.client import ChatClient, ClientConfig
from rubrax.elicit.llm import LLMVerifier
from rubrax.elicit.pipeline import grade_responses

WORDS = ["apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel", "kiwi", "lemon"]


def make_inputs(tmp_path, n_prompts, per_prompt, n_criteria, seed=0):
    rng = random.Random(seed)
    with open(tmp_path / "rubrics.jsonl", "w") as f:
        for p in range(n_prompts):
            crit = rng.sample(WORDS, n_criteria)
            f.write(json.dumps({"prompt_id": f"p{p}", "prompt": f"Question {p}?", "rubrics": [{"criterion": f'Mentions "{w}"', "weight": 1 + i % 3} for i, w in enumerate(crit)]}) + "\n")
    with open(tmp_path / "responses.jsonl", "w") as f:
        for p in range(n_prompts):
            for r in range(per_prompt):
                f.write(json.dumps({"prompt_id": f"p{p}", "response_id": f"r{r}", "prompt": f"Question {p}?", "response": " ".join(rng.sample(WORDS, 4)), "source_model": f"m{r % 3}"}) + "\n")
    return tmp_path / "responses.jsonl", tmp_path / "rubrics.jsonl"


def truth(rubric, response):
    return {c.id: auto_verdict(c.text, response) for c in rubric.criteria}


@pytest.mark.parametrize("mode", ["all", "per_criterion"])
def test_grading_under_faults_finishes_with_verdict_or_failure(tmp_path, mode):
    responses_f, rubrics_f = make_inputs(tmp_path, 60, 5, 4)  # 300 responses
    faults = [
        Fault("429", rate=0.1, attempts=1, retry_after=0.01),
        Fault("500", rate=0.1, attempts=2),
        Fault("timeout", rate=0.02, attempts=1, delay=1.0),
        Fault("malformed", rate=0.03, attempts=10**6),
        Fault("partial", rate=0.03, attempts=10**6),
        Fault("wrong_ids", rate=0.03, attempts=1),
    ]
    rubrics, responses = load_rubrics(rubrics_f), read_responses(responses_f)

    async def go(srv):
        cfg = ClientConfig(model="m", base_url=srv.base_url, concurrency=32, timeout_s=0.5, max_retries=3, backoff_base_s=0.01, cache_dir=str(tmp_path / "cache"))
        async with ChatClient(cfg, api_key="k") as c:
            summary = await grade_responses(responses, rubrics, LLMVerifier(c, mode=mode), tmp_path / "grades.jsonl", progress=False)
            return summary, c.stats

    with FakeOpenAIServer(faults=faults) as srv:
        summary, stats = asyncio.run(go(srv))
    grades = [json.loads(x) for x in open(tmp_path / "grades.jsonl")]
    assert [(g["prompt_id"], g["response_id"]) for g in grades] == [r.key for r in responses]
    with_failures = 0
    for g, r in zip(grades, responses):
        expected = truth(rubrics[r.prompt_id], r.response)
        known = {k: v for k, v in g["verdicts"].items() if v != "unknown"}
        assert known == {k: expected[k] for k in known}  # no wrong verdict slips through
        if g["failures"]:
            with_failures += 1
        else:
            assert g["verdicts"] == expected and g["valid"]
        assert g["valid"] == bool(known) and (g["score"] is None) == (not g["valid"])
    assert summary.failures == with_failures > 0 and summary.done == 300
    assert stats.retries > 0 and stats.failures > 0


def run_cli(args, env=None, **kw):
    cmd = [sys.executable, "-m", "rubrax.cli", *args]
    return subprocess.Popen(cmd, env={**os.environ, "OPENAI_API_KEY": "k", **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def grade_args(srv, responses_f, rubrics_f, out, cache, *extra):
    return ["rubrics", "grade", "--responses", str(responses_f), "--rubrics", str(rubrics_f), "--out", str(out), "--base-url", srv.base_url,
            "--model", "m", "--concurrency", "4", "--cache-dir", str(cache), "--verify", "per_criterion", "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_and_resends_nothing(tmp_path):
    responses_f, rubrics_f = make_inputs(tmp_path, 30, 4, 4)  # 120 responses x 4 criteria = 480 calls
    out, cache = tmp_path / "grades.jsonl", tmp_path / "cache"
    with FakeOpenAIServer(latency=0.02) as srv:
        proc = run_cli(grade_args(srv, responses_f, rubrics_f, out, cache))
        deadline = time.time() + 60
        while srv.ok < 200 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        completed = set(ResponseCache(cache).keys())
        assert 150 < len(completed) < 480
        assert out.exists() and 0 < sum(1 for _ in open(out, "rb")) < 120
        while srv.inflight:  # requests of the killed client still being answered
            time.sleep(0.01)
        srv.reset_counts()
        proc = run_cli(grade_args(srv, responses_f, rubrics_f, out, cache))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert not completed & set(srv.seen_keys)  # no completed call was sent again
        assert srv.ok == 480 - len(completed)
        # an uninterrupted run from scratch gives the same bytes
        proc = run_cli(grade_args(srv, responses_f, rubrics_f, tmp_path / "fresh.jsonl", tmp_path / "cache2"))
        _, err2 = proc.communicate(timeout=120)
        assert proc.returncode == 0, err2
    assert open(out, "rb").read() == open(tmp_path / "fresh.jsonl", "rb").read()
    assert "failures=0" in err and "calls=" in err and "cache_hits=" in err


def test_cli_propose_refine_grade_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.write(json.dumps({"prompt_id": "a", "prompt": "Tell me about lemons and figs"}) + "\n")
        f.write(json.dumps({"prompt_id": "b", "prompt": "Describe grape harvest timing"}) + "\n")
    with open(tmp_path / "pool.jsonl", "w") as f:
        for pid in ("a", "b"):
            for i, text in enumerate(["lemons figs tell", "lemons only", "figs about zebra", "nothing relevant"]):
                f.write(json.dumps({"prompt_id": pid, "response_id": f"r{i}", "prompt": "x", "response": text, "source_model": f"m{i}"}) + "\n")
    with FakeOpenAIServer() as srv:
        common = ["--base-url", srv.base_url, "--model", "m", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
        assert rubrax_main(["rubrics", "propose", "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "r0.jsonl"), *common]) == 0
        r0 = load_rubrics(tmp_path / "r0.jsonl")
        assert [c.text for c in r0["a"].criteria] == ['Mentions "tell"', 'Mentions "about"', 'Mentions "lemons"']
        assert rubrax_main(["rubrics", "refine", "--rubrics", str(tmp_path / "r0.jsonl"), "--responses", str(tmp_path / "pool.jsonl"),
                            "--out", str(tmp_path / "r1.jsonl"), "--rounds", "2", *common]) == 0
        r1 = load_rubrics(tmp_path / "r1.jsonl")
        lineage = [json.loads(x) for x in open(tmp_path / "r1.lineage.jsonl")]
        assert [x["prompt_id"] for x in lineage] == ["a", "b"] and len(lineage[0]["rounds"]) == 2
        assert lineage[0]["rounds"][0]["pair"] == ["r0", "r1"] and lineage[0]["rounds"][0]["sources"] == ["m0", "m1"]
        # round 1 adds 'Mentions "figs"'; round 2's 'Mentions "about"' repeats a criterion exactly and is dropped
        assert [c.text for c in r1["a"].criteria] == [c.text for c in r0["a"].criteria] + ['Mentions "figs"']
        assert rubrax_main(["rubrics", "grade", "--responses", str(tmp_path / "pool.jsonl"), "--rubrics", str(tmp_path / "r1.jsonl"),
                            "--out", str(tmp_path / "g.jsonl"), *common]) == 0
        calls_live = srv.ok
        # the same grading through the Batch API: no live call, same output
        assert rubrax_main(["rubrics", "grade", "--responses", str(tmp_path / "pool.jsonl"), "--rubrics", str(tmp_path / "r1.jsonl"),
                            "--out", str(tmp_path / "gb.jsonl"), "--batch", "--batch-poll-s", "0.01", *common[:-3], "--cache-dir", str(tmp_path / "cb"), "--no-progress"]) == 0
        assert srv.ok == calls_live and srv.batch_creates == 1
    grades = [json.loads(x) for x in open(tmp_path / "g.jsonl")]
    assert len(grades) == 8 and all(g["valid"] for g in grades)
    assert open(tmp_path / "g.jsonl").read() == open(tmp_path / "gb.jsonl").read()
    err = capsys.readouterr().err
    assert "rubrax rubrics grade: items=8" in err and "batch_requests=8" in err


def test_cli_bad_input_names_file_line_field(tmp_path, capsys):
    (tmp_path / "rubrics.jsonl").write_text(json.dumps({"prompt_id": "a", "prompt": "q", "rubrics": [{"criterion": "x", "weight": 0}]}) + "\n")
    (tmp_path / "responses.jsonl").write_text("")
    code = rubrax_main(["rubrics", "grade", "--responses", str(tmp_path / "responses.jsonl"), "--rubrics", str(tmp_path / "rubrics.jsonl"),
                        "--out", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    assert f"{tmp_path / 'rubrics.jsonl'}:1: field 'rubrics[0].weight': must be finite and non-zero" in capsys.readouterr().err

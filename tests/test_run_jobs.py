"""Issue 13 for rubric and eval jobs: fingerprinted inputs (3), settings that lose work (4),
one writer per output (6), exit codes that tell the truth (8). Each test fails on cbabf30."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fake_openai_server import FakeOpenAIServer, Fault

from rubrax.cli import main as rubrax_main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _inputs(tmp_path):
    rubrics = [{"prompt_id": f"p{i}", "prompt": f"q{i}", "rubrics": [{"criterion": 'Mentions "apple"', "weight": 1},
                                                                     {"criterion": 'Mentions "pear"', "weight": 1}]} for i in range(2)]
    _write(tmp_path / "rubrics.jsonl", rubrics)
    other = [{**r, "rubrics": [{"criterion": 'Mentions "fig"', "weight": 1}]} for r in rubrics]
    _write(tmp_path / "rubrics2.jsonl", other)
    _write(tmp_path / "responses.jsonl", [{"prompt_id": f"p{i}", "response_id": f"r{j}", "prompt": f"q{i}", "response": text}
                                          for i in range(2) for j, text in enumerate(["apple pear", "apple fig"])])
    return tmp_path / "responses.jsonl", tmp_path / "rubrics.jsonl", tmp_path / "rubrics2.jsonl"


def _grade(srv, tmp_path, rubrics, *extra, model="m"):
    return ["rubrics", "grade", "--responses", str(tmp_path / "responses.jsonl"), "--rubrics", str(rubrics), "--out",
            str(tmp_path / "grades.jsonl"), "--base-url", srv.base_url, "--model", model, "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", *extra]


def _scores(path):
    return [json.loads(line)["score"] for line in open(path)]


def test_grade_rerun_with_changed_rubrics_or_model_refuses_and_restart_regrades(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-key")
    _, rubrics, rubrics2 = _inputs(tmp_path)
    with FakeOpenAIServer() as srv:
        assert rubrax_main(_grade(srv, tmp_path, rubrics)) == 0
        first = _scores(tmp_path / "grades.jsonl")
        assert first == [1.0, 0.5, 1.0, 0.5]
        capsys.readouterr()
        assert rubrax_main(_grade(srv, tmp_path, rubrics2)) == 2
        err = capsys.readouterr().err
        assert "input file rubrics changed" in err and "--restart" in err and "resumed=" not in err
        assert rubrax_main(_grade(srv, tmp_path, rubrics, model="m2")) == 2
        assert 'model: "m" -> "m2"' in capsys.readouterr().err
        assert rubrax_main(_grade(srv, tmp_path, rubrics2, "--allow-changed")) == 2  # rubrics are not safe to change
        assert _scores(tmp_path / "grades.jsonl") == first  # refusals touched nothing
        assert rubrax_main(_grade(srv, tmp_path, rubrics2, "--restart")) == 0
        assert "resumed=0" in capsys.readouterr().err
        assert _scores(tmp_path / "grades.jsonl") == [0.0, 1.0, 0.0, 1.0]  # regraded against the fig rubric
        assert rubrax_main(_grade(srv, tmp_path, rubrics2)) == 0  # same inputs: resumes
        assert "resumed=4" in capsys.readouterr().err
    for name in os.listdir(tmp_path):  # the key is in no file the job wrote
        if name.startswith("grades"):
            assert "sk-secret-key" not in (tmp_path / name).read_text()


def test_grade_k0_fails_at_parse_time_writing_nothing(tmp_path, capsys):
    _, rubrics, _ = _inputs(tmp_path)

    class Srv:
        base_url = "http://127.0.0.1:9/v1"

    with pytest.raises(SystemExit) as exit_:
        rubrax_main(_grade(Srv, tmp_path, rubrics, "--k", "0"))
    assert exit_.value.code == 2 and "--k: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "grades.jsonl").exists()


def test_grade_exits_nonzero_when_every_item_failed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    _, rubrics, _ = _inputs(tmp_path)
    with FakeOpenAIServer(faults=[Fault("401", attempts=100)]) as srv:
        assert rubrax_main(_grade(srv, tmp_path, rubrics, "--max-retries", "0")) == 1
    assert "all 4 items failed" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    with FakeOpenAIServer() as srv:
        assert rubrax_main(_grade(srv, tmp_path, tmp_path / "empty.jsonl", "--restart")) == 1
    assert "all 4 items failed" in capsys.readouterr().err


def test_two_grading_jobs_on_one_out_second_fails_fast_first_unharmed(tmp_path):
    _, rubrics, _ = _inputs(tmp_path)
    env = {**os.environ, "OPENAI_API_KEY": "k"}
    with FakeOpenAIServer(latency=0.5) as srv:
        first = subprocess.Popen([sys.executable, "-m", "rubrax.cli", *_grade(srv, tmp_path, rubrics, "--concurrency", "1")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while srv.requests == 0 and first.poll() is None:  # the first job holds the lock once it calls
            time.sleep(0.02)
        t0 = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "rubrax.cli", *_grade(srv, tmp_path, rubrics)], env=env,
                                capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - t0
        assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
        assert first.poll() is None and took < 15  # refused while the first still runs
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert max(srv.seen_keys.values()) == 1  # no request paid twice
    assert _scores(tmp_path / "grades.jsonl") == [1.0, 0.5, 1.0, 0.5]


def test_winrate_rerun_with_other_references_refuses_then_restart_rejudges(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    rich, poor = "alpha bravo charlie delta echo", "alpha"
    _write(tmp_path / "resp.jsonl", [{"prompt_id": f"p{i}", "response_id": "pol", "prompt": "q", "response": rich if i < 3 else poor} for i in range(4)])
    _write(tmp_path / "ref.jsonl", [{"prompt_id": f"p{i}", "response_id": "ref", "prompt": "q", "response": "alpha bravo"} for i in range(4)])
    _write(tmp_path / "ref2.jsonl", [{"prompt_id": f"p{i}", "response_id": "ref", "prompt": "q", "response": "x"} for i in range(4)])
    args = ["eval", "winrate", "--responses", str(tmp_path / "resp.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--model", "m",
            "--cache-dir", str(tmp_path / "c"), "--bootstrap", "50", "--no-progress"]
    with FakeOpenAIServer() as srv:
        assert rubrax_main([*args, "--references", str(tmp_path / "ref.jsonl"), "--base-url", srv.base_url]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("win_rate=0.7500 ")
        assert rubrax_main([*args, "--references", str(tmp_path / "ref2.jsonl"), "--base-url", srv.base_url]) == 2
        assert "input file references changed" in capsys.readouterr().err
        assert rubrax_main([*args, "--references", str(tmp_path / "ref2.jsonl"), "--base-url", srv.base_url, "--restart"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("win_rate=1.0000 ")
    with FakeOpenAIServer(faults=[Fault("401", attempts=100)]) as srv:
        code = rubrax_main([*args, "--references", str(tmp_path / "ref.jsonl"), "--base-url", srv.base_url, "--restart", "--max-retries", "0",
                            "--cache-dir", str(tmp_path / "c401")])
    assert code == 1 and "all 4 items failed" in capsys.readouterr().err

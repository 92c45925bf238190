"""`rubrax generate`: responses JSONL from endpoint models (cached, resumable, summary per
endpoint) and from a local policy (HF folder or RL run; batched on the mesh, resumable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fake_openai_server import FakeOpenAIServer, Fault
from tiny_hf import make_tiny_hf

from rubrax.cli import main as rubrax_main
from rubrax.data.rubrics import read_responses

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [{"prompt_id": "a", "prompt": "Explain lemons and their acidity"}, {"prompt_id": "b", "prompt": "Describe grape harvest timing"}]


def _prompts(tmp_path, rows=PROMPTS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path):
    return [json.loads(x) for x in open(path)]


def _args(srv, tmp_path, out, *extra, cache="cache"):
    return ["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--model", "m1", "--model", "m2", "--n", "3",
            "--base-url", srv.base_url, "--cache-dir", str(tmp_path / cache), "--no-progress", *extra]


def test_endpoints_pool_order_sampling_and_resume(tmp_path):
    _prompts(tmp_path)
    seen = []
    with FakeOpenAIServer() as srv:
        def record(body):
            seen.append(body)
            from fake_openai_server import auto_responder
            return auto_responder(body)

        srv.responder = record
        out = tmp_path / "pool.jsonl"
        assert rubrax_main(_args(srv, tmp_path, out, "--max-tokens", "50")) == 0
        rows = _lines(out)
        assert [(r["prompt_id"], r["response_id"]) for r in rows] == [(p, f"{m}/{i}") for p in "ab" for m in ("m1", "m2") for i in range(3)]
        assert all(r["source_model"] == r["response_id"].split("/")[0] and r["finish_reason"] == "stop" for r in rows)
        assert len({r["response"] for r in rows}) == 12  # samples differ by seed and model
        assert {(b["temperature"], b["top_p"], b["max_tokens"]) for b in seen} == {(1.0, 0.95, 50)}
        assert sorted(b["seed"] for b in seen) == sorted([0, 1, 2] * 4) and srv.ok == 12
        assert [r.response_id for r in read_responses(out)][:3] == ["m1/0", "m1/1", "m1/2"]  # the format the pool readers take
        original = out.read_bytes()
        # warm rerun: nothing to do, no call
        assert rubrax_main(_args(srv, tmp_path, out, "--max-tokens", "50")) == 0 and srv.ok == 12
        # a killed run (5 lines and a half) resumed with a cold cache: exactly the 7 missing calls, same bytes
        data = original.splitlines(keepends=True)
        out.write_bytes(b"".join(data[:5]) + data[5][:20])
        assert rubrax_main(_args(srv, tmp_path, out, "--max-tokens", "50", cache="cold")) == 0
        assert srv.ok == 19 and out.read_bytes() == original


def test_endpoint_failures_write_nothing_and_are_retried(tmp_path):
    _prompts(tmp_path)
    with FakeOpenAIServer(faults=[Fault("401", rate=0.3, attempts=10**6)]) as srv:
        out = tmp_path / "pool.jsonl"
        assert rubrax_main(_args(srv, tmp_path, out, "--max-retries", "0")) == 1
        partial = len(_lines(out))
        assert 0 < partial < 12
        srv.faults = []
        before = srv.ok
        assert rubrax_main(_args(srv, tmp_path, out, "--max-retries", "0")) == 0
        assert len(_lines(out)) == 12 and srv.ok - before == 12 - partial


def test_bad_prompts_name_file_line_field(tmp_path, capsys):
    _prompts(tmp_path, PROMPTS + [{"prompt_id": "a", "prompt": "again"}])
    with FakeOpenAIServer() as srv:
        assert rubrax_main(_args(srv, tmp_path, tmp_path / "o.jsonl")) == 2
        assert f"{tmp_path / 'prompts.jsonl'}:3: field 'prompt_id': duplicate" in capsys.readouterr().err
        _prompts(tmp_path, [{"prompt_id": "a"}])
        assert rubrax_main(_args(srv, tmp_path, tmp_path / "o.jsonl")) == 2
        assert "prompts.jsonl:1: field 'prompt'" in capsys.readouterr().err
        assert srv.requests == 0


def test_cli_subprocess_summary_per_endpoint_and_no_unclosed_session(tmp_path):
    _prompts(tmp_path)
    with FakeOpenAIServer() as srv:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "rubrax.cli", *_args(srv, tmp_path, tmp_path / "o.jsonl", "--price-in", "2", "--price-out", "8")],
                              capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Unclosed" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert any(l.startswith("rubrax generate: items=12 resumed=0 done=12 failures=0") for l in lines)
    for m in ("m1", "m2"):
        (summary,) = [l for l in lines if l.strip().startswith(f"{m}: calls=")]
        assert "calls=6 cache_hits=0" in summary and "failures=0" in summary and "prompt_tokens=" in summary and "cost=$" in summary


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("policy") / "tiny")


def test_local_policy_batches_resume_and_stop_tokens(tmp_path, tiny_policy):
    rows = PROMPTS + [{"prompt_id": "c", "prompt": "Why is the sky blue?"}]
    _prompts(tmp_path, rows)
    out = tmp_path / "local.jsonl"
    args = ["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--policy", str(tiny_policy), "--n", "2",
            "--max-tokens", "8", "--batch-prompts", "2", "--no-progress"]
    assert rubrax_main(args) == 0
    got = _lines(out)
    assert [(r["prompt_id"], r["response_id"]) for r in got] == [(p, f"tiny/{i}") for p in "abc" for i in range(2)]
    assert all(r["source_model"] == "tiny" and r["finish_reason"] in ("stop", "length") for r in got)
    assert len({r["response"] for r in got}) > 1
    original = out.read_bytes()
    # killed after the first batch: the second batch is redone with the same key
    out.write_bytes(b"".join(original.splitlines(keepends=True)[:4]))
    assert rubrax_main(args) == 0 and out.read_bytes() == original


def test_local_policy_greedy_matches_transformers(tmp_path, tiny_policy):
    """Chat template + greedy decoding + stop tokens, checked against transformers' generate."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _prompts(tmp_path, PROMPTS[:1])
    out = tmp_path / "greedy.jsonl"
    assert rubrax_main(["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--policy", str(tiny_policy),
                        "--temperature", "0", "--max-tokens", "6", "--no-progress"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_policy), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_policy), dtype=torch.float32, attn_implementation="eager")
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    if 2 in gen:
        gen = gen[: gen.index(2)]
    assert _lines(out)[0]["response"] == tok.decode(gen, skip_special_tokens=True)

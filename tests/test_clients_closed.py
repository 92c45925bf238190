"""Every endpoint client is closed on exit and the run's summary states each endpoint's
calls, cache hits, failures, tokens and cost (issue 14, item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fake_openai_server import FakeOpenAIServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grpo_with_rubric_reward_closes_its_verifier(tmp_path):
    prompts = [{"prompt_id": "a", "prompt": "name a fruit"}, {"prompt_id": "b", "prompt": "name a color"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    rubrics = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "rubrics": [{"criterion": 'Mentions "fruit"', "weight": 1},
                                                                                 {"criterion": 'Mentions "color"', "weight": 2}]} for p in prompts]
    (tmp_path / "rubrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rubrics))
    with FakeOpenAIServer() as srv:
        config = {
            "model": "tiny", "tiny_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "max_position_embeddings": 64},
            "train": str(tmp_path / "train.jsonl"),
            "reward": {"name": "rubric", "kwargs": {"rubrics": str(tmp_path / "rubrics.jsonl"),
                                                    "verifier": {"model": "verifier-m", "base_url": srv.base_url, "cache_dir": str(tmp_path / "cache")}}},
            "rl": {"group_size": 4, "kl_coef": 0.0}, "sample": {"n": 4, "max_new_tokens": 4, "prompt_bucket": 8},
            "optim": {"learning_rate": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
            "loop": {"total_steps": 2, "prompts_per_step": 2, "max_prompt_tokens": 8, "progress": False, "tensorboard": False},
        }
        (tmp_path / "rl.json").write_text(json.dumps(config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        env.pop("OPENAI_API_KEY", None)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train_grpo.py"), "--config", str(tmp_path / "rl.json"),
                               "--out", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
        served = srv.ok
    assert proc.returncode == 0, proc.stderr
    assert "Unclosed" not in proc.stderr, proc.stderr
    (summary,) = [l for l in proc.stderr.splitlines() if l.startswith("rubrax rl train: verifier-m:")]
    assert f"calls={served} " in summary and served > 0
    for field in ("cache_hits=", "failures=0", "prompt_tokens=", "completion_tokens=", "cost="):
        assert field in summary

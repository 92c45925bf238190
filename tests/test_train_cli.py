"""`rubrax train ...`, experiments/train_{reward_model,sft}.py and the presets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rubrax.cli import main as rubrax_main
from rubrax.train.presets import PRESETS, preset
from rubrax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_presets():
    bt = preset("reward-model", "paper")
    assert (bt.optim.learning_rate, bt.num_epochs, bt.optim.schedule, bt.optim.warmup_ratio) == (1e-5, 10, "cosine", 0.1)
    for task, presets in PRESETS.items():
        for name, cfg in presets.items():
            assert cfg.total_steps(10 * cfg.batch_size) >= 1, (task, name)
    with pytest.raises(KeyError):
        preset("sft", "huge")


@pytest.mark.parametrize("script", ["train_reward_model.py", "train_sft.py"])
def test_scripts_help(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--train" in out.stdout and "--preset" in out.stdout


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_cli_reward_model_tiny_then_rerun_resumes(tmp_path, capsys):
    words = "a b c d e f g h".split()
    recs = []
    for i in range(40):
        p = " ".join(words[(i + k) % 8] for k in range(3))
        recs.append({"prompt": p, "chosen": p + " yes", "rejected": p} if i % 2 else {"prompt": p, "response_a": p, "response_b": p + " yes", "label": 1})
    _write(tmp_path / "pairs.jsonl", recs)
    args = ["train", "reward-model", "--train", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "run"),
            "--max-length", "16", "--batch-size", "8", "--epochs", "1", "--no-progress"]
    assert rubrax_main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step=4 ") and "accuracy=" in last  # 36 train pairs / 8 = 4 steps
    assert os.path.isdir(tmp_path / "run" / "reward_model")
    n_lines = len(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert rubrax_main(args) == 0  # finished run: resumes at its last step, trains nothing
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == n_lines


def test_cli_fsdp_trains_like_one_device(tmp_path, capsys):
    """`--fsdp` (8 fake devices) ends with the same held-out metrics as the default run."""
    recs = [{"prompt": f"a b {w}", "response": f"{w} c"} for w in "d e f g h".split() * 4]
    _write(tmp_path / "sft.jsonl", recs)
    base = ["train", "sft", "--train", str(tmp_path / "sft.jsonl"), "--max-length", "16", "--batch-size", "8",
            "--epochs", "1", "--no-progress"]
    lines = []
    for extra in ([], ["--fsdp"]):
        assert rubrax_main(base + ["--out", str(tmp_path / f"run{len(extra)}")] + extra) == 0
        lines.append(dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split()))
    assert lines[0].keys() == lines[1].keys() and int(lines[0]["step"]) == 2
    for k in lines[0]:
        np.testing.assert_allclose(float(lines[1][k]), float(lines[0][k]), rtol=1e-4, err_msg=k)


def test_cli_bad_record_names_line(tmp_path):
    _write(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(ValueError, match=r"sft.jsonl:2: field 'response': missing"):
        rubrax_main(["train", "sft", "--train", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")

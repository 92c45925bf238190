"""Issue 13 for SFT / BT run folders: metrics cut back to the checkpoint on resume (1), the
CLI's --out fingerprinted (3) and locked (6), numeric flags validated (4)."""

import json
import os
import shutil

import pytest
from test_train import toy_cfg, toy_data, toy_eval, toy_loss, toy_params

from rubrax import runs
from rubrax.cli import main as rubrax_main
from rubrax.train.metrics import read_metrics
from rubrax.train.trainer import train


def _lines(path):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)]


def test_resume_after_a_lost_checkpoint_gives_the_uninterrupted_metrics(tmp_path):
    """Killed after logging steps past its last checkpoint: the rerun cuts those lines and
    writes them again, once."""
    data, held = toy_data(64), toy_data(16, 1)
    cfg = toy_cfg(checkpoint_every=4, eval_every=4)
    kw = dict(eval_fn=toy_eval, eval_data=held)
    train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "full", metrics_path=tmp_path / "full.jsonl", **kw)
    train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", stop_at=10, **kw)
    shutil.rmtree(tmp_path / "ck" / "10")  # as if killed after writing step 10's lines, before its checkpoint
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # and in the middle of a line
    train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", **kw)
    assert _lines(tmp_path / "m.jsonl") == _lines(tmp_path / "full.jsonl")
    steps = [r["step"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert steps == sorted(steps)


def _pairs(tmp_path):
    words = "a b c d e f g h".split()
    recs = []
    for i in range(40):
        p = " ".join(words[(i + k) % 8] for k in range(3))
        recs.append({"prompt": p, "chosen": p + " yes", "rejected": p})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.slow
def test_cli_out_is_fingerprinted_and_locked(tmp_path, capsys):
    _pairs(tmp_path)
    args = ["train", "reward-model", "--train", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "run"),
            "--max-length", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--no-progress"]
    assert rubrax_main(args) == 0
    capsys.readouterr()
    assert rubrax_main([*args, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.optim.learning_rate" in err and "--restart" in err
    with runs.RunLock(tmp_path / "run"):  # another writer holds the folder
        assert rubrax_main(args) == 2
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
    assert rubrax_main([*args, "--lr", "0.5", "--restart"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["train"]["optim"]["learning_rate"] == 0.5


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--lr", "nan"), ("--eval-fraction", "1"), ("--epochs", "1.5")])
def test_cli_numeric_flags_fail_at_parse_time(tmp_path, capsys, flag, value):
    _pairs(tmp_path)
    with pytest.raises(SystemExit):
        rubrax_main(["train", "sft", "--train", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "run"), flag, value])
    assert flag in capsys.readouterr().err and not (tmp_path / "run").exists()

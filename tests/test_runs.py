"""rubrax.runs: the run-folder lock, input fingerprints, exact-resume helpers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rubrax import runs

_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from rubrax.runs import RunLock
RunLock({where!r}).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _hold_lock(where):
    root = os.path.dirname(os.path.dirname(os.path.abspath(runs.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=root, where=str(where))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_the_holder_and_is_taken_over_when_it_dies(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _hold_lock(folder)
    try:
        with pytest.raises(runs.RunLocked, match=f"in use by process {holder.pid}") as err:
            runs.RunLock(folder).acquire()
        assert err.value.pid == holder.pid and str(folder) in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = runs.RunLock(folder).acquire()  # the dead holder's lock is taken over
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (folder / ".lock").read_text() == ""


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    out = tmp_path / "grades.jsonl"
    with runs.RunLock(out):
        with pytest.raises(runs.RunLocked, match=f"process {os.getpid()}"):
            runs.RunLock(out).acquire()
    with runs.RunLock(out):  # released by the block
        pass
    assert (tmp_path / "grades.jsonl.lock").exists() and not out.exists()


def test_file_digest_changes_with_content_and_folders_hash_their_files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("x\n")
    d1 = runs.file_digest(a)
    assert d1 == "sha256:" + __import__("hashlib").sha256(b"x\n").hexdigest()
    a.write_text("y\n")
    assert runs.file_digest(a) != d1
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    f1 = runs.file_digest(folder)
    (folder / "config.json").write_text('{"d": 1}')
    assert runs.file_digest(folder) != f1


def test_fingerprint_refuses_changes_naming_them(tmp_path):
    where = tmp_path / "out.jsonl"
    inp = tmp_path / "rubrics.jsonl"
    inp.write_text("r1\n")
    fp = lambda **cfg: runs.fingerprint({"model": "m", "k": 1, **cfg}, {"rubrics": inp})  # noqa: E731
    runs.open_run(where, fp(), folder=False).release()
    where.write_text("done\n")
    runs.open_run(where, fp(), folder=False).release()  # same inputs: resumes
    inp.write_text("r2\n")
    with pytest.raises(runs.InputsChanged, match=r"model: \"m\" -> \"m2\"; input file rubrics changed.*--restart") as err:
        runs.open_run(where, fp(model="m2"), folder=False)
    assert len(err.value.changes) == 2
    with pytest.raises(runs.InputsChanged, match="not safe|are not|is not"):
        runs.open_run(where, fp(model="m2"), folder=False, allow_changed=True, safe=("k",))
    assert where.read_text() == "done\n"  # refusals touch nothing
    lock = runs.open_run(where, fp(model="m2"), folder=False, restart=True)
    assert not where.exists()  # --restart removed the old output
    lock.release()
    runs.open_run(where, fp(model="m2"), folder=False).release()  # the new fingerprint is recorded


def test_allow_changed_accepts_safe_keys_only(tmp_path):
    where = tmp_path / "run"
    cfg = {"loop": {"total_steps": 10, "seed": 0}, "optim": {"learning_rate": 1e-3}}
    runs.open_run(where, runs.fingerprint(cfg), folder=True).release()
    longer = {**cfg, "loop": {"total_steps": 20, "seed": 0}}
    with pytest.raises(runs.InputsChanged, match=r"loop.total_steps: 10 -> 20.*--allow-changed"):
        runs.open_run(where, runs.fingerprint(longer), folder=True, safe=("loop.total_steps",))
    runs.open_run(where, runs.fingerprint(longer), folder=True, safe=("loop.total_steps",), allow_changed=True).release()
    other_lr = {**longer, "optim": {"learning_rate": 2e-3}}
    with pytest.raises(runs.InputsChanged, match="optim.learning_rate"):
        runs.open_run(where, runs.fingerprint(other_lr), folder=True, safe=("loop.total_steps",), allow_changed=True)
    assert json.loads((where / "run.json").read_text())["config"]["loop"]["total_steps"] == 20


def test_restart_removes_only_the_listed_outputs(tmp_path):
    where = tmp_path / "run"
    runs.open_run(where, runs.fingerprint({"a": 1}), folder=True).release()
    (where / "metrics.jsonl").write_text("{}\n")
    (where / "checkpoints").mkdir()
    (where / "notes.txt").write_text("mine")
    runs.open_run(where, runs.fingerprint({"a": 2}), folder=True, restart=True,
                  outputs=[str(where / "metrics.jsonl"), str(where / "checkpoints")]).release()
    assert sorted(os.listdir(where)) == [".lock", "notes.txt", "run.json"]


def test_api_keys_never_enter_a_fingerprint(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="secret"):
        runs.fingerprint({"endpoint": {"api_key": "sk-123"}})
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-live-0123456789")
    with pytest.raises(ValueError, match="secret environment variable"):
        runs.fingerprint({"endpoint": {"headers": ["Bearer sk-live-0123456789"]}})
    assert runs.fingerprint({"max_new_tokens": 8})["config"] == {"max_new_tokens": 8}
    fp = runs.fingerprint({"endpoint": {"api_key_env": "OPENAI_API_KEY"}})
    assert fp["config"]["endpoint"]["api_key_env"] == "OPENAI_API_KEY"


def test_cut_jsonl_keeps_the_prefix_covered_by_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": s / 10} for s in range(6)] + [{"step": 6, "eval/r": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')
    kept = runs.cut_jsonl(path, lambda r: r["step"] < 4)
    assert kept == lines[:4]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in lines[:4])
    assert runs.cut_jsonl(tmp_path / "none.jsonl", lambda r: True) == []


def test_probe_reports_a_holder_without_taking_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    runs.RunLock(folder).probe()  # no lock file yet: nothing to report
    holder = _hold_lock(folder)
    try:
        with pytest.raises(runs.RunLocked, match=f"process {holder.pid}"):
            runs.check_run(folder, runs.fingerprint({}), folder=True, probe_lock=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    runs.RunLock(folder).probe()
    assert json.loads((folder / ".lock").read_text())["pid"] == holder.pid  # the probe wrote nothing

"""Multi-host for real: two processes (2 "hosts" x 4 CPU devices, gloo collectives over
127.0.0.1) run the RL update on one mesh spanning both, each feeding only its own half
of every batch (`shard_batch`'s multi-host path), and end with the same params and
metrics as one process on one device; the host loop (sampling over both hosts, rewards,
updates) gives the same metric history as one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_rl_step import PPO_CFG, _run

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, mode: str):
    out, port = tmp_path / "out.npz", str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py")]
    procs = [subprocess.Popen(cmd + [str(pid), port, str(out), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return np.load(out)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_equal_one_device(tmp_path, fsdp):
    got = _two_processes(tmp_path, str(int(fsdp)))
    s1, h1, _ = _run(PPO_CFG, 1)
    assert int(got["step"]) == int(s1.step) == 2
    np.testing.assert_allclose(got["w"], s1.params["w"], rtol=1e-5, atol=1e-6)
    for k, v in h1[-1].items():
        np.testing.assert_allclose(got[f"m_{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_host_loop_on_two_processes_equals_one(tmp_path):
    import test_rl_loop

    got = _two_processes(tmp_path, "loop")
    one = test_rl_loop.run(3)
    assert len(one.history) == 3
    for k in got.files:
        np.testing.assert_allclose(got[k], [h[k] for h in one.history], rtol=1e-4, atol=1e-6, err_msg=k)

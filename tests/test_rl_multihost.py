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
def test_host_loop_on_two_processes_stops_resumes_and_equals_one(tmp_path):
    """train() over two processes, stopped after 2 of 3 steps and resumed from its
    (multi-process orbax) checkpoint, equals one uninterrupted single-process run:
    metrics (written once, by process 0) and final params."""
    import jax
    import test_rl_loop
    from rubrax.train.metrics import read_metrics

    got = _two_processes(tmp_path, "loop")
    one = test_rl_loop.run(3, rl=test_rl_loop.RLConfig(group_size=test_rl_loop.G, kl_coef=0.05),
                           overlap="one_step_off_policy")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # one writer, no duplicate lines
    for r, h in zip(records, one.history):
        for k in test_rl_loop.DEVICE_KEYS:
            np.testing.assert_allclose(r[k], h[k], rtol=1e-4, atol=1e-6, err_msg=f"step {r['step']} {k}")
    leaves = jax.tree.leaves(one.state.params)
    assert len(got.files) == len(leaves)
    for i, x in enumerate(leaves):
        np.testing.assert_allclose(got[f"p{i}"], np.asarray(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_grpo_cli_distributed_equals_one_process(tmp_path):
    """experiments/train_grpo.py --distributed on two processes (2 CPU devices each) ends
    with the same summary line as one process on 4 devices; one metrics file."""
    script = os.path.join(HERE, "..", "experiments", "train_grpo.py")
    config = os.path.join(HERE, "..", "experiments", "configs", "grpo_tiny.json")
    base = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, script, "--config", config, "--steps", "4", "--no-progress"]
    port = str(_free_port())
    env2 = {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(args + ["--out", str(tmp_path / "two"), "--distributed", "--coordinator", f"127.0.0.1:{port}",
                                      "--num-processes", "2", "--process-id", str(pid)],
                              env=env2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    env1 = {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = subprocess.run(args + ["--out", str(tmp_path / "one")], env=env1, capture_output=True, text=True, check=True)
    last = lambda text: [line for line in text.splitlines() if line.startswith("step=")][-1]  # noqa: E731
    assert last(outs[0]) == last(outs[1]) == last(one.stdout)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == \
        len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())

"""benchmarks/accelerator.py --tiny runs every case kind on CPU and ends with key=value."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_accelerator_benchmark_tiny():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    env.pop("XLA_FLAGS", None)  # one device, as on one accelerator
    proc = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--tiny"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(item.split("=", 1) for item in proc.stdout.strip().splitlines()[-1].split())
    for key in ("train_tiny_64_tok_s", "attn_blockwise_tok_s", "attn_einsum_tok_s", "head_chunk_64_ms",
                "decode_tiny_b1_ms", "decode_tiny_b4_ms"):
        assert float(figures[key]) > 0, key
    assert figures["train_tiny_longest"] == "128"
    assert figures["train_tiny_64_mfu"] == "nan"  # no peak FLOP/s for a CPU

"""Training and decoding speed of rubrax's model on one accelerator, as fractions of peak.

    python benchmarks/accelerator.py              # one H100/H200/TPU chip, < 10 minutes
    python benchmarks/accelerator.py --tiny       # seconds on CPU (the test suite runs it)

Random-weight Qwen3-1.7B- and Qwen3-4B-shaped models (rubrax.models.config.SHAPES), bf16
compute. Cases (each compiled once; compile time reported apart from run time):
- train: forward + backward of the summed token logprobs through the fused LM head (the
  RL update's inner loop, no optimizer), float32 master weights, remat "full", attention
  "auto"; rows x T = ~16k tokens per step at T = 1k, 2k, 3.5k, then 1 row at T = 8k,
  16k, 32k until out of memory ("longest" = the longest that ran). tokens/s and
  MFU = model FLOPs (rubrax.plan.model_flops: 6 N per token + causal attention, no
  recomputation) / time / the chip's peak bf16 FLOP/s.
- attention: the 1.7B training step at 2k with each attention implementation that
  exists on the platform (auto, blockwise, xla, einsum).
- decode: one KV-cached token per row per step (forward + LM head + argmax) at batch 1,
  16, 64 with bf16 weights, 512 cached slots; ms/step and MBU = (weight bytes + KV-cache
  bytes read per step) / time / the chip's peak memory bandwidth.
- head: the fused LM head forward + backward over [rows, T, D] hidden states for several
  `chunk_tokens` (the chunk sweep).
Peak device memory (device.memory_stats()["peak_bytes_in_use"], where the platform has
it) is reported after each case. An out-of-memory case is reported as "oom" and the run
goes on; cases are skipped (reported) once --budget-s is spent. Peak figures per device
kind are in PEAKS (unknown kinds: MFU / MBU are not reported).

Last line: `key=value` figures, e.g. `train_1.7b_2k_mfu=0.41 decode_1.7b_b64_mbu=0.63`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rubrax import plan, policy
from rubrax.models import ModelConfig, init_params, llama
from rubrax.models.config import SHAPES

# device_kind substring -> (peak dense bf16 FLOP/s, peak memory bandwidth bytes/s), vendor figures
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.864e12),
    "L4": (121e12, 0.3e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5e": (197e12, 0.819e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "TPU v6e": (918e12, 1.64e12),
}


@dataclasses.dataclass
class Bench:
    budget_s: float
    started: float = dataclasses.field(default_factory=time.perf_counter)
    figures: dict = dataclasses.field(default_factory=dict)
    iters: int = 5

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def peaks(device) -> tuple[float, float] | None:
    kind = getattr(device, "device_kind", "")
    for name, value in PEAKS.items():
        if name.lower() in kind.lower():
            return value
    return None


def peak_memory_gb(device) -> float:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float((stats or {}).get("peak_bytes_in_use", float("nan"))) / 1e9


def _is_oom(err: Exception) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "oom", "allocat"))


def timed(fn, args, iters: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of jitted fn on args."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def run_case(bench: Bench, name: str, body) -> dict | None:
    """Runs one case; out-of-memory and over-budget are reported, not raised."""
    if bench.over_budget():
        print(f"{name:28s} skipped (budget of {bench.budget_s:.0f} s spent)")
        return None
    try:
        result = body()
    except Exception as err:  # noqa: BLE001 - a failing case must not end the benchmark
        status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(f"{name:28s} {status}")
        bench.figures[f"{name}_status"] = "oom" if status == "oom" else "error"
        return None
    jax.clear_caches()
    return result


# --------------------------------------------------------------------------- cases


def _tokens(rows: int, T: int, vocab: int):
    return jax.random.randint(jax.random.PRNGKey(1), (rows, T), 0, vocab, jnp.int32)


def train_case(config: ModelConfig, params, rows: int, T: int, bench: Bench):
    """(compile s, s/step, tokens/s, MFU or nan, peak GB) of forward + backward."""
    def loss(p, tokens):
        h = llama.hidden_states(p, tokens, config=config)
        logp, _ = policy.head_logprobs_and_entropy(policy.lm_head_fn(p, config), h, tokens, entropy=False)
        return -logp.sum()

    fn = jax.jit(jax.value_and_grad(loss))
    compile_s, step_s = timed(fn, (params, _tokens(rows, T, config.vocab_size)), bench.iters)
    flops = plan.model_flops(config, tokens=rows * T, T=T, backward=True)
    peak = peaks(jax.devices()[0])
    mfu = flops / step_s / peak[0] if peak else float("nan")
    return compile_s, step_s, rows * T / step_s, mfu, peak_memory_gb(jax.devices()[0])


def decode_case(config: ModelConfig, params, batch: int, slots: int, steps: int, bench: Bench):
    """(compile s, ms/step, MBU or nan, peak GB) of KV-cached one-token steps."""
    P = slots - steps

    def decode(p, tok_R):
        cache = llama.init_cache(config, batch, slots)
        kv_mask = jnp.ones((batch, slots), jnp.int32)

        def body(i, carry):
            cache, tok = carry
            pos = jnp.full((batch, 1), P + i, jnp.int32)
            h, cache = llama.forward_with_cache(p, tok[:, None], pos, kv_mask, cache, P + i, config=config)
            return cache, jnp.argmax(policy._head_logits_VxR(p, h[:, 0], config), axis=0).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tok_R))[1]

    fn = jax.jit(decode)
    compile_s, run_s = timed(fn, (params, jnp.zeros((batch,), jnp.int32)), bench.iters)
    step_s = run_s / steps
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cache_bytes = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * slots * config.head_dim \
        * jnp.dtype(config.dtype).itemsize
    peak = peaks(jax.devices()[0])
    mbu = (weight_bytes + cache_bytes) / step_s / peak[1] if peak else float("nan")
    return compile_s, step_s * 1e3, mbu, peak_memory_gb(jax.devices()[0])


def head_case(config: ModelConfig, params, rows: int, T: int, chunk: int, bench: Bench):
    h = jax.random.normal(jax.random.PRNGKey(2), (rows, T, config.hidden_size), jnp.dtype(config.dtype))

    def loss(p, h, tokens):
        logp, _ = policy.head_logprobs_and_entropy(policy.lm_head_fn(p, config), h, tokens, chunk_tokens=chunk,
                                                   entropy=False)
        return -logp.sum()

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compile_s, step_s = timed(fn, (params, h, _tokens(rows, T, config.vocab_size)), bench.iters)
    return compile_s, step_s


# --------------------------------------------------------------------------- driver


def _label(T: int) -> str:
    return f"{T // 1024}k" if T % 1024 == 0 else (f"{T / 1024:.1f}k" if T >= 1024 else str(T))


def train_sweep(tag, config, params, bench: Bench, lengths, longest, tokens_per_step):
    for T in lengths:
        rows = max(1, tokens_per_step // T)
        res = run_case(bench, f"train_{tag}_{_label(T)}", lambda: train_case(config, params, rows, T, bench))
        if res:
            c, s, tps, mfu, mem = res
            print(f"train_{tag}_{_label(T):5s} rows {rows:3d}  {tps:10.0f} tok/s  MFU {mfu:6.3f}  "
                  f"step {s * 1e3:8.1f} ms  compile {c:6.1f} s  peak {mem:6.1f} GB")
            bench.figures[f"train_{tag}_{_label(T)}_tok_s"] = tps
            bench.figures[f"train_{tag}_{_label(T)}_mfu"] = mfu
    best = 0
    for T in longest:
        res = run_case(bench, f"train_{tag}_{_label(T)}_1row", lambda: train_case(config, params, 1, T, bench))
        if not res:
            break
        best = T
        print(f"train_{tag}_{_label(T):5s} rows   1  {res[2]:10.0f} tok/s  MFU {res[3]:6.3f}  peak {res[4]:6.1f} GB")
    bench.figures[f"train_{tag}_longest"] = best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, seconds on CPU (a smoke test)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip the remaining cases after this")
    ap.add_argument("--models", default="qwen3-1.7b,qwen3-4b")
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), peaks (bf16 FLOP/s, bytes/s): {peaks(device)}")
    bench = Bench(budget_s=args.budget_s, iters=2 if args.tiny else 5)
    if args.tiny:
        shapes = {"tiny": dict(ModelConfig.tiny(num_hidden_layers=1).__dict__)}
        lengths, longest, tokens_per_step, batches, slots, steps, head = (64,), (128,), 256, (1, 4), 32, 4, (64,)
    else:
        shapes = {name.split("-")[1]: SHAPES[name] for name in args.models.split(",")}
        lengths, longest, tokens_per_step = (1024, 2048, 3584), (8192, 16384, 32768), 16384
        batches, slots, steps, head = (1, 16, 64), 512, 64, (None, 1024, 4096, 16384)
    platform_impls = {"gpu": ("auto", "blockwise", "xla", "einsum"), "tpu": ("auto", "blockwise", "einsum")}
    impls = platform_impls.get(device.platform, ("blockwise", "einsum"))
    for tag, shape in shapes.items():
        base = ModelConfig(**{**shape, "dtype": "bfloat16", "param_dtype": "float32", "remat": "full",
                              "attention": "auto"})
        params = init_params(base, jax.random.PRNGKey(0))
        train_sweep(tag, base, params, bench, lengths, longest if tag == next(iter(shapes)) else (), tokens_per_step)
        if tag == next(iter(shapes)):
            T = lengths[min(1, len(lengths) - 1)]
            for impl in impls:
                cfg = base.replace(attention=impl)
                res = run_case(bench, f"attn_{impl}", lambda: train_case(cfg, params, max(1, tokens_per_step // T), T, bench))
                if res:
                    print(f"attn_{impl:10s} at {_label(T)}: {res[2]:10.0f} tok/s  MFU {res[3]:6.3f}  compile {res[0]:6.1f} s")
                    bench.figures[f"attn_{impl}_tok_s"] = res[2]
            for chunk in head:
                res = run_case(bench, f"head_chunk_{chunk}", lambda: head_case(base, params, 4, T, chunk, bench))
                if res:
                    print(f"head chunk {str(chunk or 'default'):>8s}: {res[1] * 1e3:8.2f} ms fwd+bwd  compile {res[0]:5.1f} s")
                    bench.figures[f"head_chunk_{chunk or 'default'}_ms"] = res[1] * 1e3
        del params
        dec_cfg = base.replace(param_dtype="bfloat16")
        dec_params = init_params(dec_cfg, jax.random.PRNGKey(0))
        for b in batches:
            res = run_case(bench, f"decode_{tag}_b{b}", lambda: decode_case(dec_cfg, dec_params, b, slots, steps, bench))
            if res:
                print(f"decode_{tag}_b{b:<3d} {res[1]:8.3f} ms/step  MBU {res[2]:6.3f}  compile {res[0]:5.1f} s  "
                      f"peak {res[3]:6.1f} GB")
                bench.figures[f"decode_{tag}_b{b}_ms"] = res[1]
                bench.figures[f"decode_{tag}_b{b}_mbu"] = res[2]
        del dec_params
    bench.figures["total_s"] = time.perf_counter() - bench.started
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else str(v)
    print(" ".join(f"{k}={fmt(v)}" for k, v in bench.figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

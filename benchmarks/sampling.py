"""Decode throughput: rubrax.policy.sample vs transformers' PyTorch `generate`.

Batch 8 left-padded chat prompts, 64 new tokens each, greedy, float32, no stop tokens, on
(a) SmolLM2-135M-Instruct (the offline GGUF conversion, same weights on both sides) and
(b) a tiny random Llama (ModelConfig.tiny()). Each side runs in its own worker process so
its peak memory (max RSS) is its own; the workers are timed in alternation (rubrax round,
transformers round, ...) so a busy shared CPU affects both alike. Compilation / warm-up is
excluded from the throughput and reported separately. The greedy tokens of both sides are
compared (agreement = fraction of identical tokens).

    python benchmarks/sampling.py [--rounds 3] [--new-tokens 64] [--batch 8]

Last line: `smollm2_vs_transformers=X tiny_vs_transformers=Y ...` (X = rubrax tokens/s
divided by the tokens/s of the fastest transformers configuration, medians over rounds).
"rubrax" is the default sampler (SampleConfig.layer_loop="auto": on CPU the stacked layer
weights are split inside the jitted call and decoded by an unrolled loop), "rubrax[scan]"
forces the scan over stacked layers, "rubrax[unstacked]" is given params already split
by `rubrax.models.unstack_layers` (no per-call split, a permanent second copy).
transformers runs once per torch thread setting (--torch-threads, default: torch's default
and 1 thread): on a CPU shared with other jobs, torch's OpenMP threads can slow down by an
order of magnitude, so the single-thread peer keeps the comparison honest.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time

import numpy as np

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "Why is the sky blue? Answer briefly, please, in simple words for a child.",
]


def _prompts(model: str, path: str, batch: int):
    """Left-padded (tokens, mask) shared by both sides."""
    if model == "smollm2":
        from rubrax.models import load_tokenizer

        tok = load_tokenizer(path)
        rows = [tok.apply_chat_template([{"role": "user", "content": q}])
                for q in (QUESTIONS * batch)[:batch]]
        pad = tok.pad_token_id
    else:
        rng = np.random.default_rng(0)
        rows = [rng.integers(3, 256, rng.integers(8, 17)).tolist() for _ in range(batch)]
        pad = 0
    width = max(map(len, rows))
    tokens = np.full((batch, width), pad, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return tokens, mask


def _rubrax_worker(model, path, batch, new_tokens, conn, torch_threads=0, layout="auto"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from rubrax.models import load_pretrained, llama
    from rubrax.policy import SampleConfig, sample

    params, config = load_pretrained(path)
    if layout == "unstacked":  # split once by the caller: a permanent second copy of the layers
        params = llama.unstack_layers(params)
    tokens, mask = _prompts(model, path, batch)
    cfg = SampleConfig(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=(),
                       layer_loop="scan" if layout == "scan" else "auto")

    def run():
        out = sample(params, tokens, mask, jax.random.key(0), cfg, config=config)
        return np.asarray(jax.block_until_ready(out.tokens))

    _serve(conn, run)


def _rubrax_unstacked_worker(model, path, batch, new_tokens, conn, torch_threads=0):
    _rubrax_worker(model, path, batch, new_tokens, conn, torch_threads, layout="unstacked")


def _rubrax_scan_worker(model, path, batch, new_tokens, conn, torch_threads=0):
    _rubrax_worker(model, path, batch, new_tokens, conn, torch_threads, layout="scan")


def _torch_worker(model, path, batch, new_tokens, conn, torch_threads=0):
    import torch
    import transformers

    if torch_threads:
        torch.set_num_threads(torch_threads)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always generate new_tokens, like rubrax
    tokens, mask = _prompts(model, path, batch)
    tokens_t, mask_t = torch.tensor(tokens), torch.tensor(mask)

    def run():
        with torch.inference_mode():
            out = hf.generate(tokens_t, attention_mask=mask_t, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=int(tokens[0, 0]))
        return out[:, tokens.shape[1]:].numpy()

    _serve(conn, run)


def _serve(conn, run):
    start = time.perf_counter()
    run()
    conn.send(("ready", time.perf_counter() - start))
    while conn.recv() == "run":
        start = time.perf_counter()
        out = run()
        conn.send((time.perf_counter() - start, out))
    conn.send(("done", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def compare(model, path, *, batch, new_tokens, rounds, torch_threads=(0,)):
    ctx = mp.get_context("spawn")
    sides = {}
    ours = ("rubrax", "rubrax[scan]", "rubrax[unstacked]")
    workers = [("rubrax", _rubrax_worker, 0), ("rubrax[scan]", _rubrax_scan_worker, 0),
               ("rubrax[unstacked]", _rubrax_unstacked_worker, 0)] + [
        (f"transformers[threads={t or 'default'}]", _torch_worker, t) for t in torch_threads]
    for name, target, threads in workers:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(model, path, batch, new_tokens, child, threads))
        proc.start()
        _, warm = parent.recv()  # warm up one side at a time; they never overlap
        sides[name] = {"conn": parent, "proc": proc, "warm": warm, "times": []}
    outputs = {}
    for _ in range(rounds):
        for name, side in sides.items():
            side["conn"].send("run")
            elapsed, outputs[name] = side["conn"].recv()
            side["times"].append(elapsed)
    result = {}
    for name, side in sides.items():
        side["conn"].send("stop")
        _, peak_mb = side["conn"].recv()
        side["proc"].join()
        tps = batch * new_tokens / statistics.median(side["times"])
        result[name] = {"tokens_per_s": tps, "peak_rss_mb": peak_mb, "warmup_s": side["warm"]}
        print(f"{model:8s} {name:28s} {tps:9.1f} new tokens/s  peak RSS {peak_mb:7.0f} MB  "
              f"warm-up {side['warm']:.1f}s  rounds {[round(t, 3) for t in side['times']]}")
    peers = [name for name in result if name.startswith("transformers")]
    best = max(peers, key=lambda name: result[name]["tokens_per_s"])
    agree = min(float(np.mean(outputs[mine] == outputs[name]))
                 for mine in ours for name in peers)
    ratio = result["rubrax"]["tokens_per_s"] / result[best]["tokens_per_s"]
    result["unstacked_ratio"] = result["rubrax[unstacked]"]["tokens_per_s"] / result[best]["tokens_per_s"]
    result["scan_ratio"] = result["rubrax[scan]"]["tokens_per_s"] / result[best]["tokens_per_s"]
    print(f"{model:8s} speed-up {ratio:.2f}x (layer scan {result['scan_ratio']:.2f}x, "
          f"pre-split layers {result['unstacked_ratio']:.2f}x) "
          f"vs the fastest peer {best}; greedy token agreement {agree:.3f}")
    result["transformers"] = result[best]
    return ratio, agree, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--torch-threads", default="0,1",
                        help="comma list of torch.set_num_threads settings for transformers, "
                             "each its own peer (0: torch's default); the ratio is against "
                             "the fastest")
    args = parser.parse_args(argv)

    import jax

    from rubrax.models import ModelConfig, init_params, save_pretrained, smollm2_checkpoint

    kv = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if model == "smollm2":
                path = str(smollm2_checkpoint())
            else:
                config = ModelConfig.tiny()
                save_pretrained(init_params(config, jax.random.key(0)), config, tmp)
                path = tmp
            ratio, agree, res = compare(model, path, batch=args.batch,
                                        new_tokens=args.new_tokens, rounds=args.rounds,
                                        torch_threads=[int(t) for t in
                                                       args.torch_threads.split(",")])
            kv[f"{model}_vs_transformers"] = f"{ratio:.2f}"
            kv[f"{model}_unstacked_vs_transformers"] = f"{res['unstacked_ratio']:.2f}"
            kv[f"{model}_scan_vs_transformers"] = f"{res['scan_ratio']:.2f}"
            kv[f"{model}_unstacked_peak_mb"] = f"{res['rubrax[unstacked]']['peak_rss_mb']:.0f}"
            kv[f"{model}_rubrax_tok_s"] = f"{res['rubrax']['tokens_per_s']:.0f}"
            kv[f"{model}_transformers_tok_s"] = f"{res['transformers']['tokens_per_s']:.0f}"
            kv[f"{model}_rubrax_peak_mb"] = f"{res['rubrax']['peak_rss_mb']:.0f}"
            kv[f"{model}_transformers_peak_mb"] = f"{res['transformers']['peak_rss_mb']:.0f}"
            kv[f"{model}_greedy_agreement"] = f"{agree:.3f}"
    order = sorted(kv, key=lambda k: (not k.endswith("vs_transformers"), k))
    print(" ".join(f"{k}={kv[k]}" for k in order))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

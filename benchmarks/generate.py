"""`rubrax generate` throughput against a local OpenAI-compatible server with fixed latency.

Generates P prompts x M models x n samples (default 250 x 2 x 4 = 2,000 calls) through
`rubrax.generate.generate_from_endpoints` (the `rubrax generate` path: cache, retries,
resumable output), each model's client at `--concurrency` requests in flight (default 64),
the server answering after `--latency` seconds (default 0.1).

Ideal time = calls x latency / (concurrency x M); fraction of ideal = ideal / measured
(target >= 0.8). A warm rerun (same cache, fresh output) must make zero calls. Peer,
measured in the same run: the same requests sent with the bare `openai` SDK (AsyncOpenAI +
a semaphore per model, no cache, no output), as a fraction of the same ideal.

The server runs in its own process (tests/fake_openai_server.py), so the figure measures
the client. cpu_headroom = (calls per client CPU-second) / (the call rate the ideal needs):
the margin the client has when it gets a whole core (on a loaded machine the wall-clock
fraction mostly measures the other processes). Last line: key=value figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from grading import server_stats  # noqa: E402

from rubrax.elicit.client import ChatClient, ClientConfig  # noqa: E402
from rubrax.generate import GenerateConfig, generate_from_endpoints  # noqa: E402


def make_prompts(n: int) -> list[tuple[str, str]]:
    return [(f"p{i}", f"Question {i}: explain topic number {i} in detail, with examples and caveats.") for i in range(n)]


async def run_rubrax(port: int, prompts, models, cfg: GenerateConfig, cache: str, out: str, concurrency: int) -> tuple[float, list]:
    clients = [ChatClient(ClientConfig(model=m, base_url=f"http://127.0.0.1:{port}/v1", concurrency=concurrency, cache_dir=cache, timeout_s=30.0),
                          api_key="bench") for m in models]
    try:
        t0 = time.perf_counter()
        summary = await generate_from_endpoints(prompts, clients, out, cfg, workers=2 * concurrency * len(models), progress=False)
        dt = time.perf_counter() - t0
        assert summary.failures == 0 and summary.done == summary.items, summary
        return dt, [c.stats for c in clients]
    finally:
        for c in clients:
            await c.aclose()


async def run_sdk_peer(port: int, prompts, models, cfg: GenerateConfig, concurrency: int) -> float:
    import openai

    sdk = openai.AsyncOpenAI(api_key="bench", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=30.0)
    sems = {m: asyncio.Semaphore(concurrency) for m in models}

    async def one(m: str, prompt: str, i: int) -> None:
        async with sems[m]:
            await sdk.chat.completions.create(model=m, messages=cfg.messages(prompt + " peer"), temperature=cfg.temperature, top_p=cfg.top_p, seed=i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m, p, i) for _, p in prompts for m in models for i in range(cfg.n)))
    dt = time.perf_counter() - t0
    await sdk.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=250)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()

    prompts, models = make_prompts(args.prompts), [f"model{i}" for i in range(args.models)]
    cfg = GenerateConfig(n=args.n)
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "tests", "fake_openai_server.py"), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    figures = {}
    try:
        port = int(server.stdout.readline().split()[1])
        ideal_per_call = args.latency / (args.concurrency * len(models))
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "cache")
            before = server_stats(port)["requests"]
            c0 = time.process_time()
            dt, stats = asyncio.run(run_rubrax(port, prompts, models, cfg, cache, os.path.join(tmp, "out.jsonl"), args.concurrency))
            client_cpu = time.process_time() - c0
            calls = server_stats(port)["requests"] - before
            ideal = calls * ideal_per_call
            figures["generate_fraction"] = ideal / dt
            # Load-independent: calls per client CPU-second over the rate the ideal needs.
            figures["cpu_headroom"] = (calls / client_cpu) * ideal_per_call
            print(f"rubrax generate: client CPU {1e3 * client_cpu / calls:.2f} ms per call", flush=True)
            print(f"rubrax generate: {calls} calls in {dt:.2f} s (ideal {ideal:.2f} s) -> {ideal / dt:.3f} of ideal, {calls / dt:.0f} calls/s; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
            before = server_stats(port)["requests"]
            dt_warm, warm = asyncio.run(run_rubrax(port, prompts, models, cfg, cache, os.path.join(tmp, "warm.jsonl"), args.concurrency))
            figures["warm_calls"] = server_stats(port)["requests"] - before
            print(f"rubrax generate: warm rerun {figures['warm_calls']} calls, {sum(s.cache_hits for s in warm)} cache hits, {dt_warm:.2f} s", flush=True)
        if not args.no_peer:
            dt_peer = asyncio.run(run_sdk_peer(port, prompts, models, cfg, args.concurrency))
            figures["sdk_peer_fraction"] = calls * ideal_per_call / dt_peer
            figures["rubrax_over_sdk_peer"] = figures["generate_fraction"] / figures["sdk_peer_fraction"]
            print(f"openai SDK peer (no cache): {dt_peer:.2f} s -> {figures['sdk_peer_fraction']:.3f} of ideal", flush=True)
    finally:
        server.kill()
        server.wait()
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

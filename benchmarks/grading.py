"""Grading throughput against a local OpenAI-compatible server with fixed latency.

Grades N responses x C criteria (default 2,000 x 20) through `rubrax.elicit.pipeline.
grade_responses` (the `rubrax rubrics grade` path: cache, retries, resumable output) with a
server that answers after `--latency` seconds (default 0.1), at `--concurrency` requests in
flight (default 64), in both verifier modes:

  all:           one call per response (N calls)
  per_criterion: one call per criterion (N x C calls)

Ideal time = calls x latency / concurrency; fraction of ideal = ideal / measured (target
>= 0.8). A second run on the warm cache must make zero calls. Also printed:
cpu_headroom = (calls per client CPU-second) / (concurrency / latency), the margin the
client has over the ideal call rate when it gets a whole core (on a loaded machine the
wall-clock fraction mostly measures the other processes). Peer, measured in the same
run: the same "all"-mode calls sent with the bare `openai` SDK (AsyncOpenAI + a semaphore,
no cache), as a fraction of the same ideal.

The server runs in its own process (tests/fake_openai_server.py), so the figure measures
the client. Last line: key=value figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from rubrax.data.rubrics import ResponseRecord  # noqa: E402
from rubrax.elicit.client import ChatClient, ClientConfig  # noqa: E402
from rubrax.elicit.llm import LLMVerifier  # noqa: E402
from rubrax.elicit.pipeline import grade_responses  # noqa: E402
from rubrax.rewards.rubric import Criterion, Rubric  # noqa: E402

WORDS = [f"word{i}" for i in range(200)]


def make_data(n_responses: int, n_criteria: int, per_prompt: int = 8) -> tuple[list[ResponseRecord], dict[str, Rubric]]:
    rubrics, responses = {}, []
    for p in range(n_responses // per_prompt):
        pid = f"p{p}"
        crit = tuple(Criterion(f"c{i + 1}", f'Mentions "{WORDS[(p * 7 + i * 3) % len(WORDS)]}"', 1 + i % 3) for i in range(n_criteria))
        rubrics[pid] = Rubric(pid, f"Question number {p}: explain the topic in detail.", crit)
        for r in range(per_prompt):
            text = " ".join(WORDS[(p * 11 + r * 5 + j * 13) % len(WORDS)] for j in range(60))
            responses.append(ResponseRecord(pid, f"r{r}", rubrics[pid].prompt, text))
    return responses, rubrics


def server_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats") as r:
        return json.load(r)


async def run_grading(port: int, responses, rubrics, mode: str, cache: str, out: str, concurrency: int) -> tuple[float, dict]:
    cfg = ClientConfig(model="bench", base_url=f"http://127.0.0.1:{port}/v1", concurrency=concurrency, cache_dir=cache, timeout_s=30.0)
    async with ChatClient(cfg, api_key="bench") as client:
        verifier = LLMVerifier(client, mode=mode)
        t0 = time.perf_counter()
        summary = await grade_responses(responses, rubrics, verifier, out, workers=2 * concurrency, progress=False)
        dt = time.perf_counter() - t0
        assert summary.failures == 0, summary
        return dt, {"calls": client.stats.calls, "cache_hits": client.stats.cache_hits}


async def run_sdk_peer(port: int, responses, rubrics, concurrency: int) -> float:
    """The same all-mode requests through the bare openai SDK (no cache, no retries of ours)."""
    import openai

    from rubrax.elicit.llm import Templates, fence, format_criteria

    t = Templates.load()
    sdk = openai.AsyncOpenAI(api_key="bench", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=30.0)
    sem = asyncio.Semaphore(concurrency)

    async def one(r: ResponseRecord) -> None:
        rub = rubrics[r.prompt_id]
        msgs = t.verify_all.render(prompt=fence(rub.prompt), criteria=format_criteria(rub, weights=False), response=fence(r.response + " peer"))
        async with sem:
            await sdk.chat.completions.create(model="bench", messages=msgs, temperature=0.0, response_format={"type": "json_object"})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in responses))
    dt = time.perf_counter() - t0
    await sdk.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=2000)
    ap.add_argument("--criteria", type=int, default=20)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--modes", default="all,per_criterion")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()

    responses, rubrics = make_data(args.responses, args.criteria)
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "tests", "fake_openai_server.py"), "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    figures = {}
    try:
        port = int(server.stdout.readline().split()[1])
        with tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes.split(","):
                cache, out = os.path.join(tmp, f"cache-{mode}"), os.path.join(tmp, f"grades-{mode}.jsonl")
                before = server_stats(port)
                c0 = time.process_time()
                dt, stats = asyncio.run(run_grading(port, responses, rubrics, mode, cache, out, args.concurrency))
                client_cpu = time.process_time() - c0
                after = server_stats(port)
                calls = after["requests"] - before["requests"]
                server_cpu = after["cpu_s"] - before["cpu_s"]
                print(f"{mode:>13}: CPU per call: client {1e3 * client_cpu / calls:.2f} ms, server {1e3 * server_cpu / calls:.2f} ms; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
                ideal = calls * args.latency / args.concurrency
                figures[f"{mode}_fraction"] = ideal / dt
                # Load-independent: calls per client CPU-second over the rate the ideal needs.
                figures[f"{mode}_cpu_headroom"] = (calls / client_cpu) / (args.concurrency / args.latency)
                print(f"{mode:>13}: {calls} calls in {dt:.2f} s (ideal {ideal:.2f} s) -> {ideal / dt:.3f} of ideal, {calls / dt:.0f} calls/s", flush=True)
                before = server_stats(port)["requests"]
                dt_warm, warm = asyncio.run(run_grading(port, responses, rubrics, mode, cache, out + ".warm", args.concurrency))
                figures[f"{mode}_warm_calls"] = server_stats(port)["requests"] - before
                print(f"{mode:>13}: warm rerun {figures[f'{mode}_warm_calls']} calls, {warm['cache_hits']} cache hits, {dt_warm:.2f} s", flush=True)
            if not args.no_peer:
                n_calls = len(responses)
                dt = asyncio.run(run_sdk_peer(port, responses, rubrics, args.concurrency))
                figures["sdk_peer_all_fraction"] = n_calls * args.latency / args.concurrency / dt
                print(f"  openai SDK peer (all mode, no cache): {dt:.2f} s -> {figures['sdk_peer_all_fraction']:.3f} of ideal", flush=True)
                if "all_fraction" in figures:
                    figures["rubrax_over_sdk_peer_all"] = figures["all_fraction"] / figures["sdk_peer_all_fraction"]
    finally:
        server.kill()
        server.wait()
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

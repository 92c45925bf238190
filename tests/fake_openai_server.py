"""A scriptable OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

Implements POST /v1/chat/completions, the files endpoints (upload, content) and the
batches endpoints (create, retrieve) that `rubrax.elicit.client` uses. Nothing leaves
the machine.

Scripting:
- `responder(body) -> str`: the assistant text for a request (or a tuple
  (text, finish_reason), e.g. "length" for a reply cut at max_tokens). The default
  (`auto_responder`) understands rubrax's prompt templates: the verifier says "yes" to a
  criterion containing a double-quoted word iff the response contains that word
  (case-insensitive), the proposer writes `Mentions "<word>"` criteria, the judge prefers
  the response with more distinct words; any other request with a `seed` (rubrax
  generate) gets `generated_answer`: some prompt words and filler, by model and seed.
- `latency`: seconds slept before answering each chat request.
- `faults`: a list of `Fault(kind, rate, attempts, ...)`. Whether a request is hit is
  decided by the hash of its body (deterministic under any concurrency); a hit request
  gets the fault on its first `attempts` arrivals, then is served normally.
  Kinds: "429" (with Retry-After), "500", "timeout" (sleeps `delay` seconds),
  "malformed" (HTTP 200, body not JSON), "partial" (valid body whose content is
  truncated JSON), "wrong_ids" (verifier answers with criterion ids that were not asked),
  "401" (not retryable), "reject_json" (400 when the request asks for JSON output).
- Counters: `requests`, `ok`, `ok_keys` (Counter of request keys answered with 200),
  `seen_keys` (Counter of request keys received), `status` (Counter of status codes).

In-process: `with FakeOpenAIServer(latency=0.01) as srv: srv.base_url`.
Separate process (benchmarks): `python tests/fake_openai_server.py --latency 0.1`
prints `PORT <n>`; GET /_stats returns the counters, POST /_config sets latency.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from rubrax.elicit.cache import request_key

_TAG_BLOCK = "<{tag}>\n(.*?)\n</{tag}>"


def _block(text: str, tag: str) -> str | None:
    m = re.search(_TAG_BLOCK.format(tag=tag), text, re.S)
    return None if m is None else m.group(1)


def _quoted(text: str) -> str | None:
    m = re.search(r'"([^"]+)"', text)
    return None if m is None else m.group(1).lower()


def auto_verdict(criterion: str, response: str) -> str:
    word = _quoted(criterion)
    if word is not None:
        return "yes" if word in response.lower() else "no"
    return "yes" if hashlib.sha256((criterion + "\0" + response).encode()).digest()[0] % 2 == 0 else "no"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]{4,}", text.lower())


def task_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"]
    for prefix, task in (
        ("You write grading rubrics", "propose"),
        ("You revise grading rubrics", "refine"),
        ("You are a strict grader. You check one response against a list", "verify_all"),
        ("You are a strict grader. You check one response against one", "verify_one"),
        ("You compare two responses", "judge"),
    ):
        if system.startswith(prefix):
            return task
    return "unknown"


def parse_criteria(block: str) -> list[tuple[str, str]]:
    return re.findall(r"^\[([^\]]+)\] (?:\(weight [^)]*\) )?(.*)$", block, re.M)


def auto_responder(body: dict[str, Any]) -> str:
    task = task_of(body)
    user = body["messages"][-1]["content"]
    if task == "verify_all":
        response = _block(user, "response") or ""
        return json.dumps({cid: auto_verdict(text, response) for cid, text in parse_criteria(_block(user, "criteria") or "")})
    if task == "verify_one":
        return json.dumps({"verdict": auto_verdict(_block(user, "criterion") or "", _block(user, "response") or "")})
    if task == "propose":
        words = list(dict.fromkeys(_words(_block(user, "prompt") or "")))[:3] or ["answer"]
        return json.dumps({"criteria": [{"criterion": f'Mentions "{w}"', "weight": 1 + i % 3} for i, w in enumerate(words)]})
    if task == "refine":
        crit = [{"criterion": t, "weight": 2} for _, t in parse_criteria(_block(user, "rubric") or "")]
        a, b = set(_words(_block(user, "response_a") or "")), set(_words(_block(user, "response_b") or ""))
        diff = sorted(a ^ b)
        if diff:
            crit.append({"criterion": f'Mentions "{diff[0]}"', "weight": 3})
        return json.dumps({"criteria": crit})
    if task == "judge":
        n1 = len(set(_words(_block(user, "response_1") or "")))
        n2 = len(set(_words(_block(user, "response_2") or "")))
        return json.dumps({"winner": 1 if n1 >= n2 else 2})
    if "seed" in body:  # a sampled answer (rubrax generate): varies with the model and the seed
        return generated_answer(user, body.get("model", "?"), int(body["seed"]))
    return "I do not understand."


FILLER = ("indeed", "perhaps", "notably", "clearly", "briefly", "overall", "however", "moreover", "thus", "finally")


def generated_answer(prompt: str, model: str, seed: int) -> str:
    """Some of the prompt's words and some filler, chosen by a hash of (model, seed, prompt)."""
    h = hashlib.sha256(f"{model}\0{seed}\0{prompt}".encode()).digest()
    words = list(dict.fromkeys(_words(prompt)))
    kept = [w for i, w in enumerate(words) if h[i % len(h)] % 3]
    return " ".join(kept + [FILLER[b % len(FILLER)] for b in h[: 1 + h[0] % 4]])


@dataclasses.dataclass
class Fault:
    kind: str  # 429 | 500 | 401 | timeout | malformed | partial | wrong_ids | reject_json
    rate: float = 1.0
    attempts: int = 1
    retry_after: float = 0.05
    delay: float = 5.0

    def hits(self, key: str) -> bool:
        h = int(hashlib.sha256((self.kind + key).encode()).hexdigest()[:8], 16)
        return h % 10_000 < self.rate * 10_000


def completion(content: str, model: str, prompt_chars: int, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(content) // 4 + 1, "total_tokens": prompt_chars // 4 + len(content) // 4 + 2},
    }


class FakeOpenAIServer:
    def __init__(self, *, responder: Callable[[dict[str, Any]], str] | None = None, latency: float = 0.0, faults: Sequence[Fault] = (), batch_polls: int = 2, port: int = 0):
        self.responder = responder or auto_responder
        self.latency = latency
        self.faults = list(faults)
        self.batch_polls = batch_polls
        self.port = port
        self.reset_counts()
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    def reset_counts(self) -> None:
        self.requests = 0
        self.ok = 0
        self.ok_keys: Counter[str] = Counter()
        self.seen_keys: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.batch_creates = 0
        self.inflight = 0
        self.max_inflight = 0
        self.auth_headers: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests += 1
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self.status[400] += 1
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        key = request_key(body)
        seen = self.seen_keys[key]
        self.seen_keys[key] += 1
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._answer(body, key, seen, len(raw))
        finally:
            self.inflight -= 1

    async def _answer(self, body: dict[str, Any], key: str, seen: int, size: int) -> web.StreamResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        for fault in self.faults:
            if seen < fault.attempts and fault.hits(key):
                resp = await self._fault(fault, body)
                if resp is not None:
                    self.status[resp.status] += 1
                    return resp
                break
        content, finish = self.responder(body), "stop"
        if isinstance(content, tuple):
            content, finish = content
        for fault in self.faults:
            if seen < fault.attempts and fault.hits(key):
                content = self._corrupt(fault, content)
        self.status[200] += 1
        self.ok += 1
        self.ok_keys[key] += 1
        return web.json_response(completion(content, body.get("model", "?"), size, finish))

    async def _fault(self, fault: Fault, body: dict[str, Any]) -> web.StreamResponse | None:
        if fault.kind == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": f"{fault.retry_after:g}"})
        if fault.kind == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        if fault.kind == "401":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        if fault.kind == "reject_json" and "response_format" in body:
            return web.json_response({"error": {"message": "response_format is not supported"}}, status=400)
        if fault.kind == "malformed":
            return web.Response(status=200, text='{"id": "chatcmpl-x", "choices": [{"message": ', content_type="application/json")
        return None  # content faults: served with a corrupted content

    @staticmethod
    def _corrupt(fault: Fault, content: str) -> str:
        if fault.kind == "partial":
            return content[: max(1, int(len(content) * 0.6))]
        if fault.kind == "wrong_ids":
            try:
                obj = json.loads(content)
            except json.JSONDecodeError:
                return content
            if isinstance(obj, dict) and "verdict" not in obj:
                return json.dumps({f"x{k}": v for k, v in obj.items()})
        return content

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        data = form["file"].file.read()
        fid = f"file-{len(self._files)}"
        self._files[fid] = data
        return web.json_response({"id": fid, "object": "file", "bytes": len(data), "created_at": 0, "filename": "in.jsonl", "purpose": "batch", "status": "processed"})

    async def _content(self, request: web.Request) -> web.StreamResponse:
        fid = request.match_info["fid"]
        if fid not in self._files:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=self._files[fid], content_type="application/octet-stream")

    def _batch_obj(self, b: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": b["id"], "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": b["input_file_id"],
            "completion_window": "24h", "status": b["status"], "created_at": 0, "output_file_id": b.get("output_file_id"),
            "request_counts": {"total": b["total"], "completed": b["done"], "failed": 0},
        }

    async def _batch_create(self, request: web.Request) -> web.StreamResponse:
        args = await request.json()
        self.batch_creates += 1
        lines = [json.loads(x) for x in self._files[args["input_file_id"]].decode().splitlines() if x.strip()]
        bid = f"batch-{len(self._batches)}"
        self._batches[bid] = {"id": bid, "input_file_id": args["input_file_id"], "status": "validating", "polls": 0, "lines": lines, "total": len(lines), "done": 0}
        return web.json_response(self._batch_obj(self._batches[bid]))

    async def _batch_get(self, request: web.Request) -> web.StreamResponse:
        b = self._batches.get(request.match_info["bid"])
        if b is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        b["polls"] += 1
        if b["status"] != "completed" and b["polls"] >= self.batch_polls:
            out = []
            for line in b["lines"]:
                content = self.responder(line["body"])
                out.append(json.dumps({"id": "r", "custom_id": line["custom_id"], "response": {"status_code": 200, "request_id": "q", "body": completion(content, line["body"]["model"], len(json.dumps(line["body"])))}, "error": None}))
            fid = f"file-{len(self._files)}"
            self._files[fid] = ("\n".join(out) + "\n").encode()
            b.update(status="completed", output_file_id=fid, done=b["total"])
        elif b["status"] == "validating":
            b["status"] = "in_progress"
        return web.json_response(self._batch_obj(b))

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"requests": self.requests, "ok": self.ok, "unique_ok": len(self.ok_keys), "cpu_s": time.process_time(), "status": {str(k): v for k, v in self.status.items()}})

    async def _config(self, request: web.Request) -> web.StreamResponse:
        args = await request.json()
        if "latency" in args:
            self.latency = float(args["latency"])
        if args.get("reset"):
            self.reset_counts()
        return web.json_response({"latency": self.latency})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{fid}/content", self._content)
        app.router.add_post("/v1/batches", self._batch_create)
        app.router.add_get("/v1/batches/{bid}", self._batch_get)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_config", self._config)
        return app

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeOpenAIServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency, port=args.port)

    async def serve() -> None:
        await server._start()
        print(f"PORT {server.port}", flush=True)
        while True:
            await asyncio.sleep(3600)

    try:
        import uvloop  # noqa: F401  (faster when installed; not required)

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()

"""Async chat client for OpenAI-compatible endpoints (OpenAI, vLLM, LiteLLM, SGLang ...).

`ChatClient.chat(messages, **sampling)` returns the assistant text of one completion:

- the request body {model, messages, sampling params} is looked up in a persistent
  `ResponseCache` first (a hit costs nothing and is counted); identical requests in
  flight at the same time are sent once;
- at most `concurrency` requests are in flight (a semaphore held only while a request
  is on the wire, never while backing off);
- 429, 408, 409, 5xx, timeouts, connection errors and malformed bodies are retried up to
  `max_retries` times with exponential backoff and full jitter,
  delay = U(0, min(backoff_max_s, backoff_base_s * 2^attempt)); a Retry-After (or
  retry-after-ms) header is honoured: the wait is at least what the server asked for;
- every attempt has its own timeout (`timeout_s`);
- other 4xx errors fail at once; a 400 while asking for JSON output retries once without
  `response_format` and stops asking (servers that lack JSON mode);
- token usage and cost are accumulated in `ClientStats`.

Transport: "aiohttp" (default) posts the OpenAI wire format directly, about 0.5 ms of CPU
per call including the grading around it; "sdk" goes through the `openai` SDK's async client, about 1-3 ms of CPU per call
(its request building and connection pool), which caps one process near 300-700 calls/s.
The Batch API always uses the SDK.

The API key comes from the argument or the environment variable `api_key_env`
(OPENAI_API_KEY); it is kept in a redacted holder and goes only into the Authorization
header: never into a config, a repr, a log line, the cache or an output file. `submit_batch` sends many requests through the Batch API
(files + batches endpoints), polls, stores results in the same cache, and resumes a
submitted batch after a crash (its id is kept in a state file in the cache directory).

Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rubrax.elicit.cache import ResponseCache, canonical_json, request_key

# List prices, US$ per million tokens (input, output), as published by OpenAI for the
# paper's models; pass `price_per_mtok` for any other model (cost is None otherwise).
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
}
_RETRY_STATUS = frozenset({408, 409, 429})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Endpoint, limits and retry policy of a `ChatClient`.

    base_url None reads OPENAI_BASE_URL, else the SDK's default (api.openai.com).
    The key is not a field: it is read from `api_key_env` when the client is built.
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 600.0
    cache_dir: str | None = None
    json_mode: bool = True
    price_per_mtok: tuple[float, float] | None = None
    jitter_seed: int | None = None
    transport: str = "aiohttp"

    def __post_init__(self) -> None:
        if self.transport not in ("aiohttp", "sdk"):
            raise ValueError(f"ClientConfig.transport must be 'aiohttp' or 'sdk', got {self.transport!r}")
        if not self.model:
            raise ValueError("ClientConfig.model must be set")
        if self.concurrency < 1:
            raise ValueError(f"ClientConfig.concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"ClientConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"ClientConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("ClientConfig backoff times must be >= 0")
        if self.price_per_mtok is not None and (len(self.price_per_mtok) != 2 or min(self.price_per_mtok) < 0):
            raise ValueError(f"ClientConfig.price_per_mtok must be (input, output) >= 0, got {self.price_per_mtok}")


@dataclasses.dataclass
class ClientStats:
    """Counters of one client. `calls` = completions received from the server."""

    calls: int = 0
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    batch_requests: int = 0

    def summary(self) -> str:
        cost = "unknown (no price for this model)" if self.cost_usd is None else f"${self.cost_usd:.4f}"
        return (
            f"calls={self.calls} cache_hits={self.cache_hits} retries={self.retries} failures={self.failures} truncated={self.truncated} "
            f"batch_requests={self.batch_requests} prompt_tokens={self.prompt_tokens} "
            f"completion_tokens={self.completion_tokens} cost={cost}"
        )


class ChatError(RuntimeError):
    """A request that failed for good (after retries, or not retryable)."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Collected(ChatError):
    """Raised by `chat` in collecting mode: the request was recorded, not sent."""


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


@dataclasses.dataclass(frozen=True)
class Completion:
    """The assistant text of one completion and why it ended ("stop", "length" when cut
    at max_tokens, None when the server did not say)."""

    content: str
    finish_reason: str | None = None


def _parse_completion(text: str) -> dict[str, Any]:
    """{'content', 'finish_reason', 'usage'} of a chat-completion body; _Retryable when malformed."""
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise _Retryable(f"malformed completion body ({type(err).__name__})") from None
    if not isinstance(content, str):
        raise _Retryable("completion has no text content")
    usage = data.get("usage") or {}
    finish = choice.get("finish_reason") if isinstance(choice, Mapping) else None
    return {
        "content": content,
        "finish_reason": finish if isinstance(finish, str) else None,
        "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": int(usage.get("completion_tokens") or 0)},
    }


class ChatClient:
    """See the module docstring. Use as `async with ChatClient(cfg) as client:` or call `aclose()`."""

    def __init__(self, config: ClientConfig, *, api_key: str | None = None):
        self.config = config
        self.base_url = (config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = api_key or os.environ.get(config.api_key_env)
        if not key:
            if config.base_url is None and "OPENAI_BASE_URL" not in os.environ:
                raise ChatError(f"no API key: set the {config.api_key_env} environment variable")
            key = "EMPTY"  # local servers (vLLM, SGLang) accept any key
        self._key = _Secret(key)
        self._sdk_client: Any = None
        self._session: Any = None
        self.cache = ResponseCache(config.cache_dir)
        self.stats = ClientStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem = asyncio.Semaphore(config.concurrency)
        self._inflight: dict[str, asyncio.Future] = {}
        self._json_ok = config.json_mode
        self._rng = random.Random(config.jitter_seed)
        self._collect: dict[str, dict[str, Any]] | None = None
        self._prices = config.price_per_mtok or PRICES_PER_MTOK.get(config.model)
        if self._prices is None:
            self.stats.cost_usd = None

    def _bind_loop(self) -> None:
        """Connections, the semaphore and in-flight futures belong to one event loop. A
        synchronous caller that runs `asyncio.run` per batch brings a new loop each time:
        start fresh connection state for it (the cache and the counters are kept)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            _abandon(self._session)
            self._session = self._sdk_client = None
            self._sem = asyncio.Semaphore(self.config.concurrency)
            self._inflight = {}
        self._loop = loop

    @property
    def _sdk(self) -> Any:
        """The openai SDK client (built on first use: Batch API, or transport="sdk")."""
        if self._sdk_client is None:
            import openai

            # Retries are ours (backoff, Retry-After, counting), so the SDK's are off.
            self._sdk_client = openai.AsyncOpenAI(api_key=self._key.value, base_url=self.base_url, max_retries=0, timeout=self.config.timeout_s)
        return self._sdk_client

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._key.value}", "Content-Type": "application/json"}
        for env, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(env):
                headers[header] = os.environ[env]
        return headers

    def __repr__(self) -> str:
        return f"ChatClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connections and the cache. From a loop other than the one the
        connections were made on (a reward graded on a background loop, closed later),
        their sockets are closed directly."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self.close()
            return
        if self._sdk_client is not None:
            await self._sdk_client.close()
        if self._session is not None:
            await self._session.close()
        self._sdk_client = self._session = None
        self.cache.close()

    def close(self) -> None:
        """Synchronous close, for when no event loop of the client's runs any more."""
        _abandon(self._session)
        self._session = self._sdk_client = None
        self.cache.close()

    # ------------------------------------------------------------------ requests

    def body(self, messages: Sequence[Mapping[str, str]], *, json_output: bool = False, **sampling: Any) -> dict[str, Any]:
        """The request body sent for these messages and sampling parameters (None values dropped)."""
        body: dict[str, Any] = {"model": self.config.model, "messages": [dict(m) for m in messages]}
        body.update({k: v for k, v in sampling.items() if v is not None})
        if json_output and self._json_ok:
            body["response_format"] = {"type": "json_object"}
        return body

    async def chat(self, messages: Sequence[Mapping[str, str]], *, json_output: bool = False, **sampling: Any) -> str:
        """The assistant text for `messages`; raises ChatError when the call failed for good."""
        return (await self.chat_detailed(messages, json_output=json_output, **sampling)).content

    async def chat_detailed(self, messages: Sequence[Mapping[str, str]], *, json_output: bool = False, **sampling: Any) -> Completion:
        """`chat` with the finish reason (a completion cut at max_tokens says "length")."""
        self._bind_loop()
        if self.cache.closed:  # used again after close(): a second run with the same reward
            self.cache = ResponseCache(self.config.cache_dir)
        body = self.body(messages, json_output=json_output, **sampling)
        data = canonical_json(body)
        key = hashlib.sha256(data).hexdigest()
        if self._collect is not None:
            self._collect[key] = body
            raise _Collected(key)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return Completion(hit["content"], hit.get("finish_reason"))
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.cache_hits += 1
            done = await asyncio.shield(pending)
            return Completion(done["content"], done.get("finish_reason"))
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._send(body, key, data)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(err)
                fut.exception()  # mark retrieved: waiters (if any) re-raise it
            raise
        else:
            fut.set_result(result)
        finally:
            del self._inflight[key]
        return Completion(result["content"], result.get("finish_reason"))

    def _account(self, usage: Mapping[str, int]) -> None:
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        if self._prices is not None and self.stats.cost_usd is not None:
            p_in, p_out = self._prices
            self.stats.cost_usd += (usage["prompt_tokens"] * p_in + usage["completion_tokens"] * p_out) / 1e6

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * (2.0**attempt))
        delay = self._rng.uniform(0.0, cap)
        if retry_after is not None:
            # At least what the server asked for, plus a little jitter so waiters spread out.
            delay = retry_after + self._rng.uniform(0.0, 0.1 * retry_after + 0.01)
        return delay

    async def _send(self, body: dict[str, Any], key: str, data: bytes | None = None) -> dict[str, Any]:
        last = "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            try:
                async with self._sem:
                    self.stats.attempts += 1
                    result = await self._post(body, data)
            except _Retryable as err:
                last = str(err)
                if err.retry_after is not None and err.retry_after > self.config.retry_after_max_s:
                    break
                if attempt < self.config.max_retries:
                    await asyncio.sleep(self._backoff(attempt, err.retry_after))
                continue
            except _JsonModeRejected:
                self._json_ok = False
                body = {k: v for k, v in body.items() if k != "response_format"}
                return await self._send(body, key)
            except ChatError:
                self.stats.failures += 1
                raise
            self.stats.calls += 1
            self.stats.truncated += result.get("finish_reason") == "length"
            self._account(result["usage"])
            self.cache.put(key, result)
            return result
        self.stats.failures += 1
        raise ChatError(f"request failed after {self.config.max_retries + 1} attempts: {last}")

    async def _post(self, body: dict[str, Any], data: bytes | None = None) -> dict[str, Any]:
        if self.config.transport == "sdk":
            return await self._post_sdk(body)
        return await self._post_aiohttp(body, data if data is not None else canonical_json(body))

    def _status_error(self, status: int, headers: Mapping[str, str] | None, message: str, body: Mapping[str, Any]) -> Exception:
        if status in _RETRY_STATUS or status >= 500:
            return _Retryable(f"HTTP {status}", _retry_after(headers))
        if status == 400 and "response_format" in body:
            return _JsonModeRejected()
        return ChatError(f"HTTP {status}: {_short(message)}")

    async def _post_aiohttp(self, body: dict[str, Any], data: bytes) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.concurrency), headers=self._headers()
            )
        try:
            async with self._session.post(
                self.base_url + "/chat/completions", data=data,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            ) as resp:
                text = await resp.text(errors="replace")
                if resp.status != 200:
                    raise self._status_error(resp.status, resp.headers, text, body)
        except asyncio.TimeoutError:
            raise _Retryable(f"timed out after {self.config.timeout_s:g} s") from None
        except aiohttp.ClientError as err:
            raise _Retryable(f"connection error: {type(err).__name__}") from None
        return _parse_completion(text)

    async def _post_sdk(self, body: dict[str, Any]) -> dict[str, Any]:
        import openai

        extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
        try:
            raw = await self._sdk.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"], extra_body=extra, timeout=self.config.timeout_s
            )
            text = raw.http_response.text
        except openai.APITimeoutError:
            raise _Retryable(f"timed out after {self.config.timeout_s:g} s") from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection error: {type(err).__name__}") from None
        except openai.APIStatusError as err:
            raise self._status_error(err.status_code, err.response.headers, err.message, body) from None
        return _parse_completion(text)

    # ------------------------------------------------------------------ batch API

    @contextlib.contextmanager
    def collecting(self):
        """Within this block `chat` records request bodies ({key: body}) instead of sending them.

        Used to learn which calls a job will make, so that they can go through the Batch
        API first; the calls then made for real are cache hits.
        """
        self._collect = {}
        try:
            yield self._collect
        finally:
            self._collect = None

    async def submit_batch(self, bodies: Mapping[str, Mapping[str, Any]], *, poll_s: float = 30.0, max_per_batch: int = 50_000, progress: Any = None) -> int:
        """Sends the uncached `bodies` ({request key: body}) through the Batch API and waits.

        Results go to the cache; requests the batch could not answer are left for live
        calls. A batch already submitted for the same requests (state file in the cache
        directory) is resumed, not resubmitted. Returns the number of results stored.
        """
        todo = {k: dict(b) for k, b in bodies.items() if k not in self.cache}
        stored = 0
        keys = sorted(todo)
        for start in range(0, len(keys), max_per_batch):
            chunk = {k: todo[k] for k in keys[start : start + max_per_batch]}
            stored += await self._run_batch(chunk, poll_s, progress)
        return stored

    def _state_path(self, keys: Sequence[str]) -> str | None:
        if self.cache.path is None:
            return None
        digest = request_key({"batch": sorted(keys)})[:16]
        return os.path.join(os.path.dirname(self.cache.path), f"batch-{digest}.json")

    async def _run_batch(self, chunk: dict[str, dict[str, Any]], poll_s: float, progress: Any) -> int:
        state_path = self._state_path(list(chunk))
        state = None
        if state_path and os.path.exists(state_path):
            with open(state_path) as f:
                state = json.load(f)
        if state is None:
            lines = [json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": b}, ensure_ascii=False) for k, b in chunk.items()]
            payload = ("\n".join(lines) + "\n").encode("utf-8")
            file = await self._sdk.files.create(file=("rubrax-batch.jsonl", io.BytesIO(payload)), purpose="batch")
            batch = await self._sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
            state = {"batch_id": batch.id, "input_file_id": file.id}
            if state_path:
                tmp = state_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(state, f)
                os.replace(tmp, state_path)
        self.stats.batch_requests += len(chunk)
        while True:
            batch = await self._sdk.batches.retrieve(state["batch_id"])
            if progress is not None and getattr(batch, "request_counts", None) is not None:
                progress(batch.status, batch.request_counts.completed, batch.request_counts.total)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(poll_s)
        stored = 0
        if batch.output_file_id:
            content = await self._sdk.files.content(batch.output_file_id)
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                key, resp = rec.get("custom_id"), rec.get("response") or {}
                if key not in chunk or resp.get("status_code") != 200:
                    continue
                try:
                    result = _parse_completion(json.dumps(resp.get("body")))
                except _Retryable:
                    continue
                self.cache.put(key, result)
                self._account(result["usage"])
                stored += 1
        if state_path and os.path.exists(state_path):
            os.remove(state_path)
        return stored


class _JsonModeRejected(Exception):
    pass


def _abandon(session: Any) -> None:
    """Drops an aiohttp session whose event loop has ended, closing its sockets directly
    (the loop that owned them cannot run the usual async close any more)."""
    if session is None:
        return
    connector, session._connector = session.connector, None
    if connector is None:
        return
    for conns in list(getattr(connector, "_conns", {}).values()):
        for proto, _ in conns:
            transport = getattr(proto, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            with contextlib.suppress(Exception):
                sock.close()
    connector._conns = {}
    connector._closed = True


class _Secret:
    """Holds the API key so that no repr, vars() dump or log line shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."

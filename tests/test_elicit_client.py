"""The chat client against a local fake OpenAI-compatible server (no network)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from fake_openai_server import FakeOpenAIServer, Fault

from rubrax.elicit.cache import request_key
from rubrax.elicit.client import ChatClient, ChatError, ClientConfig

SECRET = "sk-test-DO-NOT-STORE-1234567890"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=lambda body: "reply to " + body["messages"][-1]["content"]) as srv:
        yield srv


def cfg(server, tmp_path=None, **kw):
    base = dict(model="m", base_url=server.base_url, concurrency=8, timeout_s=5.0, max_retries=3, backoff_base_s=0.01, jitter_seed=0)
    base.update(kw)
    if tmp_path is not None:
        base.setdefault("cache_dir", str(tmp_path / "cache"))
    return ClientConfig(**base)


async def chat_once(config, messages=MSG, **kw):
    async with ChatClient(config, api_key=SECRET) as client:
        return await client.chat(messages, **kw), client.stats


def test_cache_persists_and_key_is_never_stored(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    config = cfg(server, tmp_path)
    text, stats = asyncio.run(chat_once(config, temperature=0.0))
    assert text == "reply to hello" and stats.calls == 1 and server.ok == 1
    # a new client on the same cache directory makes no call
    text2, stats2 = asyncio.run(chat_once(config, temperature=0.0))
    assert text2 == text and stats2.calls == 0 and stats2.cache_hits == 1 and server.requests == 1
    # different sampling parameters are a different request
    asyncio.run(chat_once(config, temperature=0.5))
    assert server.requests == 2
    # the key went to the server, and nowhere on disk or in a repr
    assert server.auth_headers[0] == f"Bearer {SECRET}"
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read()
    client = ChatClient(config)
    assert SECRET not in repr(client) and SECRET not in repr(config) and SECRET not in str(vars(client))
    asyncio.run(client.aclose())


def test_missing_key_for_openai_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ChatError, match="OPENAI_API_KEY"):
        ChatClient(ClientConfig(model="gpt-4.1"))


@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
def test_429_retry_after_is_honoured(server, transport):
    server.faults = [Fault("429", attempts=2, retry_after=0.3)]
    t0 = time.perf_counter()
    text, stats = asyncio.run(chat_once(cfg(server, transport=transport)))
    assert text == "reply to hello"
    assert time.perf_counter() - t0 >= 0.6  # two waits of at least Retry-After
    assert stats.retries == 2 and server.status[429] == 2 and server.ok == 1


def test_500_timeout_and_malformed_bodies_are_retried(server):
    server.faults = [Fault("500", attempts=1)]
    assert asyncio.run(chat_once(cfg(server)))[0] == "reply to hello"
    server.faults = [Fault("timeout", attempts=1, delay=1.0)]
    t0 = time.perf_counter()
    text, stats = asyncio.run(chat_once(cfg(server, timeout_s=0.3), [{"role": "user", "content": "slow"}]))
    assert text == "reply to slow" and stats.retries == 1 and time.perf_counter() - t0 < 2.5
    server.faults = [Fault("malformed", attempts=2)]
    text, stats = asyncio.run(chat_once(cfg(server), [{"role": "user", "content": "bad"}]))
    assert text == "reply to bad" and stats.retries == 2


def test_permanent_failure_is_counted_and_raised(server):
    server.faults = [Fault("500", attempts=10**6)]
    server.reset_counts()

    async def go():
        async with ChatClient(cfg(server, max_retries=2), api_key=SECRET) as c:
            with pytest.raises(ChatError, match="after 3 attempts: HTTP 500"):
                await c.chat(MSG)
            return c.stats

    stats = asyncio.run(go())
    assert server.requests == 3 and stats.failures == 1 and stats.calls == 0


def test_non_retryable_status_fails_at_once(server):
    server.faults = [Fault("401", attempts=10**6)]

    async def go():
        async with ChatClient(cfg(server), api_key=SECRET) as c:
            with pytest.raises(ChatError, match="HTTP 401"):
                await c.chat(MSG)

    asyncio.run(go())
    assert server.requests == 1


def test_json_mode_falls_back_when_rejected(server):
    server.faults = [Fault("reject_json", attempts=10**6)]

    async def go():
        async with ChatClient(cfg(server), api_key=SECRET) as c:
            a = await c.chat(MSG, json_output=True)
            b = await c.chat([{"role": "user", "content": "again"}], json_output=True)
            return a, b, c

    a, b, c = asyncio.run(go())
    assert (a, b) == ("reply to hello", "reply to again") and not c._json_ok
    assert server.status[400] == 1 and server.ok == 2  # JSON mode is asked once only


def test_concurrency_bound_and_inflight_dedup(server):
    server.latency = 0.05

    async def go():
        async with ChatClient(cfg(server, concurrency=4), api_key=SECRET) as c:
            await asyncio.gather(*(c.chat([{"role": "user", "content": f"q{i}"}]) for i in range(24)))
            same = await asyncio.gather(*(c.chat([{"role": "user", "content": "same"}]) for _ in range(10)))
            return same, c.stats

    same, stats = asyncio.run(go())
    assert 3 <= server.max_inflight <= 4
    assert same == ["reply to same"] * 10 and server.ok == 25 and stats.cache_hits == 9


def test_usage_and_cost_accounting(server):
    async def go():
        async with ChatClient(cfg(server, model="gpt-4.1-mini"), api_key=SECRET) as c:
            await c.chat(MSG)
            return c, c.body(MSG)

    c, body = asyncio.run(go())
    assert c.stats.prompt_tokens > 0 and c.stats.completion_tokens > 0
    expected = (c.stats.prompt_tokens * 0.40 + c.stats.completion_tokens * 1.60) / 1e6
    assert c.stats.cost_usd == pytest.approx(expected)
    assert request_key(body) in server.ok_keys  # the cache key is the key of the body sent
    unknown = asyncio.run(chat_once(cfg(server, model="my-local-model")))[1]
    assert unknown.cost_usd is None and "unknown" in unknown.summary()


def test_batch_api_fills_cache_and_resumes(server, tmp_path):
    server.batch_polls = 3
    msgs = [[{"role": "user", "content": f"b{i}"}] for i in range(5)]

    async def collect(c):
        with c.collecting() as bodies:
            for m in msgs:
                with pytest.raises(ChatError):
                    await c.chat(m, temperature=0.0)
        return bodies

    async def crash_while_polling():
        async with ChatClient(cfg(server, tmp_path), api_key=SECRET) as c:
            bodies = await collect(c)
            task = asyncio.ensure_future(c.submit_batch(bodies, poll_s=10.0))
            while server.batch_creates == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            task.cancel()

    async def resume():
        async with ChatClient(cfg(server, tmp_path), api_key=SECRET) as c:
            stored = await c.submit_batch(await collect(c), poll_s=0.01)
            texts = [await c.chat(m, temperature=0.0) for m in msgs]
            return stored, texts, c.stats

    asyncio.run(crash_while_polling())
    stored, texts, stats = asyncio.run(resume())
    assert server.batch_creates == 1  # resumed, not resubmitted
    assert stored == 5 and texts == [f"reply to b{i}" for i in range(5)]
    assert server.requests == 0 and stats.cache_hits == 5 and stats.calls == 0
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith("batch-")]


def test_cache_log_survives_a_torn_line_and_shares_between_processes(tmp_path):
    from rubrax.elicit.cache import CACHE_FILE, ResponseCache

    a = ResponseCache(tmp_path)
    a.put("a" * 64, {"content": "one"})
    b = ResponseCache(tmp_path)  # a second writer on the same log
    b.put("b" * 64, {"content": "two"})
    a.put("c" * 64, {"content": "three"})
    assert a.get("c" * 64) == {"content": "three"} and b.get("b" * 64) == {"content": "two"}
    with open(tmp_path / CACHE_FILE, "ab") as f:  # a crash in the middle of a line
        f.write(b"d" * 64 + b'\t{"content": "fo')
    c = ResponseCache(tmp_path)
    assert sorted(c.keys()) == ["a" * 64, "b" * 64, "c" * 64] and "d" * 64 not in c
    c.put("e" * 64, {"content": "five"})
    assert ResponseCache(tmp_path).get("e" * 64) == {"content": "five"} and len(ResponseCache(tmp_path)) == 4

"""Reward calls that cannot hang a run: a deadline on every call, a pool that survives hung judges.

    runner = DeadlineRunner(reward_fn, timeout_s=60, chunk_size=16)
    rewards, counts = runner.submit(prompts, completions, columns).result()
    runner.close()

The rows are scored in chunks of `chunk_size`, concurrently, on an asyncio loop in a
daemon thread (so the caller can sample on the device meanwhile). Each chunk call has a
deadline of `timeout_s` seconds from its submission:
  * an async reward (`acall` awaiting a judge) is cancelled at the deadline; it is never
    awaited again, so even one that swallows the cancellation cannot block the run;
  * a sync reward (`__call__`, or an `acall` that hands work to `asyncio.to_thread`) runs
    on the loop's default executor, a `DaemonExecutor`: a bounded set of daemon threads
    in which a worker busy past the deadline is abandoned (left to finish or hang on its
    own; it no longer counts) and replaced, so later calls of a judge that recovered are
    served at once. Daemon threads never keep the process alive after the run.
A chunk that times out, raises, or returns something malformed (wrong length, strings,
a dict ...) becomes `valid=False`, never a 0, and is counted under "timeouts",
"exceptions" or "malformed" (rows); a wrapped callable that raised (`CallableReward`
records it as an invalid batch) counts as an exception too. The first failure of each
kind is logged once as a warning with a sample of the error.

Host side only: no jax.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.rewards.base import MalformedReward, RewardBatch, as_reward_fn

log = logging.getLogger("rubrax.rewards")

FAILURE_KINDS = ("timeouts", "exceptions", "malformed")


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """A bounded thread pool of daemon workers that abandons (and replaces) hung ones.

    At most `max_workers` workers count at a time. A worker whose current call started more
    than `hang_s` seconds ago is abandoned when the pool is next used: it stops counting and
    a new worker may start. `max_abandoned` bounds the threads left hanging; beyond it,
    submissions fail (the judge is down; the run's invalid-steps rule then stops it).
    A ThreadPoolExecutor only in type (asyncio's set_default_executor asks for one): none
    of its machinery is used, since its threads are joined at interpreter exit.
    """

    def __init__(self, max_workers: int, *, hang_s: float | None, max_abandoned: int = 64, name: str = "rubrax-reward"):
        if max_workers < 1:
            raise ValueError(f"DaemonExecutor: max_workers must be >= 1, got {max_workers}")
        super().__init__(max_workers)
        self.max_workers, self.hang_s, self.max_abandoned, self.name = max_workers, hang_s, max_abandoned, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy: dict[threading.Thread, float] = {}  # counted worker -> start of its current call
        self._live = 0  # counted workers (idle or busy)
        self._idle = 0  # workers waiting for a job
        self._pending = 0  # jobs queued, not yet taken
        self.abandoned = 0  # threads left behind on a hung call (still running)
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self.name}: executor is shut down")
            self._reap()
            if self.abandoned >= self.max_abandoned:
                raise RuntimeError(f"{self.name}: {self.abandoned} reward calls are hung; refusing new ones")
            self._pending += 1
            self._jobs.put((fut, fn, args, kwargs))
            self._grow()
        return fut

    def _grow(self) -> None:
        while self._pending > self._idle and self._live < self.max_workers:
            self._spawn()

    def _spawn(self) -> None:
        self._live += 1
        self._idle += 1  # counted as waiting from now, so that one job spawns one worker
        threading.Thread(target=self._work, name=f"{self.name}-{self._live + self.abandoned}", daemon=True).start()

    def _reap(self) -> None:
        """Abandons counted workers whose call has run past hang_s; replaces them if work waits."""
        if self.hang_s is None:
            return
        now = time.monotonic()
        for thread, started in list(self._busy.items()):
            if now - started > self.hang_s:
                del self._busy[thread]
                self._live -= 1
                self.abandoned += 1
        self._grow()

    def reap(self) -> None:
        with self._lock:
            self._reap()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._live -= 1
                    return
                self._pending -= 1
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():  # its caller's deadline passed while it waited
                with self._lock:
                    self._idle += 1
                continue
            with self._lock:
                self._busy[me] = time.monotonic()
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(err)
            with self._lock:
                if self._busy.pop(me, None) is None:  # abandoned meanwhile: a replacement took our place
                    self.abandoned -= 1
                    return
                self._idle += 1
                self._grow()

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stops idle workers; never waits for a hung one (daemon threads do not block exit)."""
        with self._lock:
            self._shutdown = True
            for _ in range(self._live):
                self._jobs.put(None)


class DeadlineRunner:
    """Chunked reward calls with deadlines on a background asyncio loop; counts failures."""

    def __init__(self, reward_fn: Any, *, timeout_s: float | None, chunk_size: int, max_workers: int | None = None):
        self.fn = as_reward_fn(reward_fn)
        self.timeout_s, self.chunk_size = timeout_s, chunk_size
        self.executor = DaemonExecutor(max_workers or 16, hang_s=timeout_s)
        self._warned: set[str] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self.executor)  # asyncio.to_thread lands here, not in a shared pool
        self._thread = threading.Thread(target=self._loop.run_forever, name="rubrax-rewards", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]):
        """Starts the reward computation; returns a Future of (RewardBatch, {kind: rows})."""
        return asyncio.run_coroutine_threadsafe(self._all(list(prompts), list(completions), dict(columns)), self._loop)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> tuple[RewardBatch, dict[str, int]]:
        return self.submit(prompts, completions, columns).result()

    async def _one(self, prompts, completions, columns) -> tuple[RewardBatch, str | None]:
        n = len(completions)
        task = asyncio.ensure_future(self.fn.acall(prompts, completions, **columns))
        done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        if not done:
            task.cancel()  # not awaited: a reward that ignores cancellation cannot hold us
            task.add_done_callback(_consume)
            self.executor.reap()
            return RewardBatch.invalid(n, f"timeout after {self.timeout_s}s"), "timeouts"
        try:
            out = task.result()
        except MalformedReward as err:
            return RewardBatch.invalid(n, f"malformed reward: {err}"), "malformed"
        except Exception as err:  # a failing judge must not end a long run: the rows become invalid
            return RewardBatch.invalid(n, f"{type(err).__name__}: {err}"), "exceptions"
        if not isinstance(out, RewardBatch) or len(out) != n:
            what = f"{len(out)} scores" if isinstance(out, RewardBatch) else type(out).__name__
            return RewardBatch.invalid(n, f"malformed reward: returned {what} for {n} completions"), "malformed"
        if n and all(i.get("failure") == "exception" for i in out.info):
            return out, "exceptions"
        return out, None

    async def _all(self, prompts, completions, columns):
        c = self.chunk_size
        calls = [
            self._one(prompts[s : s + c], completions[s : s + c], {k: list(v[s : s + c]) for k, v in columns.items()})
            for s in range(0, len(completions), c)
        ]
        parts = await asyncio.gather(*calls)
        counts = dict.fromkeys(FAILURE_KINDS, 0)
        for batch, failure in parts:
            if failure:
                counts[failure] += len(batch)
                self._warn_once(failure, batch)
        rb = RewardBatch.concat([p for p, _ in parts]) if parts else RewardBatch(np.zeros(0, np.float32), np.zeros(0, bool))
        return rb, counts

    def _warn_once(self, kind: str, batch: RewardBatch) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            sample = batch.info[0].get("error") if batch.info else None
            log.warning("reward call failed (%s; counted as reward_%s, rows masked; warned once): %s", kind, kind, sample)

    def close(self) -> None:
        """Closes the reward's connections (its `aclose`, on the loop that made them: no
        "Unclosed client session" at exit; at most 30 s), then stops the loop; hung calls are
        left to their daemon threads (they never block exit)."""
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self.fn, "aclose", None)
        if aclose is not None:
            try:
                asyncio.run_coroutine_threadsafe(aclose(), self._loop).result(timeout=30)
            except Exception as err:  # closing must not hide the run's own outcome
                log.warning("closing the reward function failed: %s: %s", type(err).__name__, err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        # A call still running (hung) would report to a closed loop when it ends: leave the
        # stopped loop open then (it costs one selector), close it otherwise.
        with self.executor._lock:
            busy = bool(self.executor._busy) or self.executor.abandoned > 0
        if not self._thread.is_alive() and not busy:
            self._loop.close()
        self.executor.shutdown(wait=False)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" noise at exit

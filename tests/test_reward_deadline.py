"""Issue 13 (2, 5): reward calls with deadlines on a pool that survives hung judges."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from rubrax.rewards.base import RewardBatch, RewardFnBase
from rubrax.rewards.deadline import DaemonExecutor, DeadlineRunner


class SyncJudge:
    """Hangs (until released) on its first `hang` calls, then answers at once."""

    def __init__(self, hang: int):
        self.hang, self.calls, self.release = hang, 0, threading.Event()
        self.lock = threading.Lock()

    def __call__(self, prompts, completions, **kw):
        with self.lock:
            self.calls += 1
            stuck = self.calls <= self.hang
        if stuck:
            self.release.wait()
        return [float(len(c)) for c in completions]


def test_hung_sync_workers_are_replaced_so_a_recovered_judge_is_served():
    judge = SyncJudge(hang=10)
    runner = DeadlineRunner(judge, timeout_s=0.2, chunk_size=1, max_workers=4)
    try:
        t0 = time.perf_counter()
        for _ in range(5):  # 10 hung calls: more than the pool's 4 workers, and than asyncio's default 6
            rb, counts = runner(["p", "p"], ["a", "bb"])
            assert counts["timeouts"] == 2 and not rb.valid.any()
        assert time.perf_counter() - t0 < 5 * 0.2 + 2
        rb, counts = runner(["p", "p"], ["a", "bb"])  # the judge recovered: served, not timed out
        assert counts == {"timeouts": 0, "exceptions": 0, "malformed": 0}
        np.testing.assert_array_equal(rb.scores, [1.0, 2.0])
        # the 8 calls of the first 4 rounds hung well past their deadline: abandoned; at most 4 workers count
        assert runner.executor.abandoned >= 8 and runner.executor._live <= 4
    finally:
        judge.release.set()
        runner.close()
    deadline = time.time() + 5
    while runner.executor.abandoned and time.time() < deadline:  # released threads retire themselves
        time.sleep(0.01)
    assert runner.executor.abandoned == 0


class Stubborn(RewardFnBase):
    """An async judge that swallows its cancellation and keeps waiting."""

    async def acall(self, prompts, completions, **columns):
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue


def test_async_reward_that_ignores_cancellation_cannot_hold_the_run():
    runner = DeadlineRunner(Stubborn(), timeout_s=0.2, chunk_size=2)
    t0 = time.perf_counter()
    rb, counts = runner(["p"] * 4, ["a"] * 4)
    assert time.perf_counter() - t0 < 2 and counts["timeouts"] == 4 and rb.num_invalid == 4
    runner.close()


def test_raising_and_malformed_rewards_are_counted_and_warned_once(caplog):
    def raises(prompts, completions):
        raise RuntimeError("judge exploded")

    caplog.set_level(logging.WARNING, "rubrax.rewards")
    runner = DeadlineRunner(raises, timeout_s=5, chunk_size=2)
    for _ in range(3):
        rb, counts = runner(["p"] * 4, ["a"] * 4)
        assert counts["exceptions"] == 4 and rb.num_invalid == 4
    assert sum("exceptions" in r.message for r in caplog.records) == 1
    assert "judge exploded" in caplog.records[0].message
    runner.close()
    for bad in ([1.0], "0.5 0.5", {"a": 1, "b": 2}, ["x", "y"], None):
        r = DeadlineRunner(lambda prompts, completions, bad=bad: bad, timeout_s=5, chunk_size=2)
        rb, counts = r(["p"] * 2, ["a"] * 2)
        assert counts["malformed"] == 2 and counts["exceptions"] == 0 and rb.num_invalid == 2, bad
        r.close()


def test_executor_bounds_its_workers_and_runs_work_in_order():
    pool = DaemonExecutor(2, hang_s=None)
    futures = [pool.submit(lambda i=i: (time.sleep(0.01), i)[1]) for i in range(20)]
    assert [f.result(timeout=5) for f in futures] == list(range(20))
    assert pool._live <= 2
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(print)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_process_with_a_hung_reward_exits(kind, tmp_path):
    """The process ends when its work is done, hung reward calls or not (bound: timeout + 10 s)."""
    script = textwrap.dedent(f"""
        import asyncio, threading
        from rubrax.rewards.deadline import DeadlineRunner
        def hang(prompts, completions):
            threading.Event().wait()
        async def ahang(prompts, completions):
            await asyncio.Event().wait()
        runner = DeadlineRunner({'hang' if kind == 'sync' else 'ahang'}, timeout_s=0.3, chunk_size=1)
        rb, counts = runner(["p"] * 3, ["a"] * 3)
        runner.close()
        print("timeouts", counts["timeouts"])
    """)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "timeouts 3" in out.stdout and time.perf_counter() - t0 < 10.3


def test_results_keep_row_order_across_chunks():
    async def judge(prompts, completions):
        await asyncio.sleep(0.05 * (3 - len(completions[0])))
        return RewardBatch(np.array([len(c) for c in completions], np.float32), np.ones(len(completions), bool))

    runner = DeadlineRunner(judge, timeout_s=5, chunk_size=2)
    rb, _ = runner(["p"] * 6, ["a", "a", "bb", "bb", "ccc", "ccc"])
    np.testing.assert_array_equal(rb.scores, [1, 1, 2, 2, 3, 3])
    runner.close()

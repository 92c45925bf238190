"""Dataset-level jobs: propose rubrics, refine them (RTD), grade responses.

Every job writes its output incrementally, one JSON line per finished item, flushed as
it completes; a rerun reads what is there, skips finished items and does the rest
(a half-written last line from a killed run is cut off). The chat cache makes the
calls of unfinished items that had completed free on the rerun. At the end the file
is rewritten atomically in input order, so an interrupted-then-resumed run gives the
same bytes as an uninterrupted one.

Items are processed by a fixed number of workers (`workers`), so that memory stays
bounded on large inputs while the client's own limit bounds the requests in flight.
Items whose record has failures (a call that failed for good) are redone on a rerun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from rubrax.data.records import write_jsonl
from rubrax.data.rubrics import ResponseRecord, rubric_to_record
from rubrax.elicit.rtd import Candidate, ProposalError, iterative_rtd, propose_initial
from rubrax.rewards.rubric import grade_response
from rubrax.rubric import Rubric, aggregate


class ResumableJsonl:
    """An append-only JSONL output keyed by `key(record)`, resumable after a crash."""

    def __init__(self, path: str | os.PathLike, key: Callable[[Mapping[str, Any]], Any]):
        self.path = os.fspath(path)
        self.key = key
        self.done: dict[Any, dict[str, Any]] = {}
        if os.path.exists(self.path):
            self._load()
        self._f = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = 0
        for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
            if not raw.endswith(b"\n"):
                break  # a half-written last line from a killed run
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path}:{lineno}: corrupt line in an existing output file; move it away to start over") from None
            self.done[self.key(rec)] = rec
            good += len(raw)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def add(self, record: dict[str, Any]) -> None:
        self.done[self.key(record)] = record
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def finalize(self, order: Sequence[Any]) -> None:
        """Rewrites the file with the records of `order` (keys), in that order."""
        self._f.close()
        write_jsonl(self.path, (self.done[k] for k in order if k in self.done))

    def close(self) -> None:
        self._f.close()


async def run_workers(items: Iterable[Any], fn: Callable[[Any], Awaitable[None]], workers: int) -> None:
    """Applies `fn` to every item with at most `workers` items in progress."""
    it = iter(items)

    async def worker() -> None:
        for item in it:  # a shared iterator: each item is taken by exactly one worker
            await fn(item)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))


def progress_bar(total: int, desc: str, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", disable=None, dynamic_ncols=True)


@dataclasses.dataclass
class JobSummary:
    items: int = 0
    resumed: int = 0
    done: int = 0
    invalid: int = 0
    failures: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


# --------------------------------------------------------------------------- grading


def grade_record(rubric: Rubric | None, r: ResponseRecord, verdicts: dict[str, str], failures: list[str], mode: str) -> dict[str, Any]:
    if rubric is None:
        return {"prompt_id": r.prompt_id, "response_id": r.response_id, "score": None, "valid": False, "verdicts": {}, "failures": [f"no rubric for prompt_id {r.prompt_id!r}"]}
    s = aggregate(rubric, verdicts, mode)
    return {
        "prompt_id": r.prompt_id, "response_id": r.response_id, "score": s.score if s.valid else None,
        "valid": s.valid, "verdicts": verdicts, "failures": failures,
    }


async def grade_responses(
    responses: Sequence[ResponseRecord],
    rubrics: Mapping[str, Rubric],
    verifier: Any,
    out_path: str | os.PathLike,
    *,
    mode: str = "weighted_mean",
    k: int = 1,
    workers: int = 64,
    progress: bool = True,
) -> JobSummary:
    """Grades every response against the rubric of its prompt into `out_path` (resumable).

    Output lines: {prompt_id, response_id, score (null when not valid), valid, verdicts, failures}.
    """
    sink = ResumableJsonl(out_path, key=lambda rec: (str(rec["prompt_id"]), str(rec["response_id"])))
    summary = JobSummary(items=len(responses))
    todo = [r for r in responses if r.key not in sink.done or sink.done[r.key].get("failures")]
    summary.resumed = len(responses) - len(todo)
    bar = progress_bar(len(responses), "grade", summary.resumed) if progress else None

    async def one(r: ResponseRecord) -> None:
        rubric = rubrics.get(r.prompt_id)
        if rubric is None:
            verdicts, failures = {}, []
        else:
            verdicts, failures = await grade_response(verifier, rubric, r.response, k=k)
        sink.add(grade_record(rubric, r, verdicts, failures, mode))
        if bar is not None:
            bar.update(1)

    try:
        await run_workers(todo, one, workers)
    finally:
        if bar is not None:
            bar.close()
    sink.finalize([r.key for r in responses])
    for r in responses:
        rec = sink.done[r.key]
        summary.done += 1
        summary.invalid += not rec["valid"]
        summary.failures += bool(rec["failures"])
    return summary


# --------------------------------------------------------------------------- proposing


async def propose_rubrics(prompts: Sequence[tuple[str, str]], proposer: Any, out_path: str | os.PathLike, *, workers: int = 64, progress: bool = True) -> JobSummary:
    """Initial rubrics for (prompt_id, prompt) pairs into `out_path` (rubrax rubric records).

    A prompt whose proposal failed gets no record (the file stays loadable) and is counted;
    a rerun tries it again.
    """
    sink = ResumableJsonl(out_path, key=lambda rec: str(rec["prompt_id"]))
    summary = JobSummary(items=len(prompts))
    todo = [(pid, p) for pid, p in prompts if pid not in sink.done]
    summary.resumed = len(prompts) - len(todo)
    bar = progress_bar(len(prompts), "propose", summary.resumed) if progress else None

    async def one(item: tuple[str, str]) -> None:
        try:
            rubric = await propose_initial(proposer, *item)
        except ProposalError:
            summary.failures += 1
        else:
            sink.add(rubric_to_record(rubric))
        if bar is not None:
            bar.update(1)

    try:
        await run_workers(todo, one, workers)
    finally:
        if bar is not None:
            bar.close()
    sink.finalize([pid for pid, _ in prompts])
    summary.done = sum(1 for pid, _ in prompts if pid in sink.done)
    summary.invalid = summary.items - summary.done
    return summary


# --------------------------------------------------------------------------- refining


def candidate_pools(responses: Iterable[ResponseRecord]) -> dict[str, list[Candidate]]:
    pools: dict[str, list[Candidate]] = {}
    for r in responses:
        pools.setdefault(r.prompt_id, []).append(Candidate(r.response_id, r.response, r.source_model))
    return pools


async def refine_rubrics(
    rubrics: Mapping[str, Rubric],
    pools: Mapping[str, Sequence[Candidate]],
    proposer: Any,
    verifier: Any,
    out_path: str | os.PathLike,
    lineage_path: str | os.PathLike,
    *,
    rounds: int = 4,
    drop_used: bool = True,
    seed: int = 0,
    mode: str = "weighted_mean",
    workers: int = 16,
    progress: bool = True,
) -> JobSummary:
    """Iterative RTD on every rubric with its prompt's candidate pool (resumable per prompt).

    Writes the refined rubrics to `out_path` and one lineage record per prompt
    ({prompt_id, rounds: [RoundRecord ...]}) to `lineage_path`. A prompt without at least
    two candidates keeps its rubric (zero rounds).
    """
    sink = ResumableJsonl(out_path, key=lambda rec: str(rec["prompt_id"]))
    lineage = ResumableJsonl(lineage_path, key=lambda rec: str(rec["prompt_id"]))
    order = list(rubrics)
    summary = JobSummary(items=len(order))
    todo = [pid for pid in order if pid not in sink.done or pid not in lineage.done]
    summary.resumed = len(order) - len(todo)
    bar = progress_bar(len(order), "refine", summary.resumed) if progress else None

    async def one(pid: str) -> None:
        result = await iterative_rtd(proposer, verifier, rubrics[pid], pools.get(pid, ()), rounds=rounds, drop_used=drop_used, seed=seed, mode=mode)
        failed = sum(not r.refined for r in result.lineage)
        summary.failures += failed
        lineage.add({"prompt_id": pid, "rounds": [r.to_json() for r in result.lineage]})
        sink.add(rubric_to_record(result.rubric))
        if bar is not None:
            bar.update(1)

    try:
        await run_workers(todo, one, workers)
    finally:
        if bar is not None:
            bar.close()
    sink.finalize(order)
    lineage.finalize(order)
    summary.done = len(order)
    return summary

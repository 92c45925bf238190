"""`rubrax eval winrate`: win rate of responses against references through the pairwise judge.

Each response is compared with the reference response of the same prompt_id (the first
one in the references file). Per-item outcomes go to --out (resumable); the win rate
with its bootstrap interval is printed at the end as key=value figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


async def _winrate(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.cli import client_config, print_summary
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMJudge, Templates
    from rubrax.elicit.pipeline import ResumableJsonl, _progress, run_workers
    from rubrax.eval.winrate import WinItem, judge_outcome, win_rate

    responses = read_responses(args.responses)
    refs: dict[str, Any] = {}
    for r in read_responses(args.references):
        refs.setdefault(r.prompt_id, r)
    missing = sorted({r.prompt_id for r in responses if r.prompt_id not in refs})
    if missing:
        print(f"error: {args.references}: no reference for prompt_id {missing[:5]} ({len(missing)} in all)", file=sys.stderr)
        return 2
    sink = ResumableJsonl(args.out, key=lambda rec: (str(rec["prompt_id"]), str(rec["response_id"])))
    todo = [r for r in responses if r.key not in sink.done or sink.done[r.key]["outcome"] is None]
    bar = None if args.no_progress else _progress(len(responses), "winrate", len(responses) - len(todo))
    async with ChatClient(client_config(args)) as client:
        judge = LLMJudge(client, templates=Templates.load(args.templates), seed=args.seed)

        async def one(r: Any) -> None:
            ref = refs[r.prompt_id]
            item = WinItem(f"{r.prompt_id}/{r.response_id}/{ref.response_id}", r.prompt, r.response, ref.response)
            outcome = await judge_outcome(judge, item, both_orders=args.both_orders)
            sink.add({"prompt_id": r.prompt_id, "response_id": r.response_id, "reference_id": ref.response_id, "outcome": outcome})
            if bar is not None:
                bar.update(1)

        try:
            await run_workers(todo, one, args.workers or 2 * args.concurrency)
        finally:
            if bar is not None:
                bar.close()
        sink.finalize([r.key for r in responses])
        result = win_rate([sink.done[r.key]["outcome"] for r in responses], n_boot=args.bootstrap, confidence=args.confidence, seed=args.seed)

        class _Job:
            def line(self) -> str:
                return f"items={len(responses)} judged={result.n} failed={result.failed}"

        print_summary("eval winrate", _Job(), client)
    print(result.line())
    return 0


def register(subparsers: Any) -> None:
    from rubrax.elicit.cli import _run, add_client_args

    parser = subparsers.add_parser("eval", help="evaluation: win rate through a pairwise judge", description=__doc__)
    sub = parser.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    p = sub.add_parser("winrate", help="win rate against reference responses")
    p.add_argument("--responses", required=True, help="responses JSONL {prompt_id, response_id, prompt, response}")
    p.add_argument("--references", required=True, help="reference responses JSONL (same format)")
    p.add_argument("--out", required=True, help="per-item outcomes JSONL (resumable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the display order and of the bootstrap")
    p.add_argument("--both-orders", action="store_true", help="judge each pair in both orders")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--confidence", type=float, default=0.95)
    add_client_args(p)
    p.set_defaults(func=_run(_winrate))

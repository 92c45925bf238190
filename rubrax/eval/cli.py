"""`rubrax eval winrate | agreement`.

winrate: each response is compared by the pairwise judge with the reference response of
the same prompt_id (the first one in the references file). Per-item outcomes go to --out
(resumable); the win rate with its bootstrap interval is printed at the end as key=value
figures.

agreement (the paper's Table 2): response pairs with a gold preference
{prompt_id, prompt, response_a, response_b, gold: "a"|"b", gold_reward_a?, gold_reward_b?,
region?} are graded with the rubrics (majority of --k gradings, 5 in the paper) and the
rubric's preference is compared with the gold one, split into high- and low-reward pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


async def _winrate(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.cli import client_config, print_summary
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMJudge, Templates
    from rubrax.elicit.pipeline import ResumableJsonl, progress_bar, run_workers
    from rubrax.eval.winrate import WinItem, judge_bias, judge_orders, judge_outcome, outcome_of_orders, win_rate

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
    bar = None if args.no_progress else progress_bar(len(responses), "winrate", len(responses) - len(todo))
    async with ChatClient(client_config(args)) as client:
        judge = LLMJudge(client, templates=Templates.load(args.templates), seed=args.seed)

        def item_of(r: Any) -> WinItem:
            ref = refs[r.prompt_id]
            return WinItem(f"{r.prompt_id}/{r.response_id}/{ref.response_id}", r.prompt, r.response, ref.response)

        async def one(r: Any) -> None:
            item, rec = item_of(r), {"prompt_id": r.prompt_id, "response_id": r.response_id, "reference_id": refs[r.prompt_id].response_id}
            if args.both_orders:
                # Both verdicts are kept: the position-bias figures need them, not just their mean.
                rec["response_first"], rec["reference_first"] = await judge_orders(judge, item)
                rec["outcome"] = outcome_of_orders(rec["response_first"], rec["reference_first"])
            else:
                rec["outcome"] = await judge_outcome(judge, item)
            sink.add(rec)
            if bar is not None:
                bar.update(1)

        try:
            await run_workers(todo, one, args.workers or 2 * args.concurrency)
        finally:
            if bar is not None:
                bar.close()
        sink.finalize([r.key for r in responses])
        recs = [sink.done[r.key] for r in responses]
        result = win_rate([rec["outcome"] for rec in recs], n_boot=args.bootstrap, confidence=args.confidence, seed=args.seed)
        orders = [(rec["response_first"], rec["reference_first"]) if "response_first" in rec else None for rec in recs]
        bias = judge_bias([item_of(r) for r in responses], [rec["outcome"] for rec in recs], orders)
        print_summary("eval winrate", f"items={len(responses)} judged={result.n} failed={result.failed}", client)
    print(f"{result.line()} {bias.line()}")
    return 0


def read_pairs(path: str) -> list[Any]:
    from rubrax.data.rubrics import RubricFormatError, iter_jsonl
    from rubrax.eval.agreement import Pair

    pairs = []
    for line, rec in iter_jsonl(path):
        for field in ("prompt_id", "prompt", "response_a", "response_b", "gold"):
            if not isinstance(rec.get(field), (str, int)) or isinstance(rec.get(field), bool):
                raise RubricFormatError(path, line, field, "missing or not a string")
        for field in ("gold_reward_a", "gold_reward_b"):
            if rec.get(field) is not None and (isinstance(rec[field], bool) or not isinstance(rec[field], (int, float))):
                raise RubricFormatError(path, line, field, f"must be a number, got {rec[field]!r}")
        if rec["gold"] not in ("a", "b"):
            raise RubricFormatError(path, line, "gold", f"must be 'a' or 'b', got {rec['gold']!r}")
        if rec.get("region") is None and (rec.get("gold_reward_a") is None or rec.get("gold_reward_b") is None):
            raise RubricFormatError(path, line, "region", "give a region or both gold rewards")
        pairs.append(Pair(str(rec["prompt_id"]), str(rec["prompt"]), str(rec["response_a"]), str(rec["response_b"]), rec["gold"],
                          rec.get("gold_reward_a"), rec.get("gold_reward_b"), rec.get("region")))
    return pairs


async def _agreement(args: argparse.Namespace) -> int:
    from rubrax.elicit.cli import client_config, load_rubrics_arg, print_summary
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMVerifier, Templates
    from rubrax.eval.agreement import format_criterion_table, rubric_agreement_detail
    from rubrax.rewards.rubric import RubricReward

    pairs = read_pairs(args.pairs)
    rubrics = load_rubrics_arg(args.rubrics, args.weight_scale)
    async with ChatClient(client_config(args)) as client:
        verifier = LLMVerifier(client, mode=args.verify, templates=Templates.load(args.templates), temperature=args.temperature)
        reward = RubricReward(rubrics, verifier, mode=args.aggregate, k=args.k)
        table, criteria = await rubric_agreement_detail(reward, pairs, threshold=args.threshold, tie_credit=args.tie_credit)
        print_summary("eval agreement", f"pairs={len(pairs)}", client)
    if args.criteria_out:
        with open(args.criteria_out, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in criteria)
    print(format_criterion_table(criteria))
    print(" ".join(f"{region}_{k}={v:.4f}" if isinstance(v, float) else f"{region}_{k}={v}" for region, row in table.items() for k, v in row.items()))
    return 0


def register(subparsers: Any) -> None:
    from rubrax.elicit.cli import _run, add_client_args

    parser = subparsers.add_parser("eval", help="evaluation: win rate (pairwise judge), rubric agreement (Table 2)", description=__doc__)
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

    p = sub.add_parser("agreement", help="rubric agreement with gold preferences, by reward region (Table 2)")
    p.add_argument("--pairs", required=True, help="JSONL {prompt_id, prompt, response_a, response_b, gold, gold_reward_a?, gold_reward_b?, region?}")
    p.add_argument("--rubrics", required=True, help="rubrics JSONL (or hf:NAME:CONFIG)")
    p.add_argument("--k", type=int, default=5, help="gradings per response (per-criterion majority)")
    p.add_argument("--temperature", type=float, default=1.0, help="verifier temperature (> 0 so that the k gradings differ)")
    p.add_argument("--verify", choices=("all", "per_criterion"), default="all")
    p.add_argument("--aggregate", choices=("weighted_mean", "healthbench"), default="weighted_mean")
    p.add_argument("--weight-scale", choices=("paper", "points"), default=None)
    p.add_argument("--threshold", type=float, default=None, help="gold reward splitting high from low pairs (default: median)")
    p.add_argument("--tie-credit", type=float, default=0.0, help="credit of a rubric tie (default 0)")
    p.add_argument("--criteria-out", default=None, help="write the per-criterion agreement table here (JSONL)")
    add_client_args(p)
    p.set_defaults(func=_run(_agreement))

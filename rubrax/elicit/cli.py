"""`rubrax rubrics propose | refine | grade`: rubric jobs against an OpenAI-compatible endpoint.

The API key is read from OPENAI_API_KEY (or the variable named by --api-key-env), the
base URL from --base-url or OPENAI_BASE_URL. Outputs are written incrementally and a
rerun of the same command resumes; completed calls are cached in --cache-dir.
A summary (items, failures, calls, cache hits, tokens, cost) is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rubrax", "chat")


def add_client_args(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """The endpoint flags every job shares; `model=False` when the caller defines its own --model."""
    g = p.add_argument_group("endpoint")
    if model:
        g.add_argument("--model", required=True, help="model name at the endpoint")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or api.openai.com)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--cache-dir", default=DEFAULT_CACHE)
    g.add_argument("--no-json-mode", action="store_true", help="do not ask the server for JSON output")
    g.add_argument("--price-in", type=float, default=None, help="US$ per million input tokens (for the cost summary)")
    g.add_argument("--price-out", type=float, default=None, help="US$ per million output tokens")
    g.add_argument("--transport", choices=("aiohttp", "sdk"), default="aiohttp")
    g.add_argument("--templates", default=None, help="directory of prompt templates overriding the package's")
    g.add_argument("--workers", type=int, default=None, help="items in progress at once (default: 2 x concurrency)")
    g.add_argument("--no-progress", action="store_true")


def client_config(args: argparse.Namespace, model: str | None = None) -> Any:
    from rubrax.elicit.client import ClientConfig

    prices = None
    if args.price_in is not None or args.price_out is not None:
        prices = (args.price_in or 0.0, args.price_out or 0.0)
    return ClientConfig(
        model=model or args.model, base_url=args.base_url, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, cache_dir=args.cache_dir, json_mode=not args.no_json_mode,
        price_per_mtok=prices, transport=args.transport,
    )


def load_rubrics_arg(spec: str, scale: str | None = None) -> Any:
    """A rubrics file, or `hf:NAME[:CONFIG[:SPLIT]]` for a datasets hub dataset."""
    from rubrax.data.rubrics import load_rubrics, load_rubrics_dataset

    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        return load_rubrics_dataset(parts[0], config=parts[1] if len(parts) > 1 else None, split=parts[2] if len(parts) > 2 else "train", scale=scale)
    return load_rubrics(spec, scale=scale)


def print_summary(command: str, line: str, *clients: Any) -> None:
    """The end-of-job summary on stderr: the job's counts, then each client's calls, cache hits, tokens, cost."""
    print(f"rubrax {command}: {line}", file=sys.stderr)
    for c in clients:
        print(f"  {c.config.model}: {c.stats.summary()}", file=sys.stderr)


def _workers(args: argparse.Namespace) -> int:
    return args.workers or 2 * args.concurrency


async def _grade(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMVerifier, Templates
    from rubrax.elicit.pipeline import grade_responses
    from rubrax.rewards.rubric import grade_response

    rubrics = load_rubrics_arg(args.rubrics, args.weight_scale)
    responses = read_responses(args.responses)
    templates = Templates.load(args.templates)
    async with ChatClient(client_config(args)) as client:
        verifier = LLMVerifier(client, mode=args.verify, templates=templates, temperature=args.temperature, max_tokens=args.max_tokens)
        if args.batch:
            with client.collecting() as bodies:
                await asyncio.gather(*(grade_response(verifier, rubrics[r.prompt_id], r.response, k=args.k) for r in responses if r.prompt_id in rubrics))
            await client.submit_batch(bodies, poll_s=args.batch_poll_s)
        job = await grade_responses(responses, rubrics, verifier, args.out, mode=args.aggregate, k=args.k, workers=_workers(args), progress=not args.no_progress)
        print_summary("rubrics grade", job.line(), client)
    return 0


async def _propose(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_prompts
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMProposer, Templates
    from rubrax.elicit.pipeline import propose_rubrics
    from rubrax.elicit.rtd import propose_initial

    prompts = read_prompts(args.prompts)
    async with ChatClient(client_config(args)) as client:
        proposer = LLMProposer(client, templates=Templates.load(args.templates), temperature=args.temperature, max_tokens=args.max_tokens)
        if args.batch:
            with client.collecting() as bodies:
                await asyncio.gather(*(propose_initial(proposer, pid, p) for pid, p in prompts), return_exceptions=True)
            proposer.failures.clear()
            await client.submit_batch(bodies, poll_s=args.batch_poll_s)
        job = await propose_rubrics(prompts, proposer, args.out, workers=_workers(args), progress=not args.no_progress)
        for pid, reason in proposer.failures[:10]:
            print(f"  proposal failed for {pid}: {reason}", file=sys.stderr)
        for pid, reason in proposer.warnings[:10]:
            print(f"  proposal for {pid} kept with: {reason}", file=sys.stderr)
        print_summary("rubrics propose", job.line(), client)
    return 0


async def _refine(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMProposer, LLMVerifier, Templates
    from rubrax.elicit.pipeline import candidate_pools, refine_rubrics

    rubrics = load_rubrics_arg(args.rubrics, args.weight_scale)
    pools = candidate_pools(read_responses(args.responses))
    templates = Templates.load(args.templates)
    async with ChatClient(client_config(args)) as pclient, ChatClient(client_config(args, args.verifier_model)) as vclient:
        proposer = LLMProposer(pclient, templates=templates, temperature=args.temperature, max_tokens=args.max_tokens)
        verifier = LLMVerifier(vclient, mode=args.verify, templates=templates)
        lineage = args.lineage or os.path.splitext(args.out)[0] + ".lineage.jsonl"
        job = await refine_rubrics(
            rubrics, pools, proposer, verifier, args.out, lineage, rounds=args.rounds, drop_used=not args.keep_used,
            seed=args.seed, mode=args.aggregate, workers=args.workers or max(1, args.concurrency // 4), progress=not args.no_progress,
        )
        print_summary("rubrics refine", job.line(), pclient, vclient)
    return 0


def _run(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from rubrax.data.rubrics import RubricFormatError

        try:
            return asyncio.run(fn(args))
        except (RubricFormatError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rubrics", help="propose, refine (RTD) and grade with rubrics", description=__doc__)
    sub = parser.add_subparsers(dest="rubrics_command", metavar="ACTION", required=True)

    p = sub.add_parser("propose", help="initial rubrics from prompts")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt_id, prompt}")
    p.add_argument("--out", required=True, help="rubrics JSONL to write (resumable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch", action="store_true", help="send the calls through the Batch API first")
    p.add_argument("--batch-poll-s", type=float, default=30.0)
    add_client_args(p)
    p.set_defaults(func=_run(_propose))

    p = sub.add_parser("refine", help="iterative refinement through differentiation (RTD)")
    p.add_argument("--rubrics", required=True, help="rubrics JSONL (or hf:NAME:CONFIG)")
    p.add_argument("--responses", required=True, help="candidate responses JSONL {prompt_id, response_id, prompt, response, source_model}")
    p.add_argument("--out", required=True, help="refined rubrics JSONL to write (resumable)")
    p.add_argument("--lineage", default=None, help="lineage JSONL (default: OUT with .lineage.jsonl)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--keep-used", action="store_true", help="keep the refined pair in the pool (default: drop it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tie rule")
    p.add_argument("--verifier-model", default=None, help="verifier model (default: --model)")
    p.add_argument("--verify", choices=("all", "per_criterion"), default="all")
    p.add_argument("--aggregate", choices=("weighted_mean", "healthbench"), default="weighted_mean")
    p.add_argument("--weight-scale", choices=("paper", "points"), default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None)
    add_client_args(p)
    p.set_defaults(func=_run(_refine))

    p = sub.add_parser("grade", help="grade responses against rubrics")
    p.add_argument("--responses", required=True, help="responses JSONL {prompt_id, response_id, prompt, response}")
    p.add_argument("--rubrics", required=True, help="rubrics JSONL (or hf:NAME:CONFIG)")
    p.add_argument("--out", required=True, help="grades JSONL to write (resumable)")
    p.add_argument("--verify", choices=("all", "per_criterion"), default="all", help="all criteria in one call, or one call per criterion")
    p.add_argument("--aggregate", choices=("weighted_mean", "healthbench"), default="weighted_mean")
    p.add_argument("--weight-scale", choices=("paper", "points"), default=None)
    p.add_argument("--k", type=int, default=1, help="gradings per response (majority vote)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch", action="store_true", help="send the calls through the Batch API first")
    p.add_argument("--batch-poll-s", type=float, default=30.0)
    add_client_args(p)
    p.set_defaults(func=_run(_grade))

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

_POS_INT, _NONNEG_INT = {"low": 1}, {"low": 0}

def add_client_args(p: argparse.ArgumentParser, *, model: bool = True, resumable: bool = False) -> None:
    """The endpoint flags every job shares; `model=False` when the caller defines its own --model;
    `resumable` (a job writing a resumable --out through open_job) adds --restart / --allow-changed."""
    from rubrax.runs import add_run_flags
    from rubrax.validate import arg_type

    if resumable:
        add_run_flags(p)
    g = p.add_argument_group("endpoint")
    if model:
        g.add_argument("--model", required=True, help="model name at the endpoint")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or api.openai.com)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=arg_type("int", low=1), default=16, help="requests in flight at most")
    g.add_argument("--timeout", type=arg_type("float", low=0, open_low=True), default=120.0, help="seconds per attempt")
    g.add_argument("--max-retries", type=arg_type("int", low=0), default=6)
    g.add_argument("--cache-dir", default=DEFAULT_CACHE)
    g.add_argument("--no-json-mode", action="store_true", help="do not ask the server for JSON output")
    g.add_argument("--price-in", type=arg_type("float", low=0), default=None, help="US$ per million input tokens (for the cost summary)")
    g.add_argument("--price-out", type=arg_type("float", low=0), default=None, help="US$ per million output tokens")
    g.add_argument("--transport", choices=("aiohttp", "sdk"), default="aiohttp")
    g.add_argument("--templates", default=None, help="directory of prompt templates overriding the package's")
    g.add_argument("--workers", type=arg_type("int", low=1), default=None, help="items in progress at once (default: 2 x concurrency)")
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


def endpoint_settings(args: argparse.Namespace, model: str | None = None) -> dict[str, Any]:
    """What of the endpoint determines a job's outputs (never the key: only its variable's name)."""
    return {"model": model or args.model, "base_url": args.base_url or os.environ.get("OPENAI_BASE_URL"),
            "json_mode": not args.no_json_mode, "transport": args.transport}


def open_job(args: argparse.Namespace, command: str, settings: dict[str, Any], files: dict[str, str],
             outputs: tuple[str, ...] = (), safe: tuple[str, ...] = ("files.responses", "files.prompts")) -> Any:
    """Locks --out and checks its fingerprint (rubrax.runs): a rerun with other inputs refuses
    unless --restart (regrade from scratch) or --allow-changed (only more inputs are safe)."""
    from rubrax.elicit.llm import Templates
    from rubrax.runs import fingerprint, run_folder, value_digest

    spec = {name: path for name, path in files.items() if path.startswith("hf:")}  # a hub dataset: its name
    config = {"command": command, "endpoint": endpoint_settings(args), "templates": value_digest(Templates.load(args.templates)),
              **settings, **{f"dataset_{k}": v for k, v in spec.items()}}
    fp = fingerprint(config, {k: v for k, v in files.items() if k not in spec})
    return run_folder(args.out, fp, folder=False, outputs=outputs, safe=safe, restart=args.restart, allow_changed=args.allow_changed)


def job_exit_code(command: str, failed: int, items: int) -> int:
    """Non-zero when every item failed (or there was none): the job produced nothing usable."""
    if items == 0:
        print(f"rubrax {command}: error: no items to process", file=sys.stderr)
        return 1
    if failed >= items:
        print(f"rubrax {command}: error: all {items} items failed (see the failures above and in the output)", file=sys.stderr)
        return 1
    return 0


def _workers(args: argparse.Namespace) -> int:
    return args.workers or 2 * args.concurrency


async def _grade(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.llm import Templates

    rubrics = load_rubrics_arg(args.rubrics, args.weight_scale)
    responses = read_responses(args.responses)
    templates = Templates.load(args.templates)
    settings = {"verify": args.verify, "aggregate": args.aggregate, "weight_scale": args.weight_scale, "k": args.k,
                "temperature": args.temperature, "max_tokens": args.max_tokens}
    with open_job(args, "rubrics grade", settings, {"responses": args.responses, "rubrics": args.rubrics}):
        return await _grade_locked(args, rubrics, responses, templates)


async def _grade_locked(args: argparse.Namespace, rubrics: Any, responses: Any, templates: Any) -> int:
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMVerifier
    from rubrax.elicit.pipeline import grade_responses
    from rubrax.rewards.rubric import grade_response

    async with ChatClient(client_config(args)) as client:
        verifier = LLMVerifier(client, mode=args.verify, templates=templates, temperature=args.temperature, max_tokens=args.max_tokens)
        if args.batch:
            with client.collecting() as bodies:
                await asyncio.gather(*(grade_response(verifier, rubrics[r.prompt_id], r.response, k=args.k) for r in responses if r.prompt_id in rubrics))
            await client.submit_batch(bodies, poll_s=args.batch_poll_s)
        job = await grade_responses(responses, rubrics, verifier, args.out, mode=args.aggregate, k=args.k, workers=_workers(args), progress=not args.no_progress)
        print_summary("rubrics grade", job.line(), client)
    return job_exit_code("rubrics grade", job.failures, job.items)


async def _propose(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_prompts

    prompts = read_prompts(args.prompts)
    settings = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    with open_job(args, "rubrics propose", settings, {"prompts": args.prompts}):
        return await _propose_locked(args, prompts)


async def _propose_locked(args: argparse.Namespace, prompts: Any) -> int:
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMProposer, Templates
    from rubrax.elicit.pipeline import propose_rubrics
    from rubrax.elicit.rtd import propose_initial

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
    return job_exit_code("rubrics propose", job.items - job.done, job.items)


async def _refine(args: argparse.Namespace) -> int:
    from rubrax.data.rubrics import read_responses
    from rubrax.elicit.llm import Templates
    from rubrax.elicit.pipeline import candidate_pools

    rubrics = load_rubrics_arg(args.rubrics, args.weight_scale)
    pools = candidate_pools(read_responses(args.responses))
    templates = Templates.load(args.templates)
    lineage = args.lineage or os.path.splitext(args.out)[0] + ".lineage.jsonl"
    settings = {"rounds": args.rounds, "keep_used": args.keep_used, "seed": args.seed, "verify": args.verify, "aggregate": args.aggregate,
                "weight_scale": args.weight_scale, "temperature": args.temperature, "max_tokens": args.max_tokens,
                "verifier": endpoint_settings(args, args.verifier_model), "lineage": os.path.abspath(lineage)}
    with open_job(args, "rubrics refine", settings, {"rubrics": args.rubrics, "responses": args.responses}, outputs=(lineage,), safe=()):
        return await _refine_locked(args, rubrics, pools, templates, lineage)


async def _refine_locked(args: argparse.Namespace, rubrics: Any, pools: Any, templates: Any, lineage: str) -> int:
    from rubrax.elicit.client import ChatClient
    from rubrax.elicit.llm import LLMProposer, LLMVerifier
    from rubrax.elicit.pipeline import refine_rubrics

    async with ChatClient(client_config(args)) as pclient, ChatClient(client_config(args, args.verifier_model)) as vclient:
        proposer = LLMProposer(pclient, templates=templates, temperature=args.temperature, max_tokens=args.max_tokens)
        verifier = LLMVerifier(vclient, mode=args.verify, templates=templates)
        job = await refine_rubrics(
            rubrics, pools, proposer, verifier, args.out, lineage, rounds=args.rounds, drop_used=not args.keep_used,
            seed=args.seed, mode=args.aggregate, workers=args.workers or max(1, args.concurrency // 4), progress=not args.no_progress,
        )
        print_summary("rubrics refine", job.line(), pclient, vclient)
    return 0


def _run(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from rubrax.data.rubrics import RubricFormatError
        from rubrax.runs import RunError

        try:
            return asyncio.run(fn(args))
        except (RubricFormatError, FileNotFoundError, RunError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    from rubrax.validate import arg_type

    parser = subparsers.add_parser("rubrics", help="propose, refine (RTD) and grade with rubrics", description=__doc__)
    sub = parser.add_subparsers(dest="rubrics_command", metavar="ACTION", required=True)

    p = sub.add_parser("propose", help="initial rubrics from prompts")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt_id, prompt}")
    p.add_argument("--out", required=True, help="rubrics JSONL to write (resumable)")
    p.add_argument("--temperature", type=arg_type("float", low=0), default=0.0)
    p.add_argument("--max-tokens", type=arg_type("int", low=1), default=None)
    p.add_argument("--batch", action="store_true", help="send the calls through the Batch API first")
    p.add_argument("--batch-poll-s", type=arg_type("float", low=0, open_low=True), default=30.0)
    add_client_args(p, resumable=True)
    p.set_defaults(func=_run(_propose))

    p = sub.add_parser("refine", help="iterative refinement through differentiation (RTD)")
    p.add_argument("--rubrics", required=True, help="rubrics JSONL (or hf:NAME:CONFIG)")
    p.add_argument("--responses", required=True, help="candidate responses JSONL {prompt_id, response_id, prompt, response, source_model}")
    p.add_argument("--out", required=True, help="refined rubrics JSONL to write (resumable)")
    p.add_argument("--lineage", default=None, help="lineage JSONL (default: OUT with .lineage.jsonl)")
    p.add_argument("--rounds", type=arg_type("int", low=0), default=4)
    p.add_argument("--keep-used", action="store_true", help="keep the refined pair in the pool (default: drop it)")
    p.add_argument("--seed", type=arg_type("int", low=0), default=0, help="seed of the tie rule")
    p.add_argument("--verifier-model", default=None, help="verifier model (default: --model)")
    p.add_argument("--verify", choices=("all", "per_criterion"), default="all")
    p.add_argument("--aggregate", choices=("weighted_mean", "healthbench"), default="weighted_mean")
    p.add_argument("--weight-scale", choices=("paper", "points"), default=None)
    p.add_argument("--temperature", type=arg_type("float", low=0), default=0.0)
    p.add_argument("--max-tokens", type=arg_type("int", low=1), default=None)
    add_client_args(p, resumable=True)
    p.set_defaults(func=_run(_refine))

    p = sub.add_parser("grade", help="grade responses against rubrics")
    p.add_argument("--responses", required=True, help="responses JSONL {prompt_id, response_id, prompt, response}")
    p.add_argument("--rubrics", required=True, help="rubrics JSONL (or hf:NAME:CONFIG)")
    p.add_argument("--out", required=True, help="grades JSONL to write (resumable)")
    p.add_argument("--verify", choices=("all", "per_criterion"), default="all", help="all criteria in one call, or one call per criterion")
    p.add_argument("--aggregate", choices=("weighted_mean", "healthbench"), default="weighted_mean")
    p.add_argument("--weight-scale", choices=("paper", "points"), default=None)
    p.add_argument("--k", type=arg_type("int", low=1), default=1, help="gradings per response (majority vote)")
    p.add_argument("--temperature", type=arg_type("float", low=0), default=0.0)
    p.add_argument("--max-tokens", type=arg_type("int", low=1), default=None)
    p.add_argument("--batch", action="store_true", help="send the calls through the Batch API first")
    p.add_argument("--batch-poll-s", type=arg_type("float", low=0, open_low=True), default=30.0)
    add_client_args(p, resumable=True)
    p.set_defaults(func=_run(_grade))

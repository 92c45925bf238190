"""Responses for candidate pools and for evaluation: `rubrax generate` / `rubrax.generate`.

    rubrax generate --prompts P.jsonl --out R.jsonl --model gpt-4.1 --model gpt-4.1-mini --n 4
    rubrax generate --prompts P.jsonl --out R.jsonl --policy runs/arm1 --step 200 --temperature 0

Prompts JSONL {prompt_id, prompt}. Output: responses JSONL, one line per response,
{prompt_id, response_id, prompt, response, source_model, finish_reason}, in prompt order,
then model order, then sample order; response_id = "<source_model>/<i>". This is the
format `rubrax rubrics refine --responses` (candidate pools) and `rubrax eval winrate`
read. finish_reason is "length" for a response cut at the token limit.

Endpoints (`--model`, any number): the cached, retrying, rate-limited `ChatClient` of the
rubric jobs. Sample i of a prompt is its own request with `seed=i`, so the n samples are
n distinct cache entries and a rerun sends none of them again. The paper's pools are
sampled at temperature 1.0, top-p 0.95 (the defaults here). A call that failed for good
writes no line and is counted; a rerun retries it.

Local policy (`--policy`): an HF folder, or an RL run's folder (`--step N` of its
checkpoints, default the latest). Prompts go through the tokenizer's chat template,
are batched `batch_prompts` at a time through `rubrax.policy.sample` on a data mesh over
all devices, and stop at the tokenizer's and the model's end-of-turn tokens. Batch b
always holds the same prompts and uses key fold_in(PRNGKey(seed), b), and its lines are
written when it completes, so a killed run resumed gives the same file as an
uninterrupted one.

Both are resumable: finished lines are kept and only missing ones are made; at the end
the file is rewritten in order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """n responses per prompt and source; sampling settings; an optional system message."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"GenerateConfig.n must be a positive int, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"GenerateConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerateConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"GenerateConfig.max_tokens must be >= 1, got {self.max_tokens}")

    def messages(self, prompt: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": prompt}]


@dataclasses.dataclass
class GenerateSummary:
    items: int = 0
    resumed: int = 0
    done: int = 0
    failures: int = 0
    truncated: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def response_id(source_model: str, i: int) -> str:
    return f"{source_model}/{i}"


def _record(pid: str, prompt: str, source: str, i: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"prompt_id": pid, "response_id": response_id(source, i), "prompt": prompt, "response": text,
            "source_model": source, "finish_reason": finish}


def _sink(out_path: str | os.PathLike) -> Any:
    from rubrax.elicit.pipeline import ResumableJsonl

    return ResumableJsonl(out_path, key=lambda rec: (str(rec["prompt_id"]), str(rec["response_id"])))


def _finish(sink: Any, summary: GenerateSummary, order: list[tuple[str, str]]) -> GenerateSummary:
    sink.finalize(order)
    summary.done = sum(k in sink.done for k in order)
    summary.truncated = sum(sink.done[k].get("finish_reason") == "length" for k in order if k in sink.done)
    return summary


# --------------------------------------------------------------------------- endpoints


async def generate_from_endpoints(prompts: Sequence[tuple[str, str]], clients: Sequence[Any], out_path: str | os.PathLike,
                                  cfg: GenerateConfig, *, workers: int = 64, progress: bool = True,
                                  n_per_client: Sequence[int] | None = None) -> GenerateSummary:
    """cfg.n (or n_per_client[j] for client j) responses of every client's model to every
    (prompt_id, prompt), into `out_path`."""
    from rubrax.elicit.client import ChatError
    from rubrax.elicit.pipeline import progress_bar, run_workers

    sink = _sink(out_path)
    ns = list(n_per_client) if n_per_client is not None else [cfg.n] * len(clients)
    if len(ns) != len(clients):
        raise ValueError(f"generate: {len(ns)} sample counts for {len(clients)} endpoints")
    items = [(pid, p, c, i) for pid, p in prompts for c, n in zip(clients, ns) for i in range(n)]
    order = [(pid, response_id(c.config.model, i)) for pid, _, c, i in items]
    todo = [it for it, key in zip(items, order) if key not in sink.done]
    summary = GenerateSummary(items=len(items), resumed=len(items) - len(todo))
    bar = progress_bar(len(items), "generate", summary.resumed) if progress else None

    async def one(item: tuple[str, str, Any, int]) -> None:
        pid, prompt, client, i = item
        try:
            reply = await client.chat_detailed(cfg.messages(prompt), temperature=cfg.temperature, top_p=cfg.top_p,
                                               max_tokens=cfg.max_tokens, seed=i)
        except ChatError as err:
            summary.failures += 1
            if summary.failures <= 5:
                print(f"  generate: {client.config.model} failed on {pid} sample {i}: {err}", file=sys.stderr)
        else:
            sink.add(_record(pid, prompt, client.config.model, i, reply.content, reply.finish_reason))
        if bar is not None:
            bar.update(1)

    try:
        await run_workers(todo, one, workers)
    finally:
        if bar is not None:
            bar.close()
    return _finish(sink, summary, order)


# --------------------------------------------------------------------------- local policy


@dataclasses.dataclass(frozen=True)
class LocalPolicy:
    """Params, model config, tokenizer and the name its responses are tagged with."""

    params: Any
    config: Any
    tokenizer: Any
    name: str
    stop_ids: tuple[int, ...]


def load_local_policy(spec: str | os.PathLike, step: int | None = None, *, name: str | None = None) -> LocalPolicy:
    """An HF folder (config.json) or an RL run folder (checkpoints/, step `step` or the latest)."""
    import json
    from pathlib import Path

    from rubrax.models import load_pretrained, load_tokenizer

    path = Path(spec)
    if (path / "config.json").exists():
        if step is not None:
            raise ValueError(f"{path} is an HF folder: --step applies to an RL run folder")
        params, config = load_pretrained(path)
        tok_dir, default_name = path, path.name
    elif (path / "checkpoints").is_dir():
        from rubrax.rl.export import load_run_policy

        run = load_run_policy(path, step)
        params, config, tok_dir, default_name = run.params, run.config, run.base_dir, f"{path.name}@{run.step}"
    else:
        raise FileNotFoundError(f"{path}: neither an HF folder (config.json) nor an RL run (checkpoints/)")
    tokenizer = load_tokenizer(tok_dir)
    stops = set(config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    gen = tok_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        stops |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return LocalPolicy(params, config, tokenizer, name or default_name, tuple(sorted(int(s) for s in stops)))


def _batch_tokens(policy: LocalPolicy, cfg: GenerateConfig, batch: Sequence[tuple[str, str]], bucket: int) -> tuple[Any, Any]:
    from rubrax.rl.rollouts import left_pad

    rows = [policy.tokenizer.apply_chat_template(cfg.messages(p), add_generation_prompt=True) for _, p in batch]
    width = -(-max(len(r) for r in rows) // bucket) * bucket
    pad = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else (policy.config.pad_token_id or 0)
    return left_pad(rows, width, pad)


def generate_from_policy(prompts: Sequence[tuple[str, str]], policy: LocalPolicy, out_path: str | os.PathLike, cfg: GenerateConfig, *,
                         batch_prompts: int = 8, seed: int = 0, prompt_bucket: int = 64, progress: bool = True,
                         num_devices: int | None = None) -> GenerateSummary:
    """cfg.n responses of a local policy to every prompt, batched over a data mesh of the
    first `num_devices` devices (default all; the params are replicated on each) (resumable)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from rubrax import policy as sampling
    from rubrax.rl.rollouts import decode_completion
    from rubrax.sharding import make_mesh

    sink = _sink(out_path)
    order = [(pid, response_id(policy.name, i)) for pid, _ in prompts for i in range(cfg.n)]
    summary = GenerateSummary(items=len(order), resumed=sum(k in sink.done for k in order))
    sample_cfg = sampling.SampleConfig(max_new_tokens=cfg.max_tokens or 512, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n,
                                       stop_token_ids=policy.stop_ids, prompt_bucket=prompt_bucket)
    mesh = make_mesh(jax.devices()[:num_devices] if num_devices else None)
    params = jax.device_put(policy.params, NamedSharding(mesh, PartitionSpec()))
    root = jax.random.PRNGKey(seed)
    batches = [list(prompts[s : s + batch_prompts]) for s in range(0, len(prompts), batch_prompts)]
    for b, batch in enumerate(batches):
        if all((pid, response_id(policy.name, i)) in sink.done for pid, _ in batch for i in range(cfg.n)):
            continue
        tokens, mask = _batch_tokens(policy, cfg, batch, prompt_bucket)
        out = jax.device_get(sampling.sample(params, tokens, mask, jax.random.fold_in(root, b), sample_cfg, config=policy.config, mesh=mesh))
        for r, (ids, m) in enumerate(zip(np.asarray(out.tokens), np.asarray(out.mask))):
            pid, prompt = batch[r // cfg.n]
            last = [int(t) for t, k in zip(ids, m) if k][-1:]
            finish = "stop" if last and last[0] in policy.stop_ids else "length"
            text = decode_completion(policy.tokenizer, ids, m, policy.stop_ids)
            sink.add(_record(pid, prompt, policy.name, r % cfg.n, text, finish))
        if progress:
            print(f"generate: batch {b + 1}/{len(batches)}", file=sys.stderr)
    return _finish(sink, summary, order)


# --------------------------------------------------------------------------- one call


def generate(prompts: str | os.PathLike | Sequence[tuple[str, str]], out_path: str | os.PathLike, cfg: GenerateConfig | None = None, *,
             models: Sequence[str] = (), client_config: Any = None, policy: str | os.PathLike | None = None, step: int | None = None,
             **kwargs: Any) -> GenerateSummary:
    """Synchronous entry point: responses of endpoint `models` (ClientConfig fields from
    `client_config`, a ClientConfig whose model is replaced per model) or of a local `policy`."""
    import asyncio

    from rubrax.data.rubrics import read_prompts

    cfg = cfg or GenerateConfig()
    items = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if bool(models) == (policy is not None):
        raise ValueError("generate: give endpoint models or a local policy (exactly one)")
    if policy is not None:
        return generate_from_policy(items, load_local_policy(policy, step), out_path, cfg, **kwargs)

    async def run() -> GenerateSummary:
        from rubrax.elicit.client import ChatClient, ClientConfig

        base = client_config or ClientConfig(model=models[0])
        clients = [ChatClient(dataclasses.replace(base, model=m)) for m in models]
        try:
            return await generate_from_endpoints(items, clients, out_path, cfg, **kwargs)
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


# --------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    from rubrax.elicit.cli import add_client_args

    p = subparsers.add_parser("generate", help="responses of endpoint models or a local policy (pools, evaluation)", description=__doc__)
    p.add_argument("--prompts", required=True, help="JSONL of {prompt_id, prompt}")
    p.add_argument("--out", required=True, help="responses JSONL to write (resumable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", action="append", default=None, help="endpoint model (repeatable)")
    src.add_argument("--policy", default=None, metavar="DIR_OR_RUN", help="a local HF folder or an RL run folder")
    p.add_argument("--step", type=int, default=None, help="with --policy RUN: the checkpoint step (default: the latest)")
    p.add_argument("--n", type=int, default=1, help="responses per prompt and model")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=None, help="token limit per response (local policy: default 512)")
    p.add_argument("--system", default=None, help="system message sent before each prompt")
    p.add_argument("--batch-prompts", type=int, default=8, help="local policy: prompts per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="local policy: sampling seed")
    p.add_argument("--num-devices", type=int, default=None, help="local policy: devices of the data mesh (default: all)")
    add_client_args(p, model=False)
    p.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    import asyncio

    from rubrax.data.rubrics import RubricFormatError, read_prompts

    try:
        cfg = GenerateConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, system=args.system)
        prompts = read_prompts(args.prompts)
        if args.policy is not None:
            policy = load_local_policy(args.policy, args.step)
            summary = generate_from_policy(prompts, policy, args.out, cfg, batch_prompts=args.batch_prompts, seed=args.seed,
                                           progress=not args.no_progress, num_devices=args.num_devices)
            print(f"rubrax generate: {summary.line()} source={policy.name}", file=sys.stderr)
            return 0
        return asyncio.run(_endpoints_cli(args, prompts, cfg))
    except (RubricFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


async def _endpoints_cli(args: Any, prompts: list[tuple[str, str]], cfg: GenerateConfig) -> int:
    from contextlib import AsyncExitStack

    from rubrax.elicit.cli import client_config, print_summary
    from rubrax.elicit.client import ChatClient

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ChatClient(client_config(args, m))) for m in dict.fromkeys(args.model)]
        # each endpoint has its own `concurrency` requests in flight: enough workers to fill them all
        summary = await generate_from_endpoints(prompts, clients, args.out, cfg, workers=args.workers or 2 * args.concurrency * len(clients),
                                                progress=not args.no_progress)
        print_summary("generate", summary.line(), *clients)
    return 0 if summary.done == summary.items else 1

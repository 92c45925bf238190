"""`rubrax rl train`: GRPO / RLOO / Dr. GRPO from a JSON recipe; `rubrax rl export`: a run's
policy as a Hugging Face folder (rubrax.rl.export).

    rubrax rl train --config experiments/configs/grpo_tiny.json --out runs/grpo-tiny
    rubrax rl train --config experiments/configs/grpo_paper.json --out runs/health \\
        --set train=data/health_train.jsonl --set reward.kwargs.rubrics=rubrics/health.jsonl

--set KEY=VALUE overrides a config entry (dotted path; VALUE parsed as JSON when it
can be, else a string). Rerunning with the same --out resumes from the latest
checkpoint. The last line printed is `key=value` figures of the final step.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rubrax.jaxcache import use_persistent_compilation_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="JSON recipe (see rubrax.rl.recipe)")
    p.add_argument("--out", required=True, help="output folder: checkpoints/, metrics.jsonl, tb/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="override loop.total_steps")
    p.add_argument("--stop-after", type=int, default=None, help="stop this invocation after that many total steps")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() first (cluster auto-detection: SLURM, Open MPI, "
                        "TPU pods, ...; or --coordinator/--num-processes/--process-id)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="with --distributed: process 0's address")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rl", help="policy-gradient RL (GRPO, RLOO, Dr. GRPO)")
    sub = parser.add_subparsers(dest="rl_task", metavar="TASK")
    p = sub.add_parser("train", help="train a policy with a reward function chosen by name")
    add_arguments(p)
    p.set_defaults(func=run)
    p = sub.add_parser("export", help="write a run's policy as a Hugging Face folder (transformers / vLLM)")
    p.add_argument("run", metavar="RUN", help="the run's --out folder (holds checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--base", default=None, help="base model folder (default: the one recorded in the checkpoint)")
    p.set_defaults(func=export)

    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def apply_overrides(config: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Applies --set a.b.c=VALUE entries to a nested dict (in a copy)."""
    config = json.loads(json.dumps(config))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section")
        node[leaf] = value
    return config


def run(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", False):
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from rubrax.rl.recipe import build_reward, parse_recipe, reward_clients, run_recipe

    with open(args.config, encoding="utf-8") as f:
        config = apply_overrides(json.load(f), args.set)
    if args.steps is not None:
        config.setdefault("loop", {})["total_steps"] = args.steps
    recipe = parse_recipe(config, args.config)
    reward = build_reward(recipe.reward)
    result = run_recipe(recipe, out_dir=args.out, reward_fn=reward, stop_after=args.stop_after,
                        progress=False if args.no_progress else None)
    for client in reward_clients(reward):  # every endpoint the run used
        print(f"rubrax rl train: {client.config.model}: {client.stats.summary()}", file=sys.stderr)
    final: dict[str, Any] = {"step": int(result.state.step)}
    for rec in result.history:
        final.update({k: v for k, v in rec.items() if k in ("reward_mean", "kl", "entropy", "reward_invalid") or k.startswith("eval/")})
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0


def export(args: argparse.Namespace) -> int:
    from rubrax.rl.export import export_run

    try:
        out = export_run(args.run, args.out, args.step, base=args.base)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run} -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of experiments/train_grpo.py."""
    use_persistent_compilation_cache()
    parser = argparse.ArgumentParser(prog="train_grpo.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

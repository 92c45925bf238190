"""`rubrax rl train`: GRPO / RLOO / Dr. GRPO from a JSON recipe; `rubrax rl export`: a run's
policy as a Hugging Face folder (rubrax.rl.export).

    rubrax rl train --config experiments/configs/grpo_tiny.json --out runs/grpo-tiny
    rubrax rl train --config experiments/configs/grpo_paper.json --out runs/health \\
        --set train=data/health_train.jsonl --set reward.kwargs.rubrics=rubrics/health.jsonl

--set KEY=VALUE overrides a config entry (dotted path; VALUE parsed as JSON when it
can be, else a string). Rerunning with the same --out resumes from the latest
checkpoint (after a corrupt latest checkpoint, from the previous good one, with a
warning), after checking that the inputs are those of the run in --out: other inputs are
refused, naming what changed (--restart starts afresh; --allow-changed continues when only
safe settings changed, such as total_steps). One process writes an --out at a time.
The last line printed is `key=value` figures of the final step. Exit status 2: a bad
config or an --out that cannot be used (the message says which file, key or process).
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
    from rubrax.runs import add_run_flags
    from rubrax.validate import arg_type

    p.add_argument("--steps", type=arg_type("int", low=1), default=None, help="override loop.total_steps")
    p.add_argument("--stop-after", type=arg_type("int", low=1), default=None, help="stop this invocation after that many total steps")
    add_run_flags(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="memory per device for the fit check that runs before any weights load (`rubrax plan`; "
                        "default: the accelerators' own; on CPU the check runs only with this flag)")
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
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise ValueError(f"--set {key}={raw}: {key!r} is a section; set one of its keys ({key}.NAME=VALUE)")
        node[leaf] = value
    return config


def run(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", False):
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from rubrax.rl.recipe import RecipeError, build_reward, read_config, reward_clients, run_recipe
    from rubrax.runs import RunError

    try:
        config, recipe = _recipe(args, read_config(args.config))
        reward = build_reward(recipe.reward, source=recipe.source)
    except (ValueError, FileNotFoundError) as err:  # a bad config (RecipeError too): say where, before anything runs
        print(f"error: {err}", file=sys.stderr)
        return 2
    from rubrax.plan import check_fits

    check_fits(config, source=args.config, device_memory_gb=getattr(args, "device_memory", None))  # before any weights load
    try:
        result = run_recipe(recipe, out_dir=args.out, reward_fn=reward, stop_after=args.stop_after,
                            progress=False if args.no_progress else None, restart=args.restart, allow_changed=args.allow_changed)
    except (RunError, RecipeError) as err:  # --out locked or holding a run with other inputs; an unusable setting
        print(f"error: {err}", file=sys.stderr)
        return 2
    for client in reward_clients(reward):  # every endpoint the run used
        print(f"rubrax rl train: {client.config.model}: {client.stats.summary()}", file=sys.stderr)
    final: dict[str, Any] = {"step": int(result.state.step)}
    for rec in result.history:
        final.update({k: v for k, v in rec.items() if k in ("reward_mean", "kl", "entropy", "reward_invalid") or k.startswith("eval/")})
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0


def _recipe(args: argparse.Namespace, config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the config with --set / --steps applied, its parsed recipe)."""
    from rubrax.rl.recipe import parse_recipe

    try:
        config = apply_overrides(config, args.set)
    except ValueError as err:
        raise ValueError(f"{args.config}: {err}") from None
    if args.steps is not None:
        config.setdefault("loop", {})["total_steps"] = args.steps
    return config, parse_recipe(config, args.config + (" (with --set)" if args.set else ""))


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

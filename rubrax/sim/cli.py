"""`rubrax sim run --preset cpu|study|tiny --out results`: the tail-world experiment.

Writes results/<run>/report.md (+ PNGs, CSVs, config, seeds, git commit) and prints
where the report is. `--run NAME` names the folder (default: <preset>-<UTC time>);
rerunning with the same name resumes: arms already written are not recomputed. The
folder is locked while a run writes it, and its settings are fingerprinted (run.json):
a rerun with other settings refuses (--restart recomputes; other seeds or arms are fine,
each (seed, arm) has its own file).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="synthetic tail-world testbed (the paper's comparison on a CPU)")
    ssub = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    run = ssub.add_parser("run", help="run every arm of a preset and write the report")
    add_run_arguments(run)
    run.set_defaults(func=run_command)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="cpu (default, <= 10 min on 2 cores) | study | tiny")
    p.add_argument("--out", default="results", help="output root (default: results/)")
    p.add_argument("--run", default=None, help="run folder name under --out (default: <preset>-<UTC time>); reuse to resume")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, overriding the preset's")
    p.add_argument("--arms", default=None, help="comma-separated arms, overriding the preset's (see rubrax.sim.presets.ARMS)")
    p.add_argument("--quiet", action="store_true", help="print only the report path")
    from rubrax.runs import add_run_flags

    add_run_flags(p)


def config_from_args(args: argparse.Namespace):
    from rubrax.sim.presets import get_preset

    cfg = get_preset(args.preset)
    overrides = {}
    if args.seeds:
        try:
            overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.arms:
        overrides["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def run_command(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # bad configuration: say so before any training starts
        print(f"rubrax sim run: {err}", file=sys.stderr)
        return 2
    from rubrax.runs import RunError, fingerprint, open_run

    name = args.run or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out = Path(args.out) / name
    # Seeds and arms only pick which (seed, arm) files exist: not part of the fingerprint.
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("seeds", "arms")}
    try:
        lock = open_run(out, fingerprint(settings), folder=True, outputs=[str(out / "arms"), str(out / "rubrics")],
                        restart=getattr(args, "restart", False), allow_changed=getattr(args, "allow_changed", False))
    except RunError as err:
        print(f"rubrax sim run: {err}", file=sys.stderr)
        return 2
    try:
        return _run_locked(args, cfg, out)
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, cfg, out: Path) -> int:
    from rubrax.sim.experiment import run_experiment
    from rubrax.sim.report import write_report

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"tail world, preset {cfg.name}: {len(cfg.seeds)} seed(s) x {len(cfg.arms)} arms -> {out}")
    results = run_experiment(cfg, out, log=log)
    command = "rubrax sim run " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["sim", "run"] else f"rubrax sim run --preset {args.preset}"
    path = write_report(out, cfg, results, command=command)
    print(f"report: {path}")
    return 0

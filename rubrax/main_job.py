"""`rubrax main`: the README's main job on its embedded default.

Runs the synthetic tail-world experiment (the paper's whole comparison, CPU preset,
<= 10 minutes on 2 cores) and the paper's Figure 2 from the reward-tail theory, then
prints where the reports are. Everything is offline: no API key, no GPU, no hub.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rubrax.sim.cli import add_run_arguments

    p = sub.add_parser("main", help="run the main job (tail-world CPU preset + Figure 2) and print where the report is")
    add_run_arguments(p)
    p.add_argument("--skip-figure2", action="store_true", help="do not write the theory's Figure 2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rubrax.sim.cli import run_command

    if not args.skip_figure2:
        from rubrax.theory.figures import write_figure2

        paths = write_figure2(args.out)
        print(f"figure 2 (theory): {paths[0].parent}")
    return run_command(args)

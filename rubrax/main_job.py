"""`rubrax main`: the README's main job on its embedded default.

Today it reproduces the paper's Figure 2 (the reward-tail theory). When the
synthetic testbed lands it becomes the CPU preset of the tail-world experiment.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("main", help="run the main job (embedded default) and print where its report is")
    p.add_argument("--out", default="results", help="output root folder (default: results/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rubrax.theory.figures import write_figure2

    paths = write_figure2(args.out)
    for path in paths:
        print(path)
    return 0

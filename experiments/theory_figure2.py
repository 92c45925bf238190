"""Reproduce the paper's Figure 2 (reward-tail theory) as CSV + PNG.

    python experiments/theory_figure2.py [--out results]

Writes OUT/figure2/{figure2a,figure2b,figure2_bon_vs_tilted}.{csv,png} and summary.json.
Same as `rubrax theory figure2`; the computation lives in rubrax.theory.figures.
"""

from __future__ import annotations

import argparse

from rubrax.theory.figures import write_figure2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="output root (default: results)")
    args = parser.parse_args()
    for path in write_figure2(args.out):
        print(path)


if __name__ == "__main__":
    main()

"""The tail-world experiment: the paper's whole comparison on a synthetic task with a known gold reward.

    python experiments/tail_world.py                       # cpu preset (<= ~10 min on 2 cores)
    python experiments/tail_world.py --preset study        # more seeds and steps, for a real study
    python experiments/tail_world.py --preset cpu --run my-run --out results   # rerun resumes

Same as `rubrax sim run`. Writes results/<run>/report.md (+ PNGs, CSVs, config, seeds, git
commit) and prints where the report is. Design and defaults: rubrax/sim/ docstrings.
"""

import argparse
import sys

from rubrax.jaxcache import use_persistent_compilation_cache
from rubrax.sim.cli import add_run_arguments, run_command

if __name__ == "__main__":
    use_persistent_compilation_cache()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    sys.exit(run_command(parser.parse_args()))

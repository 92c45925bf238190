"""The paper's pipeline end to end (Table 1 analogue): response pools -> initial rubrics ->
RTD variants -> GRPO per arm with the rubric reward -> exported policies -> held-out
responses -> win rate against the base (both orders) -> HealthBench-style score -> report.md.

    python experiments/chasing_the_tail.py --config experiments/configs/chasing_the_tail_cpu.json --out runs/ctt-cpu
    python experiments/chasing_the_tail.py --config experiments/configs/chasing_the_tail_paper.json --out runs/ctt --dry-run

A rerun with the same --out resumes at the first incomplete stage (see rubrax.pipeline).
"""

from __future__ import annotations

import argparse
import sys

from rubrax.jaxcache import use_persistent_compilation_cache
from rubrax.pipeline import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment JSON config")
    parser.add_argument("--out", required=False, help="run folder (resumable)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="run only these stages (in pipeline order)")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's endpoint calls and RL steps, run nothing")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    from rubrax.data.records import RecordError
    from rubrax.pipeline import load_config
    from rubrax.pipeline.stages import StageError

    try:
        cfg = load_config(args.config)
        if args.dry_run:
            from rubrax.pipeline.calls import count_calls, format_calls

            print(format_calls(count_calls(cfg)))
            return 0
        if not args.out:
            parser.error("--out is required (except with --dry-run)")
        use_persistent_compilation_cache()
        from rubrax.pipeline.runner import run_experiment

        run_experiment(cfg, args.out, stages=args.stages, progress=args.progress)
    except (RecordError, StageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

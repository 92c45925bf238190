"""The `rubrax` console script.

Subcommands live next to the code they drive: each module listed in `_COMMANDS`
exposes `register(subparsers)`, which adds its parser and sets `func` (a callable
taking the parsed namespace and returning an exit code). Modules are imported
lazily so that `rubrax rubrics grade` never pays for importing jax.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rubrax.jaxcache import use_persistent_compilation_cache

# (subcommand, module providing register(subparsers))
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("main", "rubrax.main_job"),
    ("theory", "rubrax.theory.cli"),
    ("rubrics", "rubrax.elicit.cli"),
    ("eval", "rubrax.eval.cli"),
    ("generate", "rubrax.generate"),
    ("train", "rubrax.train.cli"),
    ("rl", "rubrax.rl.cli"),
    ("sim", "rubrax.sim.cli"),
    ("report", "rubrax.report"),
    ("forecast", "rubrax.forecast"),
    ("plan", "rubrax.plan"),
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rubrax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, module in _COMMANDS:
        if wanted is not None and wanted != name:
            # Only import the module for the subcommand asked for; list the rest by name.
            sub.add_parser(name, help=f"(see `rubrax {name} --help`)")
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # subcommand not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_persistent_compilation_cache()  # before any subcommand compiles (no jax import here)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

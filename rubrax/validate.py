"""One validation helper for every numeric setting (configs, recipes, CLI flags).

    check_int("LoopConfig.total_steps", value, low=1)
    check_float("RLConfig.kl_coef", value, low=0)
    check_float("RLConfig.clip_low", value, low=0, high=1, open_low=True, open_high=True)
    check_number(...)      dispatches on `kind` ("int" | "float")

A setting is refused when it has the wrong type (a bool is not an int, a string is not a
number), is NaN or infinite (unless `finite=False` admits +inf, e.g. a disabled limit),
or lies outside its range; the message names the setting, the range and the value.
Called from the config dataclasses' __post_init__ so that a bad value fails at parse
time, before anything is sampled or written. `arg_type` makes argparse types of them.

Host side only: no jax.
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any


def _range_text(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if open_high else '<='} {high:g}")
    return " and ".join(parts)


def _in_range(x: float, low, high, open_low, open_high) -> bool:
    if low is not None and (x <= low if open_low else x < low):
        return False
    return not (high is not None and (x >= high if open_high else x > high))


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False) -> int | None:
    """`value` as an int in [low, high]; None passes when `optional`. Bools and floats are refused."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")
    if not _in_range(int(value), low, high, False, False):
        raise ValueError(f"{name} must be {_range_text(low, high, False, False)}, got {value!r}")
    return int(value)


def check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False,
    open_high: bool = False, optional: bool = False, finite: bool = True,
) -> float | None:
    """`value` as a float in its range; ints are accepted, bools, strings, NaN (and inf unless
    `finite=False`) are not. None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")
    x = float(value)
    if math.isnan(x) or (finite and math.isinf(x)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not _in_range(x, low, high, open_low, open_high):
        raise ValueError(f"{name} must be {_range_text(low, high, open_low, open_high)}, got {value!r}")
    return x


def check_number(name: str, value: Any, kind: str, **bounds: Any) -> Any:
    return (check_int if kind == "int" else check_float)(name, value, **bounds)


def arg_type(kind: str, **bounds: Any):
    """An argparse `type=` that parses and checks a number (`--k 0` fails at parse time)."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind == 'int' else 'a number'}: {text!r}") from None
        try:
            return check_number("value", value, kind, **bounds)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    parse.__name__ = kind  # argparse names the type in its messages
    return parse

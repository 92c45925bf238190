"""Host-side input checks shared by the theory functions.

Every public function in `rubrax.theory` validates its inputs here when they are
concrete (plain numbers, numpy arrays, committed jax arrays). Inside a user's
`jit`/`vmap`/`grad` the inputs are tracers: the checks are skipped there (they
cannot branch on traced values) and the caller is responsible for valid input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when `x` holds values the host can read (not a jax tracer)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def float_dtype(*xs: Any) -> jnp.dtype:
    """The floating dtype to compute in: float64 under x64, else float32 (or the inputs')."""
    xs = tuple(np.asarray(x) if isinstance(x, (list, tuple)) else x for x in xs)
    return jnp.result_type(*xs, float)


def check_positive(name: str, where: str, x: Any, *, allow_inf: bool = True) -> None:
    """Raise ValueError unless every entry of `x` is > 0 (and not NaN)."""
    if not is_concrete(x):
        return
    a = np.asarray(x, dtype=np.float64)
    bad = np.isnan(a) | (a <= 0) | (np.isinf(a) & (not allow_inf))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        val = a[idx] if a.ndim else a
        raise ValueError(f"{where}: {name} must be > 0{'' if allow_inf else ' and finite'}, got {val!r}"
                         f"{f' at index {idx}' if a.ndim else ''}")


def check_open_unit(name: str, where: str, x: Any) -> None:
    """Raise ValueError unless every entry of `x` lies in the open interval (0, 1)."""
    if not is_concrete(x):
        return
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return  # a jax placeholder object during pytree manipulation, not user input
    bad = ~((a > 0) & (a < 1))
    if bad.any():
        val = a[tuple(np.argwhere(bad)[0])] if a.ndim else a
        raise ValueError(f"{where}: {name} must lie in the open interval (0, 1), got {val!r}")


def check_finite(name: str, where: str, x: Any, valid: Any = None) -> None:
    """Raise ValueError if `x` has a NaN or infinite entry (only where `valid` is True)."""
    if not is_concrete(x) or (valid is not None and not is_concrete(valid)):
        return
    a = np.asarray(x)
    bad = ~np.isfinite(a)
    if valid is not None:
        bad &= np.broadcast_to(np.asarray(valid, dtype=bool), a.shape)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{where}: {name} has a non-finite value {a[idx]!r} at index {idx}"
                         " (mark failed scores invalid instead of passing NaN)")


def check_no_nan_result(where: str, **outputs: Any) -> None:
    """Safety net: a concrete result must not contain NaN (never return a silent NaN)."""
    for name, x in outputs.items():
        if is_concrete(x) and np.isnan(np.asarray(x)).any():
            raise ValueError(f"{where}: the computed {name} contains NaN; check that the inputs "
                             "(and the map f, if any) are finite on [0, 1]")

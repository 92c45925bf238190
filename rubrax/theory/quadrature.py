"""Composite Gauss-Legendre quadrature on [0, 1], graded toward known breakpoints.

Why graded: the tilted weight e^{f(u)/beta} is a boundary layer of width ~beta
wherever f reaches its maximum with a non-zero slope, which for the paper's
piecewise-linear maps is an end point or a kink (for top-c-wrong maps: the jump
at u = 1 - c). Panels whose widths halve toward every breakpoint (down to
2^-28 in float64, 2^-20 in float32) put enough 12-point Gauss-Legendre panels
inside any such layer, so the integrals stay accurate to near machine precision
for beta from ~1e-7 up. An interior smooth maximum only gives a layer of width
~sqrt(beta), which the uniform background panels resolve. Panel edges sit
exactly on the breakpoints, so a jump or kink never falls inside a panel.

Everything is jnp: the breakpoints may be traced (vmap over the map parameter c).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ORDER = 12  # Gauss-Legendre points per panel
PANELS = 32  # uniform background panels
_GL_X, _GL_W = np.polynomial.legendre.leggauss(ORDER)


def _levels(dtype: jnp.dtype) -> np.ndarray:
    # Finer than ~1e-6 is below float32's resolution near u = 1 (ulp 6e-8): the
    # nodes of such panels would collapse onto their edges.
    finest = 28 if jnp.finfo(dtype).bits >= 64 else 20
    return 2.0 ** -np.arange(1, finest + 1)


def nodes(kinks_K: jnp.ndarray | None, dtype: jnp.dtype, *, panels: int = PANELS) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Quadrature nodes u_N and weights w_N on [0, 1] (sum w = 1), graded toward 0, 1 and kinks.

    kinks_K: extra breakpoints in [0, 1] (values outside are clipped). N is static:
    ORDER * (panels + 2 * levels + K * (2 * levels + 1) + 1).
    """
    lev = _levels(dtype)
    ends = np.concatenate([np.linspace(0, 1, panels + 1), lev, 1 - lev])  # host constants
    parts = [jnp.asarray(ends, dtype)]
    if kinks_K is not None and jnp.size(kinks_K):
        kinks = jnp.clip(jnp.asarray(kinks_K, dtype).reshape(-1), 0, 1)
        offsets = jnp.asarray(np.concatenate([[0.0], lev, -lev]), dtype)
        parts.append(jnp.clip(kinks[:, None] + offsets[None, :], 0, 1).reshape(-1))
    edges = jnp.sort(jnp.concatenate(parts))
    a, b = edges[:-1], edges[1:]
    half = (b - a)[:, None] / 2
    u = (a + b)[:, None] / 2 + half * jnp.asarray(_GL_X, dtype)[None, :]
    w = half * jnp.asarray(_GL_W, dtype)[None, :]
    # Zero-width panels (duplicate edges) carry zero weight; their nodes sit on an edge.
    return u.reshape(-1), w.reshape(-1)

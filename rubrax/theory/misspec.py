"""Misspecification maps f: gold reward -> proxy reward on [0, 1] (paper section 2).

A map is a callable `f(u)` on gold rewards u in [0, 1] (elementwise, jnp) with a
`kinks` property: the points in [0, 1] where f jumps or bends, so that the
quadrature in `tilted` can put panel edges there. The maps are frozen dataclasses
registered as JAX pytrees whose parameters (c, lo, hi, ...) are leaves: they can be
built inside `jax.vmap`/`jit` (e.g. vmap over c) without recompiling per value.

Paper families (Figure 2), each a measure-preserving map of U(0, 1), so Theorem 1
applies:
    correct()        f(u) = u
    reversed()       f(u) = 1 - u
    top_wrong(c)     f(u) = u for u <= 1 - c, 2 - c - u above  (order reversed in the top c)
    worst_wrong(c)   f(u) = c - u for u <= c, u above          (order reversed in the bottom c)

Families of our design, to study *where* ranking errors hurt:
    shuffled_band(lo, hi, blocks, seed)  ranking noise confined to the quantile band
        [lo, hi]: the band is cut into `blocks` equal pieces that are permuted (a fixed
        random permutation from `seed`; order inside a piece is kept). Measure
        preserving, so the KL is the Theorem 1 KL and only the win rate moves: the same
        amount of noise placed in the top band costs far more than in the bulk.
    noisy_band(lo, hi, sigma)  stochastic ranking noise for scored samples: the responses
        of each prompt whose gold quantile lies in [lo, hi] are re-ranked by
        gold + sigma * N(0, 1) (values stay inside the band). Not a map of u; use
        `.sample(key, gold)` with `tilted_from_samples` / `best_of_n`.
    piecewise_linear(xs, ys)  any continuous piecewise-linear map (plateaus = ties,
        folds = non-bijective maps; Proposition 1 still applies, Theorem 1 does not).

Host checks: parameters outside their domain raise ValueError when concrete.
"""

from __future__ import annotations

import builtins
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rubrax import pytree
from rubrax.theory._checks import check_open_unit, is_concrete

__all__ = [
    "Map", "Correct", "Reversed", "TopWrong", "WorstWrong", "ShuffledBand", "PiecewiseLinear", "NoisyBand",
    "correct", "reversed", "top_wrong", "worst_wrong", "shuffled_band", "piecewise_linear", "noisy_band",
]


_pytree = pytree.dataclass  # the class is part of the tree structure (see rubrax.pytree)


def _static(**kw: Any) -> Any:
    return pytree.field(static=True, **kw)


def _user_value(x: Any) -> bool:
    """True when x is a concrete user-supplied value (not a tracer or a jax placeholder)."""
    return x is not None and is_concrete(x) and isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


class Map:
    """Base class of deterministic misspecification maps (see module docstring)."""

    def __call__(self, u: jnp.ndarray) -> jnp.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def kinks(self) -> jnp.ndarray:
        """Points of [0, 1] where f jumps or bends (used as quadrature panel edges)."""
        return jnp.zeros((0,))


@_pytree
class Correct(Map):
    """f(u) = u: the proxy ranks every response like the gold reward."""

    def __call__(self, u):
        return jnp.asarray(u)


@_pytree
class Reversed(Map):
    """f(u) = 1 - u: the proxy ranks every response backwards."""

    def __call__(self, u):
        return 1 - jnp.asarray(u)


@_pytree
class TopWrong(Map):
    """f(u) = u for u <= 1 - c, 2 - c - u above: order reversed inside the top c (Figure 2a)."""

    c: Any

    def __post_init__(self):
        if _user_value(self.c):
            check_open_unit("c", "rubrax.theory.misspec.top_wrong", self.c)

    def __call__(self, u):
        u = jnp.asarray(u)
        return jnp.where(u <= 1 - self.c, u, 2 - self.c - u)

    @property
    def kinks(self):
        return jnp.reshape(1 - jnp.asarray(self.c), (1,))


@_pytree
class WorstWrong(Map):
    """f(u) = c - u for u <= c, u above: order reversed inside the bottom c (Figure 2a, 2b)."""

    c: Any

    def __post_init__(self):
        if _user_value(self.c):
            check_open_unit("c", "rubrax.theory.misspec.worst_wrong", self.c)

    def __call__(self, u):
        u = jnp.asarray(u)
        return jnp.where(u <= self.c, self.c - u, u)

    @property
    def kinks(self):
        return jnp.reshape(jnp.asarray(self.c), (1,))


@_pytree
class ShuffledBand(Map):
    """Ranking noise confined to the gold-quantile band [lo, hi] (measure preserving).

    The band is cut into len(perm) equal blocks; block b is moved to position perm[b].
    """

    lo: Any
    hi: Any
    perm: tuple[int, ...] = _static()

    def __post_init__(self):
        where = "rubrax.theory.misspec.shuffled_band"
        if sorted(self.perm) != list(range(len(self.perm))) or not self.perm:
            raise ValueError(f"{where}: perm must be a permutation of 0..blocks-1, got {self.perm!r}")
        if _user_value(self.lo) and _user_value(self.hi):
            lo, hi = float(self.lo), float(self.hi)
            if not (0 <= lo < hi <= 1):
                raise ValueError(f"{where}: need 0 <= lo < hi <= 1, got lo={lo!r}, hi={hi!r}")

    def __call__(self, u):
        u = jnp.asarray(u)
        k = len(self.perm)
        width = (self.hi - self.lo) / k
        t = (u - self.lo) / width
        block = jnp.clip(jnp.floor(t), 0, k - 1)
        moved = jnp.asarray(self.perm, u.dtype)[block.astype(jnp.int32)] + (t - block)
        return jnp.where((u >= self.lo) & (u < self.hi), self.lo + moved * width, u)

    @property
    def kinks(self):
        k = len(self.perm)
        return self.lo + (self.hi - self.lo) * jnp.arange(k + 1) / k


@_pytree
class PiecewiseLinear(Map):
    """Continuous piecewise-linear f through the points (xs[i], ys[i]); xs from 0 to 1."""

    xs: Any
    ys: Any

    def __post_init__(self):
        where = "rubrax.theory.misspec.piecewise_linear"
        if _user_value(self.xs) and _user_value(self.ys):
            xs, ys = np.asarray(self.xs, float), np.asarray(self.ys, float)
            if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
                raise ValueError(f"{where}: xs and ys must be 1-d of equal length >= 2, got {xs.shape} and {ys.shape}")
            if not (np.all(np.diff(xs) > 0) and xs[0] == 0 and xs[-1] == 1):
                raise ValueError(f"{where}: xs must increase strictly from 0 to 1, got {xs.tolist()}")
            if not np.all(np.isfinite(ys)):
                raise ValueError(f"{where}: ys must be finite, got {ys.tolist()}")

    def __call__(self, u):
        return jnp.interp(jnp.asarray(u), self.xs, self.ys)

    @property
    def kinks(self):
        return jnp.asarray(self.xs)


@_pytree
class NoisyBand:
    """Stochastic ranking noise among the responses whose gold lies in a quantile band.

    For gold rewards [..., n] (n responses per prompt), the responses whose empirical gold
    quantile (mid-rank / n) lies in [lo, hi] are re-ranked by the noisy key
    gold + sigma * N(0, 1), and receive the band's gold values in that noisy order. The
    proxy is thus a permutation of gold inside the band (same values, same marginal law,
    nothing leaves the band) and equal to gold outside it: pure ranking noise, confined
    to the band, whose strength sigma is in gold units.
    """

    lo: Any
    hi: Any
    sigma: Any

    def __post_init__(self):
        where = "rubrax.theory.misspec.noisy_band"
        if all(_user_value(v) for v in (self.lo, self.hi, self.sigma)):
            if not (0 <= float(self.lo) < float(self.hi) <= 1) or not float(self.sigma) >= 0:
                raise ValueError(f"{where}: need 0 <= lo < hi <= 1 and sigma >= 0, "
                                 f"got lo={self.lo!r}, hi={self.hi!r}, sigma={self.sigma!r}")

    def sample(self, key: jax.Array, gold: jnp.ndarray) -> jnp.ndarray:
        """Proxy rewards for gold rewards [..., n] (the band is per row of n)."""
        gold = jnp.asarray(gold)
        if gold.ndim < 1 or not jnp.issubdtype(gold.dtype, jnp.floating):
            raise ValueError(f"rubrax.theory.misspec.noisy_band: gold must be a float array [..., n], "
                             f"got {gold.dtype}{list(gold.shape)}")
        return _noisy_band_sample(self, key, gold)

    def _row(self, g: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        n = g.shape[0]
        order = jnp.argsort(g)
        rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        q = (rank + 0.5) / n
        band = (q >= self.lo) & (q <= self.hi)
        # In-band values ascending first, the rest pushed to the end.
        band_sorted = jnp.sort(jnp.where(band, g, jnp.inf))
        noisy_order = jnp.argsort(jnp.where(band, g + self.sigma * z, jnp.inf))
        noisy_rank = jnp.zeros(n, jnp.int32).at[noisy_order].set(jnp.arange(n, dtype=jnp.int32))
        return jnp.where(band, band_sorted[jnp.where(band, noisy_rank, 0)], g)


@jax.jit
def _noisy_band_sample(band: NoisyBand, key: jax.Array, gold: jnp.ndarray) -> jnp.ndarray:
    noise = jax.random.normal(key, gold.shape, gold.dtype)
    flat = jax.vmap(band._row)(gold.reshape(-1, gold.shape[-1]), noise.reshape(-1, gold.shape[-1]))
    return flat.reshape(gold.shape)


def correct() -> Correct:
    """f(u) = u."""
    return Correct()


def reversed() -> Reversed:  # noqa: A001 - the paper's name for this map
    """f(u) = 1 - u."""
    return Reversed()


def top_wrong(c: Any) -> TopWrong:
    """Top-c wrong: order reversed among the best c fraction of responses; c in (0, 1)."""
    return TopWrong(c=c)


def worst_wrong(c: Any) -> WorstWrong:
    """Worst-c wrong: order reversed among the worst c fraction of responses; c in (0, 1)."""
    return WorstWrong(c=c)


def shuffled_band(lo: Any, hi: Any, *, blocks: int = 4, seed: int = 0,
                  perm: tuple[int, ...] | None = None) -> ShuffledBand:
    """Ranking noise in the gold-quantile band [lo, hi]: `blocks` equal pieces permuted.

    The permutation is `perm` if given, else a fixed random one drawn from `seed` that
    moves every block when blocks > 1 (a derangement), so the band is really shuffled.
    """
    if perm is None:
        if blocks < 1:
            raise ValueError(f"rubrax.theory.misspec.shuffled_band: blocks must be >= 1, got {blocks}")
        rng = np.random.default_rng(seed)
        while True:
            p = rng.permutation(blocks)
            if blocks == 1 or not np.any(p == np.arange(blocks)):
                break
        perm = tuple(int(i) for i in p)
    return ShuffledBand(lo=lo, hi=hi, perm=tuple(builtins.int(i) for i in perm))


def piecewise_linear(xs: Any, ys: Any) -> PiecewiseLinear:
    """Continuous piecewise-linear map through (xs, ys); xs strictly increasing from 0 to 1."""
    return PiecewiseLinear(xs=jnp.asarray(xs, float), ys=jnp.asarray(ys, float))


def noisy_band(lo: Any, hi: Any, sigma: Any) -> NoisyBand:
    """Ranking noise of scale sigma (gold units) among each prompt's gold quantiles [lo, hi]."""
    return NoisyBand(lo=lo, hi=hi, sigma=sigma)

"""The tilted policy pi_r ∝ pi0 e^{r/beta}: Proposition 1 and Theorem 1 of the paper.

Notation (paper section 2): R0 = r*(x, Y0) is the gold reward of a base response,
f the misspecification map (proxy r = f(r*)), F0 the CDF of R0. For the tilted policy

    expected gold  = E[R0 e^{f(R0)/beta}] / E[e^{f(R0)/beta}]
    win rate       = E[F0(R0) e^{f(R0)/beta}] / E[e^{f(R0)/beta}]
    KL(pi_r||pi0)  = E[(f(R0)/beta) e^{f(R0)/beta}] / E[e^{f(R0)/beta}] - log E[e^{f(R0)/beta}]

(Proposition 1). When R0 ~ U(0, 1) and f preserves U(0, 1) (Theorem 1) the KL does
not depend on f and has the closed form `kl_tilted`, and win rate = expected gold.

All functions are pure jnp, broadcast over beta, compute in float64 when x64 is on,
and can be jitted / differentiated. Inputs are checked on the host when concrete.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rubrax.theory import quadrature
from rubrax.theory._checks import (
    check_finite,
    check_no_nan_result,
    check_positive,
    float_dtype,
    is_concrete,
)
from rubrax.theory.misspec import Map

__all__ = ["TiltedStats", "kl_tilted", "beta_for_kl", "tilted", "tilted_from_samples", "tilt_stats"]


class TiltedStats(NamedTuple):
    """Win rate against pi0, expected gold reward and KL(pi || pi0); arrays of one shape."""

    win_rate: jnp.ndarray
    expected_reward: jnp.ndarray
    kl: jnp.ndarray


# ---------------------------------------------------------------------------------------
# Theorem 1: the closed-form KL
# ---------------------------------------------------------------------------------------

# For t = 1/beta, KL(t) = t K'(t) - K(t) with K the cumulant generating function of
# U(0, 1), whose cumulants are kappa_n = B_n / n (Bernoulli numbers). Hence
# KL(t) = sum_{n even >= 2} B_n (n - 1) / (n * n!) t^n, convergent for t < 2 pi.
_BERNOULLI = {2: Fraction(1, 6), 4: Fraction(-1, 30), 6: Fraction(1, 42), 8: Fraction(-1, 30),
              10: Fraction(5, 66), 12: Fraction(-691, 2730), 14: Fraction(7, 6), 16: Fraction(-3617, 510),
              18: Fraction(43867, 798), 20: Fraction(-174611, 330)}
_SERIES = tuple(float(b * (n - 1) / (n * math.factorial(n))) for n, b in sorted(_BERNOULLI.items()))
_SERIES_T = 1.0  # below: series (truncation error < 1e-16 relative); above: closed form


def _kl_of_t(t: jnp.ndarray) -> jnp.ndarray:
    """Theorem 1 KL as a function of t = 1/beta >= 0, stable for all t."""
    small = t < _SERIES_T
    # Both branches are evaluated; the unused one gets a harmless argument so that
    # neither values nor gradients become NaN (the double-where trick).
    ts = jnp.where(small, t, 0.5)
    t2 = ts * ts
    poly = jnp.zeros_like(t2)
    for coef in _SERIES[::-1]:
        poly = poly * t2 + coef
    series = t2 * poly
    tl = jnp.minimum(jnp.where(small, 1.0, t), jnp.finfo(t.dtype).max / 4)
    one_minus_e = -jnp.expm1(-tl)  # 1 - e^{-t}
    # The paper's form ((t - 1) e^t + 1)/(e^t - 1) - log(e^t - 1) + log t, rewritten
    # without e^t so that it neither overflows nor cancels for large t.
    direct = jnp.log(tl) - 1 + tl * jnp.exp(-tl) / one_minus_e - jnp.log(one_minus_e)
    return jnp.where(small, series, direct)


def padded_call(fn: Callable[[jnp.ndarray], Any], x: jnp.ndarray, fill: float = 1.0) -> Any:
    """Apply an elementwise-over-x jitted `fn` to x flattened and padded to a bucket size.

    Bucketing the length (16, 24, 32, 48, 64, 96, ...) lets calls with different numbers
    of betas (or KLs, or n) share one compiled program while padding at most 50%; the
    outputs are sliced back and reshaped.
    """
    k = x.size
    size = max(16, 1 << (k - 1).bit_length())
    if size >= 32 and k <= 3 * size // 4:
        size = 3 * size // 4
    flat = jnp.concatenate([x.reshape(-1), jnp.full((size - k,), fill, x.dtype)])
    return jax.tree_util.tree_map(lambda o: o[..., :k].reshape(o.shape[:-1] + x.shape), fn(flat))


_kl_of_t_jit = jax.jit(lambda beta: _kl_of_t(1 / beta))


def kl_tilted(beta: Any) -> jnp.ndarray:
    """KL(pi_r || pi0) of Theorem 1 (R0 and f(R0) both U(0, 1)); same shape as beta.

        KL = ((1/beta - 1) e^{1/beta} + 1) / (e^{1/beta} - 1) - log beta - log(e^{1/beta} - 1)

    Evaluated as a Bernoulli series for beta > 1 and as an overflow-free rewrite of the
    closed form below, accurate to a few ulp from beta = 1e-300 to beta = inf (KL = 0).
    Decreasing in beta: KL ~ 1/(24 beta^2) for large beta, ~ log(1/beta) - 1 for small.
    """
    check_positive("beta", "rubrax.theory.kl_tilted", beta)
    beta = jnp.asarray(beta, float_dtype(beta))
    return padded_call(_kl_of_t_jit, beta)


_S_ASYMPTOTIC = 4.0  # t = e^s > 54: KL = s - 1 + O(t e^-t), exact to < 1e-21


def _kl_of_s(s: jnp.ndarray) -> jnp.ndarray:
    """KL as a function of s = log(1/beta). Above s = 4 it is s - 1 to within t e^-t, and
    computing it so keeps it from saturating where e^s overflows (s > 88 in float32)."""
    big = s > _S_ASYMPTOTIC
    return jnp.where(big, s - 1, _kl_of_t(jnp.exp(jnp.where(big, _S_ASYMPTOTIC, s))))


@jax.jit
def _beta_for_kl(kl: jnp.ndarray) -> jnp.ndarray:
    pos = kl > 0
    k = jnp.where(pos, kl, 1.0)
    # Bracket s = log(1/beta): KL(t) <= t^2/24 gives s >= log(24 KL)/2, and
    # KL(t) >= log t - 1 gives s <= KL + 1.
    lo = 0.5 * jnp.log(24 * k) - 1
    hi = k + 2

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        above = _kl_of_s(mid) > k
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    # The bracket is < 2^11 wide for kl < 1e3; 64 (float64) / 40 (float32) halvings reach
    # ~1e-16 / ~1e-9, and the Newton step below squares the remaining error.
    lo, hi = jax.lax.fori_loop(0, 64 if kl.dtype == jnp.float64 else 40, bisect, (lo, hi))
    s0 = jax.lax.stop_gradient((lo + hi) / 2)
    # One Newton step from the (non-differentiable) bisection root: it polishes the value
    # and gives the implicit-function gradient d s / d kl = 1 / KL'(s).
    val, slope = jax.jvp(_kl_of_s, (s0,), (jnp.ones_like(s0),))
    s = s0 - (val - k) / jax.lax.stop_gradient(slope)
    return jnp.where(pos, jnp.exp(-s), jnp.inf)


def beta_for_kl(kl: Any) -> jnp.ndarray:
    """The beta with kl_tilted(beta) = kl (inverse of Theorem 1's KL); same shape as kl.

    Monotone bisection on log(1/beta) inside the bracket [log(24 kl)/2 - 1, kl + 2],
    then one Newton step (differentiable through the implicit function theorem).
    kl = 0 gives beta = inf (the base policy). kl must be >= 0 and finite.
    """
    where = "rubrax.theory.beta_for_kl"
    check_finite("kl", where, kl)
    if is_concrete(kl) and (np.asarray(kl) < 0).any():
        raise ValueError(f"{where}: kl must be >= 0, got {np.asarray(kl).min()!r}")
    kl = jnp.asarray(kl, float_dtype(kl))
    # beta ~ e^-(kl + 1) must stay a normal number of the dtype (float32: kl < ~86).
    top = -math.log(float(jnp.finfo(kl.dtype).tiny)) - 2
    if is_concrete(kl) and (np.asarray(kl) > top).any():
        worst = float(np.asarray(kl).max())
        hint = " (enable jax_enable_x64 for up to ~706)" if kl.dtype != jnp.float64 else ""
        raise ValueError(f"{where}: kl={worst:g} needs beta ~ e^-{worst + 1:g}, below the smallest {kl.dtype} number; "
                         f"kl must be <= {top:.0f} here{hint}")
    return padded_call(_beta_for_kl, kl)


# ---------------------------------------------------------------------------------------
# Proposition 1 from a weighted point set (quadrature nodes or samples)
# ---------------------------------------------------------------------------------------


def _expm1_minus_x(y: jnp.ndarray, e: jnp.ndarray) -> jnp.ndarray:
    """e^y - 1 - y without cancellation, given e = e^y: Taylor series for |y| <= 1/4.

    Above 1/4 the direct difference loses at most a factor ~8 (e^y - 1 - y >= 0.028).
    Reusing e keeps one exponential per element, which keeps compile time down too.
    """
    small = jnp.abs(y) <= 0.25
    ys = jnp.where(small, y, 0)
    poly = jnp.zeros_like(ys)
    for k in range(12, 1, -1):  # sum_{k=2}^{12} y^k / k!, truncation < 1e-16 relative
        poly = (poly + 1 / math.factorial(k)) * ys
    return jnp.where(small, poly * ys, e - 1 - y)


def tilt_stats(r_PxN: jnp.ndarray, w_PxN: jnp.ndarray, values: tuple[jnp.ndarray, ...],
               beta_K: jnp.ndarray) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
    """Means of `values` under p_k ∝ w e^{r / beta_k} and KL(p_k || w), for every beta_k.

    r, w, values: [..., N] (leading axes P, e.g. prompts); w >= 0 are base weights
    (normalised here; zero-weight points are ignored). Returns arrays [K, ...].
    r is centred at its base mean, rc = r - E_w[r]; one elementwise pass over
    y = rc/beta - s feeds a single contraction with the columns [w, w rc, w v...].
    Two regimes, chosen per row:
      * spread of rc/beta < 2 (large beta, KL -> 0): s = 0 and M = e^y - 1 - y, so
        E_w[e^y] = 1 + D and E_w[y e^y] = N with D = ybar + E_w[M],
        N = ybar + E_w[y^2] + E_w[y M] (ybar = E_w[y], ~0), and
            KL = N - log1p(D) - N D / (1 + D),
        which keeps full relative precision even in float32 (KL ~ Var(y)/2);
      * otherwise s = max(rc)/beta (log-sum-exp shift) and M = e^y <= 1, so with
        Z = E_w[e^y]:  KL = E_w[e^y (rc - max rc)] / (beta Z) - log Z.
    """
    w = w_PxN / jnp.sum(w_PxN, axis=-1, keepdims=True)
    live = w > 0
    rc = r_PxN - jnp.sum(jnp.where(live, w * r_PxN, 0), axis=-1, keepdims=True)
    rc = jnp.where(live, rc, 0)
    rmax = jnp.max(jnp.where(live, rc, -jnp.inf), axis=-1)
    rmin = jnp.min(jnp.where(live, rc, jnp.inf), axis=-1)
    inv_beta = (1 / beta_K).reshape((-1,) + (1,) * rmax.ndim)  # [K, 1...]
    centred = jax.lax.stop_gradient((rmax - rmin) * inv_beta) < 2  # [K, ...]
    # Shifted regime: y = (rc - max rc) / beta, <= 0 by construction. Written as rc/beta - max/beta,
    # a fused multiply-add leaves the max node at +-ulp(max/beta) (~3e4 for beta = 1e-12 in
    # float32), whose exp overflows: NaN for small beta (large KL).
    y = jnp.where(centred[..., None], rc * inv_beta[..., None], (rc - rmax[..., None]) * inv_beta[..., None])
    e = jnp.exp(y)  # y < 2 in the centred regime, <= 0 in the shifted one: never overflows
    m = jnp.where(centred[..., None], _expm1_minus_x(y, e), e)
    vals = [jnp.where(live, v, 0) for v in values]
    # Column 2 is rc - max(rc) <= 0, so E_p[y] in the shifted regime has no cancellation.
    cols = jnp.stack([w, w * rc, w * (rc - rmax[..., None])] + [w * v for v in vals], axis=-1)  # [..., N, J]
    s = jnp.einsum("k...n,...nj->k...j", m, cols)
    s0, s1, s2 = s[..., 0], s[..., 1] * inv_beta, s[..., 2] * inv_beta
    # Per-row moments of the base (no beta dependence) for the centred regime.
    mean_rc = jnp.sum(w * rc, axis=-1)
    var_rc = jnp.sum(w * rc * rc, axis=-1)
    d = mean_rc * inv_beta + s0
    n = mean_rc * inv_beta + var_rc * inv_beta**2 + s1
    kl_centre = n - jnp.log1p(d) - n * d / (1 + d)
    z = jnp.where(centred, 1 + d, s0)
    kl_shift = s2 / z - jnp.log(z)
    kl = jnp.maximum(jnp.where(centred, kl_centre, kl_shift), 0)
    means = []
    for j, v in enumerate(vals):
        base = jnp.sum(w * v, axis=-1) + jnp.sum(w * rc * v, axis=-1) * inv_beta  # E_w[(1 + y) v]
        means.append(jnp.where(centred, base + s[..., 3 + j], s[..., 3 + j]) / z)
    return tuple(means), kl


def _kinks_of(f: Callable, kinks: Any) -> jnp.ndarray | None:
    parts = [jnp.reshape(jnp.asarray(k), (-1,)) for k in (getattr(f, "kinks", None), kinks) if k is not None]
    return jnp.concatenate(parts) if parts else None


def _tilted_impl(f: Callable, beta: jnp.ndarray, kinks: jnp.ndarray | None, panels: int) -> TiltedStats:
    u_N, w_N = quadrature.nodes(kinks, beta.dtype, panels=panels)
    fu_N = jnp.asarray(f(u_N), beta.dtype)
    if fu_N.shape != u_N.shape:
        raise ValueError(f"rubrax.theory.tilted: f must map an array of shape {u_N.shape} elementwise, "
                         f"it returned shape {fu_N.shape}")
    (reward_K,), kl_K = tilt_stats(fu_N, w_N, (u_N,), beta.reshape(-1))
    reward = reward_K.reshape(beta.shape)
    # R0 ~ U(0, 1): F0(u) = u, so the win rate equals the expected gold reward.
    return TiltedStats(win_rate=reward, expected_reward=reward, kl=kl_K.reshape(beta.shape))


# A Map is a pytree argument (its parameters are leaves: one compile per class and shape).
# Its class is also a static argument: with jaxlib's register_dataclass the tree structures of
# two classes can compare equal, and the class keeps a user's own Map subclasses apart too
# (rubrax.pytree says why).
_tilted_jit = jax.jit(lambda f, beta, kinks, *, panels, map_class: _tilted_impl(f, beta, kinks, panels),
                      static_argnames=("panels", "map_class"))
# A plain callable f is a static argument (hashed by identity): one compile per function.
_tilted_static_jit = jax.jit(_tilted_impl, static_argnames=("f", "panels"))


def tilted(f: Callable[[jnp.ndarray], jnp.ndarray], beta: Any, *, kinks: Any = None,
           panels: int = quadrature.PANELS) -> TiltedStats:
    """Proposition 1 for gold R0 ~ U(0, 1) and proxy f(R0): win rate, expected gold, KL.

    f: a jnp callable on [0, 1] (elementwise), e.g. a `rubrax.theory.misspec` map; it need
    not be bijective nor measure preserving. beta: any shape, > 0 (inf = base policy).
    The integrals over u use composite Gauss-Legendre panels graded toward 0, 1 and
    the kinks of f (`f.kinks`, plus `kinks=` for a custom f with jumps or bends), in a
    log-sum-exp form, so they stay accurate for beta down to ~1e-6.
    Returns TiltedStats with arrays of beta's shape; win_rate == expected_reward here
    because F0(u) = u. Misspec maps run through one cached jit (vmap over their
    parameters works); other callables run eagerly unless called under jit.
    """
    where = "rubrax.theory.tilted"
    if not callable(f):
        raise TypeError(f"{where}: f must be a callable on [0, 1], got {type(f).__name__}")
    check_positive("beta", where, beta)
    beta = jnp.asarray(beta, float_dtype(beta))
    kinks = _kinks_of(f, kinks)
    if isinstance(f, Map):
        run = lambda b: _tilted_jit(f, b, kinks, panels=panels, map_class=type(f))  # noqa: E731
    else:
        run = lambda b: _tilted_static_jit(f=f, beta=b, kinks=kinks, panels=panels)  # noqa: E731
    out = TiltedStats(*padded_call(run, beta))
    check_no_nan_result(where, win_rate=out.win_rate, kl=out.kl)
    return out


# ---------------------------------------------------------------------------------------
# Proposition 1 from samples of the base policy
# ---------------------------------------------------------------------------------------


def tie_ranks(x_PxN: jnp.ndarray, valid_PxN: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per entry: #valid entries of its row strictly below it, and #valid entries <= it.

    One stable argsort per row; tie groups are found on the sorted row with running
    max / min of group boundaries (O(n log n), no binary searches).
    """
    def one(x, v):
        n = x.shape[0]
        order = jnp.argsort(jnp.where(v, x, jnp.inf), stable=True)
        s = jnp.where(v, x, jnp.inf)[order]
        idx = jnp.arange(n)
        differs = s[1:] != s[:-1]
        first = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.array([True]), differs]), idx, 0))
        last = jax.lax.cummin(jnp.where(jnp.concatenate([differs, jnp.array([True])]), idx, n - 1), reverse=True)
        lt = jnp.zeros(n, idx.dtype).at[order].set(first)
        le = jnp.zeros(n, idx.dtype).at[order].set(last + 1)
        return lt, le
    return jax.vmap(one)(x_PxN, valid_PxN)


def mid_cdf(base_PxN: jnp.ndarray, values_PxM: jnp.ndarray | None = None, valid_PxN: jnp.ndarray | None = None) -> jnp.ndarray:
    """F0(v), the empirical CDF of each row of `base` with ties counted half:

        F0(v) = (#{valid base < v} + #{valid base <= v}) / (2 n),   n = #valid base

    (so a value equal to every base sample scores 1/2, and the win rate of the base
    against itself is exactly 1/2). At `values_PxM` (same leading axes as base), or,
    when values is None, at the base samples themselves (one stable sort per row, no
    binary search). 1-D inputs are one row. Float result; finite base values assumed.
    """
    base = jnp.asarray(base_PxN)
    base = base.astype(jnp.result_type(base.dtype, jnp.float32))
    one_row = base.ndim == 1
    base_PxN = base[None] if one_row else base
    valid_PxN = jnp.ones(base_PxN.shape, bool) if valid_PxN is None else jnp.asarray(valid_PxN).reshape(base_PxN.shape)
    if values_PxM is None:
        lt, le = tie_ranks(base_PxN, valid_PxN)
    else:
        v = jnp.asarray(values_PxM, base_PxN.dtype)
        v_PxM = v[None] if one_row else v
        sorted_PxN = jnp.sort(jnp.where(valid_PxN, base_PxN, jnp.inf), axis=-1)
        lt = jax.vmap(lambda b, x: jnp.searchsorted(b, x, side="left"))(sorted_PxN, v_PxM)
        le = jax.vmap(lambda b, x: jnp.searchsorted(b, x, side="right"))(sorted_PxN, v_PxM)
    n = jnp.sum(valid_PxN, axis=-1, keepdims=True)
    cdf = ((lt + le) / (2 * n)).astype(base_PxN.dtype)
    return cdf[0] if one_row else cdf


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _from_samples(gold_PxN, proxy_PxN, valid_PxN, beta_K, batch_size):
    cdf_PxN = mid_cdf(gold_PxN, valid_PxN=valid_PxN)
    w_PxN = valid_PxN.astype(gold_PxN.dtype)
    proxy_PxN = jnp.where(valid_PxN, proxy_PxN, 0)
    gold_PxN = jnp.where(valid_PxN, gold_PxN, 0)

    def chunk(beta_C):
        (win, reward), kl = tilt_stats(proxy_PxN, w_PxN, (cdf_PxN, gold_PxN), beta_C)
        return win, reward, kl

    # Chunks of betas bound the memory to chunk x all samples at a time.
    k = beta_K.shape[0]
    pad = -k % batch_size
    beta_CxB = jnp.concatenate([beta_K, jnp.ones((pad,), beta_K.dtype)]).reshape(-1, batch_size)
    out = jax.lax.map(chunk, beta_CxB)
    return tuple(o.reshape((-1,) + o.shape[2:])[:k] for o in out)


def validate_samples(where: str, gold: Any, proxy: Any, valid: Any) -> jnp.ndarray:
    """Checks per-prompt samples [..., m] on the host (shapes, finiteness, a valid sample in
    every prompt) and returns the validity mask; `gold` may be None (proxy-only callers)."""
    if gold is not None and np.shape(gold) != np.shape(proxy):
        raise ValueError(f"{where}: gold has shape {np.shape(gold)} but proxy has shape {np.shape(proxy)}")
    shape = np.shape(proxy)
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"{where}: proxy needs a last axis of m >= 1 samples, got shape {shape}")
    if valid is not None and np.shape(valid) != shape:
        raise ValueError(f"{where}: valid has shape {np.shape(valid)} but proxy has shape {shape}")
    valid = jnp.ones(shape, bool) if valid is None else jnp.asarray(valid, bool)
    check_finite("proxy", where, proxy, valid)
    if gold is not None:
        check_finite("gold", where, gold, valid)
    if is_concrete(valid) and not np.asarray(valid).any(axis=-1).all():
        empty = tuple(np.argwhere(~np.asarray(valid).any(axis=-1))[0])
        raise ValueError(f"{where}: prompt {empty} has no valid sample")
    return valid



def tilted_from_samples(gold: Any, proxy: Any, beta: Any, *, valid: Any = None) -> TiltedStats:
    """Proposition 1 estimated from samples of the base policy, per prompt.

    gold, proxy: [..., n] gold and proxy rewards of n base responses per prompt (leading
    axes = prompts). valid: optional bool [..., n]; False entries (failed judge calls,
    padding) are dropped. beta: any shape, > 0. The tilted policy reweights the samples
    by self-normalised importance weights p_i ∝ e^{proxy_i/beta}; the win rate uses
    the empirical CDF of gold over the same prompt's samples, ties counted half (so
    beta = inf gives exactly 1/2); the KL is Proposition 1's with the empirical base
    (hence at most log n). Average over the prompt axes to get the paper's numbers.
    Returns TiltedStats with arrays of shape beta.shape + prompt shape.
    """
    where = "rubrax.theory.tilted_from_samples"
    valid = validate_samples(where, gold, proxy, valid)
    gold_shape = np.shape(gold)
    check_positive("beta", where, beta)
    dtype = float_dtype(gold, proxy, beta)
    beta = jnp.asarray(beta, dtype)
    n = gold_shape[-1]
    prompts = gold_shape[:-1]
    gold_PxN = jnp.asarray(gold, dtype).reshape(-1, n)
    proxy_PxN = jnp.asarray(proxy, dtype).reshape(-1, n)
    batch = max(1, min(beta.size, 2**22 // max(1, gold_PxN.size)))
    win, reward, kl = _from_samples(gold_PxN, proxy_PxN, valid.reshape(-1, n), beta.reshape(-1), batch)
    shape = beta.shape + prompts
    out = TiltedStats(win.reshape(shape), reward.reshape(shape), kl.reshape(shape))
    check_no_nan_result(where, win_rate=out.win_rate, kl=out.kl)
    return out

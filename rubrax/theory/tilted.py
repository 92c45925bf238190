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


def kl_tilted(beta: Any) -> jnp.ndarray:
    """KL(pi_r || pi0) of Theorem 1 (R0 and f(R0) both U(0, 1)); same shape as beta.

        KL = ((1/beta - 1) e^{1/beta} + 1) / (e^{1/beta} - 1) - log beta - log(e^{1/beta} - 1)

    Evaluated as a Bernoulli series for beta > 1 and as an overflow-free rewrite of the
    closed form below, accurate to a few ulp from beta = 1e-300 to beta = inf (KL = 0).
    Decreasing in beta: KL ~ 1/(24 beta^2) for large beta, ~ log(1/beta) - 1 for small.
    """
    check_positive("beta", "rubrax.theory.kl_tilted", beta)
    beta = jnp.asarray(beta, float_dtype(beta))
    return _kl_of_t(1 / beta)


def _kl_of_s(s: jnp.ndarray) -> jnp.ndarray:
    return _kl_of_t(jnp.exp(s))


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

    lo, hi = jax.lax.fori_loop(0, 200 if kl.dtype == jnp.float64 else 100, bisect, (lo, hi))
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
    return _beta_for_kl(kl)


# ---------------------------------------------------------------------------------------
# Proposition 1 from a weighted point set (quadrature nodes or samples)
# ---------------------------------------------------------------------------------------


def tilt_stats(x_KxN: jnp.ndarray, w_N: jnp.ndarray, values: tuple[jnp.ndarray, ...]) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
    """Means of `values` under p ∝ w e^x and KL(p || w), reducing the last axis.

    w >= 0 are base weights (normalised here). x may be -inf (that point is never picked).
    Two formulations, chosen per row: when the spread of x over the support is < 1
    (large beta), x is centred at its base mean xbar and, with y = x - xbar,
        KL = A / (1 + B) - log1p(B),  A = E_w[y expm1(y)],  B = E_w[expm1(y) - y],
    which has no cancellation as KL -> 0; otherwise x is shifted by its maximum m
    (log-sum-exp) and KL = E_p[x - m] - log E_w[e^{x - m}].
    """
    w = w_N / jnp.sum(w_N, axis=-1, keepdims=True)
    live = w > 0
    xmax = jax.lax.stop_gradient(jnp.max(jnp.where(live, x_KxN, -jnp.inf), axis=-1, keepdims=True))
    xmin = jnp.min(jnp.where(live, x_KxN, jnp.inf), axis=-1, keepdims=True)
    spread = jax.lax.stop_gradient(xmax - xmin)
    y = jnp.where(live, x_KxN - xmax, -jnp.inf)
    e = w * jnp.exp(y)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = e / z
    means = tuple(jnp.sum(p * v, axis=-1) for v in values)
    kl_shift = jnp.sum(jnp.where(e > 0, p * y, 0), axis=-1) - jnp.log(z[..., 0])

    centred = spread[..., 0] < 1
    xs = jnp.where(live & centred[..., None], x_KxN, 0)
    yc = xs - jnp.sum(w * xs, axis=-1, keepdims=True)
    yc = jnp.clip(yc, -2, 2)  # only used where |y| < 1; the clip keeps the other rows finite
    a = jnp.sum(w * yc * jnp.expm1(yc), axis=-1)
    b = jnp.sum(w * (jnp.expm1(yc) - yc), axis=-1)
    kl_centre = a / (1 + b) - jnp.log1p(b)
    kl = jnp.maximum(jnp.where(centred, kl_centre, kl_shift), 0)
    return means, kl


def _kinks_of(f: Callable, kinks: Any) -> jnp.ndarray | None:
    parts = [jnp.reshape(jnp.asarray(k), (-1,)) for k in (getattr(f, "kinks", None), kinks) if k is not None]
    return jnp.concatenate(parts) if parts else None


def _tilted_impl(f: Callable, beta: jnp.ndarray, kinks: jnp.ndarray | None, panels: int) -> TiltedStats:
    u_N, w_N = quadrature.nodes(kinks, beta.dtype, panels=panels)
    fu_N = jnp.asarray(f(u_N), beta.dtype)
    if fu_N.shape != u_N.shape:
        raise ValueError(f"rubrax.theory.tilted: f must map an array of shape {u_N.shape} elementwise, "
                         f"it returned shape {fu_N.shape}")
    beta_K = beta.reshape(-1, 1)
    (reward_K,), kl_K = tilt_stats(fu_N[None, :] / beta_K, w_N, (u_N,))
    reward = reward_K.reshape(beta.shape)
    # R0 ~ U(0, 1): F0(u) = u, so the win rate equals the expected gold reward.
    return TiltedStats(win_rate=reward, expected_reward=reward, kl=kl_K.reshape(beta.shape))


_tilted_jit = jax.jit(_tilted_impl, static_argnames=("panels",))


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
    impl = _tilted_jit if isinstance(f, Map) else _tilted_impl
    out = impl(f, beta, kinks, panels=panels)
    check_no_nan_result(where, win_rate=out.win_rate, kl=out.kl)
    return out


# ---------------------------------------------------------------------------------------
# Proposition 1 from samples of the base policy
# ---------------------------------------------------------------------------------------


def _mid_cdf(gold_PxN: jnp.ndarray, valid_PxN: jnp.ndarray) -> jnp.ndarray:
    """Empirical CDF of gold at each sample with ties counted half: (#< + #<=) / (2 n)."""
    def one(g, v):
        s = jnp.sort(jnp.where(v, g, jnp.inf))
        lt = jnp.searchsorted(s, g, side="left")
        le = jnp.searchsorted(s, g, side="right")
        return (lt + le) / (2 * jnp.sum(v))
    return jax.vmap(one)(gold_PxN, valid_PxN).astype(gold_PxN.dtype)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _from_samples(gold_PxN, proxy_PxN, valid_PxN, beta_K, batch_size):
    cdf_PxN = _mid_cdf(gold_PxN, valid_PxN)
    w_PxN = valid_PxN.astype(gold_PxN.dtype)
    proxy_PxN = jnp.where(valid_PxN, proxy_PxN, 0)
    gold_PxN = jnp.where(valid_PxN, gold_PxN, 0)

    def one(beta):
        (win, reward), kl = tilt_stats(proxy_PxN / beta, w_PxN, (cdf_PxN, gold_PxN))
        return win, reward, kl

    # lax.map bounds the memory to batch_size betas x all samples at a time.
    return jax.lax.map(one, beta_K, batch_size=batch_size)


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
    gold_shape, proxy_shape = np.shape(gold), np.shape(proxy)
    if gold_shape != proxy_shape:
        raise ValueError(f"{where}: gold has shape {gold_shape} but proxy has shape {proxy_shape}")
    if len(gold_shape) < 1 or gold_shape[-1] < 1:
        raise ValueError(f"{where}: gold and proxy need a last axis of n >= 1 samples, got shape {gold_shape}")
    if valid is not None and np.shape(valid) != gold_shape:
        raise ValueError(f"{where}: valid has shape {np.shape(valid)} but gold has shape {gold_shape}")
    valid = jnp.ones(gold_shape, bool) if valid is None else jnp.asarray(valid, bool)
    check_finite("gold", where, gold, valid)
    check_finite("proxy", where, proxy, valid)
    if is_concrete(valid) and not np.asarray(valid).any(axis=-1).all():
        raise ValueError(f"{where}: prompt {tuple(np.argwhere(~np.asarray(valid).any(axis=-1))[0])} has no valid sample")
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

"""Best-of-n sampling under a misspecified proxy: exact finite-sample formulas.

Best-of-n draws n responses from pi0 and keeps the one with the highest proxy reward
(ties broken uniformly at random). Background results (PAPER.md section 2): with a
continuous calibrated reward it beats pi0 with probability n/(n+1), and its KL is
log n - (n-1)/n (Beirami et al.; an upper bound when the proxy has ties).

Three views are provided:
  * `best_of_n_probs` / `best_of_n`: the exact law of the selected response when the
    base is the empirical distribution of m scored samples (n draws with replacement).
    With G(v) = P(proxy <= v), G(v-) = P(proxy < v), sample i (probability 1/m) is
    selected with probability
        q_i = (1/m) * (G(r_i)^n - G(r_i-)^n) / P(proxy = r_i)
    (the top level is v with probability G(v)^n - G(v-)^n; given that, the pick is
    uniform among the tied draws). Its KL to the base is sum_i q_i log(m q_i), exact.
  * `best_of_n_unbiased`: the unbiased estimator of the true best-of-n expected gold
    reward from m >= n samples (average over all C(m, n) subsets, in closed form).
  * `best_of_n_uniform`: the continuous Theorem 1 setting (R0 ~ U(0,1), f measure
    preserving): the selected gold has density n f(u)^{n-1}.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from rubrax.theory import quadrature
from rubrax.theory._checks import check_no_nan_result, float_dtype, is_concrete
from rubrax.theory.misspec import Map
from rubrax.theory.tilted import (
    TiltedStats,
    _kinks_of,
    mid_cdf,
    padded_call,
    tie_ranks,
    tilt_stats,
    validate_samples,
)

__all__ = ["best_of_n_kl_bound", "best_of_n_probs", "best_of_n", "best_of_n_unbiased", "best_of_n_uniform"]


def _check_n(where: str, n: Any) -> None:
    if is_concrete(n):
        a = np.asarray(n, dtype=np.float64)
        if np.isnan(a).any() or (a < 1).any() or np.isinf(a).any():
            raise ValueError(f"{where}: n must be >= 1 and finite, got {a.min() if np.isnan(a).sum() == 0 else 'NaN'!r}")


def best_of_n_kl_bound(n: Any) -> jnp.ndarray:
    """log n - (n - 1)/n: the KL of best-of-n for a continuous proxy (an upper bound with ties)."""
    _check_n("rubrax.theory.best_of_n_kl_bound", n)
    n = jnp.asarray(n, float_dtype(n))
    return jnp.log(n) - (n - 1) / n


def _counts(proxy_PxM: jnp.ndarray, valid_PxM: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per sample: #valid with proxy < r_i, #valid with proxy <= r_i, and m = #valid."""
    lt, le = tie_ranks(proxy_PxM, valid_PxM)
    return lt, le, jnp.sum(valid_PxM, axis=-1, keepdims=True)


def _log_ratio(lt, le, m, n_K):
    """log(q_i / p_i) = log((G^n - G_-^n) / P(=)), G = le/m, G_- = lt/m, stable for large n."""
    a = le / m
    d = (le - lt) / m
    nn = n_K[:, None, None]
    # G^n - G_-^n = G^n (1 - (1 - d/G)^n); log1p/expm1 keep it exact when d << G.
    inner = -jnp.expm1(nn * jnp.log1p(-jnp.minimum(d / a, 1.0)))
    return nn * jnp.log(a) + jnp.log(inner) - jnp.log(d)


@jax.jit
def _bon_impl(gold_PxM, proxy_PxM, valid_PxM, n_K):
    dtype = proxy_PxM.dtype
    lt, le, m = _counts(proxy_PxM, valid_PxM)
    lt, le, m = lt.astype(dtype), le.astype(dtype), m.astype(dtype)
    logr = _log_ratio(lt, le, m, n_K)  # K x P x M
    q = jnp.where(valid_PxM, jnp.exp(logr) / m, 0)
    kl = jnp.sum(jnp.where(valid_PxM, q * logr, 0), axis=-1)
    cdf = mid_cdf(gold_PxM, valid_PxN=valid_PxM)
    gold = jnp.where(valid_PxM, gold_PxM, 0)
    return q, jnp.sum(q * cdf, axis=-1), jnp.sum(q * gold, axis=-1), kl


def _prep(where, gold, proxy, n, valid):
    valid = validate_samples(where, gold, proxy, valid)
    _check_n(where, n)
    dtype = float_dtype(proxy, n) if gold is None else float_dtype(gold, proxy, n)
    n = jnp.asarray(n, dtype)
    shape = np.shape(proxy)
    m = shape[-1]
    gold_PxM = jnp.zeros((int(np.prod(shape[:-1], dtype=int)), m), dtype) if gold is None \
        else jnp.asarray(gold, dtype).reshape(-1, m)
    return gold_PxM, jnp.asarray(proxy, dtype).reshape(-1, m), valid.reshape(-1, m), n, shape


def best_of_n_probs(proxy: Any, n: Any, *, valid: Any = None) -> jnp.ndarray:
    """Exact probability that best-of-n over the empirical base picks each sample.

    proxy: [..., m] proxy rewards of m base samples per prompt (each of probability
    1/#valid); n: any shape, >= 1 (real n allowed; integers are the sampling meaning).
    Ties in proxy are broken uniformly at random. Returns q of shape n.shape + proxy.shape
    (zero at invalid samples; sums to 1 over the last axis).
    """
    where = "rubrax.theory.best_of_n_probs"
    gold_PxM, proxy_PxM, valid_PxM, n, shape = _prep(where, None, proxy, n, valid)
    q = _bon_impl(gold_PxM, proxy_PxM, valid_PxM, n.reshape(-1))[0]
    return q.reshape(n.shape + shape)


def best_of_n(gold: Any, proxy: Any, n: Any, *, valid: Any = None) -> TiltedStats:
    """Win rate, expected gold and exact KL of best-of-n over the empirical base, per prompt.

    gold, proxy: [..., m] scores of m base samples per prompt. n: any shape, >= 1. The
    win rate is E_q[F0(gold)] with F0 the empirical gold CDF, ties counted half (so
    n = 1 gives exactly 1/2). KL = sum_i q_i log(m q_i) <= log n - (n-1)/n, with near
    equality when the proxy has no ties and m >> n. Returns TiltedStats with arrays of
    shape n.shape + prompt shape.
    """
    where = "rubrax.theory.best_of_n"
    gold_PxM, proxy_PxM, valid_PxM, n, shape = _prep(where, gold, proxy, n, valid)
    _, win, reward, kl = _bon_impl(gold_PxM, proxy_PxM, valid_PxM, n.reshape(-1))
    out_shape = n.shape + shape[:-1]
    out = TiltedStats(win.reshape(out_shape), reward.reshape(out_shape), kl.reshape(out_shape))
    check_no_nan_result(where, win_rate=out.win_rate, kl=out.kl)
    return out


def _log_comb_ratio(k, n, m):
    """log(C(k, n) / C(m, n)) for k >= n; -inf for k < n."""
    safe = jnp.maximum(k, n)
    val = gammaln(safe + 1) - gammaln(safe - n + 1) - gammaln(m + 1) + gammaln(m - n + 1)
    return jnp.where(k >= n, val, -jnp.inf)


@jax.jit
def _unbiased_impl(gold_PxM, proxy_PxM, valid_PxM, n_K):
    dtype = proxy_PxM.dtype
    lt, le, m = _counts(proxy_PxM, valid_PxM)
    lt, le, m = lt.astype(dtype), le.astype(dtype), m.astype(dtype)
    nn = n_K[:, None, None]
    # P(the best of a random n-subset lies in i's tie group) = [C(le, n) - C(lt, n)] / C(m, n),
    # shared equally by the group's (le - lt) members.
    hi = jnp.exp(_log_comb_ratio(le, nn, m))
    lo = jnp.exp(_log_comb_ratio(lt, nn, m))
    weight = jnp.where(valid_PxM, (hi - lo) / (le - lt), 0)
    return jnp.sum(weight * jnp.where(valid_PxM, gold_PxM, 0), axis=-1)


def best_of_n_unbiased(gold: Any, proxy: Any, n: Any, *, valid: Any = None) -> jnp.ndarray:
    """Unbiased estimate of E[gold of best-of-n under proxy selection] from m >= n samples.

    The average, over all C(m, n) subsets of the m samples, of the gold reward of the
    subset's proxy-best member (ties broken uniformly), in closed form: with samples
    ranked by proxy, the group of ties occupying ranks lt+1..le is the subset maximum
    with probability [C(le, n) - C(lt, n)] / C(m, n). n: integers, any shape, 1 <= n <= m.
    Returns an array of shape n.shape + prompt shape.
    """
    where = "rubrax.theory.best_of_n_unbiased"
    gold_PxM, proxy_PxM, valid_PxM, n, shape = _prep(where, gold, proxy, n, valid)
    if is_concrete(n):
        nv = np.asarray(n)
        if not np.all(nv == np.round(nv)):
            raise ValueError(f"{where}: n must be an integer, got {nv.reshape(-1)[0]!r}")
        m_min = int(np.asarray(valid_PxM).sum(-1).min())
        if nv.max() > m_min:
            raise ValueError(f"{where}: needs m >= n samples per prompt, got n = {int(nv.max())} "
                             f"with only m = {m_min} valid samples")
    est = _unbiased_impl(gold_PxM, proxy_PxM, valid_PxM, n.reshape(-1))
    return est.reshape(n.shape + shape[:-1])


def _uniform_impl(f, n_K, kinks, panels):
    dtype = n_K.dtype
    u_N, w_N = quadrature.nodes(kinks, dtype, panels=panels)
    fu_N = jnp.asarray(f(u_N), dtype)
    # Selected-gold density n f(u)^{n-1} = n e^{log f(u) / beta} with beta = 1/(n - 1): a
    # tilt of log f. The floor on f only moves points where f = 0, whose weight is 0 anyway.
    log_f = jnp.log(jnp.clip(fu_N, jnp.finfo(dtype).tiny, 1))
    (reward,), kl = tilt_stats(log_f, w_N, (u_N,), 1 / (n_K - 1))
    return reward, kl


# The Map's class is static as well as its tree structure (see _tilted_jit in tilted.py).
_uniform_jit = jax.jit(lambda f, n_K, kinks, *, panels, map_class: _uniform_impl(f, n_K, kinks, panels),
                       static_argnames=("panels", "map_class"))
_uniform_static_jit = jax.jit(_uniform_impl, static_argnames=("f", "panels"))


def best_of_n_uniform(f: Callable[[jnp.ndarray], jnp.ndarray], n: Any, *, kinks: Any = None,
                      panels: int = quadrature.PANELS) -> TiltedStats:
    """Best-of-n in Theorem 1's setting: R0 ~ U(0, 1), proxy f(R0) ~ U(0, 1) (f measure preserving).

    The proxy-best of n draws has proxy ~ Beta(n, 1), so its gold u has density
    n f(u)^{n-1} on [0, 1]; win rate = expected gold = int u n f(u)^{n-1} du, and
    KL = log n - (n-1)/n whatever f (computed by the same quadrature as `tilted`, so
    it checks the measure-preservation assumption). n: any shape, >= 1.
    """
    where = "rubrax.theory.best_of_n_uniform"
    if not callable(f):
        raise TypeError(f"{where}: f must be a callable on [0, 1], got {type(f).__name__}")
    _check_n(where, n)
    n = jnp.asarray(n, float_dtype(n))
    kinks = _kinks_of(f, kinks)
    if isinstance(f, Map):
        run = lambda x: _uniform_jit(f, x, kinks, panels=panels, map_class=type(f))  # noqa: E731
    else:
        run = lambda x: _uniform_static_jit(f=f, n_K=x, kinks=kinks, panels=panels)  # noqa: E731
    reward, kl = padded_call(run, n)
    out = TiltedStats(reward, reward, kl)
    check_no_nan_result(where, win_rate=out.win_rate, kl=out.kl)
    return out

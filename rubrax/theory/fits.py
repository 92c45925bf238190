"""Gao et al. (2022) over-optimisation laws and their least-squares fit.

With d = sqrt(KL(pi || pi0)), Gao, Schulman & Hilton ("Scaling Laws for Reward Model
Overoptimization") fit the gold reward gained over the base policy as

    best-of-n:  R(d) = d (alpha - beta d)
    RL:         R(d) = d (alpha - beta log d)

Both are linear in (alpha, beta) once d is known, so the fit is an ordinary linear
least-squares problem, solved here in closed form (optionally with a free offset
R(0) = r0 for curves that do not start at 0). The peak of the bon law is at
d* = alpha / (2 beta), of the RL law at d* = exp(alpha / beta - 1).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from rubrax.theory._checks import check_finite, float_dtype, is_concrete

__all__ = ["gao_bon", "gao_rl", "GaoFit", "fit_gao"]

Form = Literal["bon", "rl"]


def gao_bon(kl: Any, alpha: Any, beta: Any, offset: Any = 0.0) -> jnp.ndarray:
    """Gao et al.'s best-of-n law: offset + d (alpha - beta d), d = sqrt(kl)."""
    d = jnp.sqrt(jnp.asarray(kl, float_dtype(kl)))
    return offset + d * (alpha - beta * d)


def gao_rl(kl: Any, alpha: Any, beta: Any, offset: Any = 0.0) -> jnp.ndarray:
    """Gao et al.'s RL law: offset + d (alpha - beta log d), d = sqrt(kl) (0 at d = 0)."""
    d = jnp.sqrt(jnp.asarray(kl, float_dtype(kl)))
    return offset + alpha * d - beta * xlogy(d, d)


class GaoFit(NamedTuple):
    """Least-squares fit of a Gao et al. law; arrays of the curves' batch shape."""

    alpha: jnp.ndarray
    beta: jnp.ndarray
    offset: jnp.ndarray
    rmse: jnp.ndarray
    form: str

    def predict(self, kl: Any) -> jnp.ndarray:
        """The fitted gold reward at kl (broadcast against the batch shape)."""
        law = gao_bon if self.form == "bon" else gao_rl
        return law(kl, self.alpha, self.beta, self.offset)

    @property
    def peak_kl(self) -> jnp.ndarray:
        """The KL at which the fitted gold reward peaks (inf when beta <= 0: no peak)."""
        d = self.alpha / (2 * self.beta) if self.form == "bon" else jnp.exp(self.alpha / self.beta - 1)
        return jnp.where(self.beta > 0, d * d, jnp.inf)


def _design(d_N: jnp.ndarray, form: Form, offset: bool) -> jnp.ndarray:
    second = d_N * d_N if form == "bon" else xlogy(d_N, d_N)
    cols = [d_N, -second] + ([jnp.ones_like(d_N)] if offset else [])
    return jnp.stack(cols, axis=-1)


def fit_gao(kl: Any, gold: Any, *, form: Form = "bon", offset: bool = True) -> GaoFit:
    """Fit alpha, beta (and the offset R(0) when offset=True) of Gao et al.'s law by least squares.

    kl: [N] or [..., N] KL values (>= 0); gold: [..., N] gold rewards along each curve.
    Returns GaoFit with arrays of shape gold.shape[:-1].
    """
    where = "rubrax.theory.fit_gao"
    if form not in ("bon", "rl"):
        raise ValueError(f"{where}: form must be 'bon' or 'rl', got {form!r}")
    gshape, kshape = np.shape(gold), np.shape(kl)
    if len(gshape) < 1 or kshape[-1:] != gshape[-1:] or (len(kshape) > 1 and kshape != gshape):
        raise ValueError(f"{where}: kl has shape {kshape}, gold has shape {gshape}; "
                         "need kl [N] or the same shape as gold [..., N]")
    need = 3 if offset else 2
    if gshape[-1] < need:
        raise ValueError(f"{where}: need at least {need} points per curve, got {gshape[-1]}")
    check_finite("kl", where, kl)
    check_finite("gold", where, gold)
    if is_concrete(kl) and (np.asarray(kl) < 0).any():
        raise ValueError(f"{where}: kl must be >= 0, got {np.asarray(kl).min()!r}")
    dtype = float_dtype(kl, gold)
    gold_BxN = jnp.asarray(gold, dtype).reshape(-1, gshape[-1])
    kl_BxN = jnp.broadcast_to(jnp.asarray(kl, dtype), gshape).reshape(gold_BxN.shape)
    coef, rmse = _fit(kl_BxN, gold_BxN, form, offset)
    batch = gshape[:-1]
    zero = jnp.zeros(batch, dtype)
    return GaoFit(alpha=coef[:, 0].reshape(batch), beta=coef[:, 1].reshape(batch),
                  offset=coef[:, 2].reshape(batch) if offset else zero, rmse=rmse.reshape(batch), form=form)


@jax.jit(static_argnames=("form", "offset"))
def _fit(kl_BxN, gold_BxN, form, offset):
    def one(kl_N, gold_N):
        a = _design(jnp.sqrt(kl_N), form, offset)
        coef, *_ = jnp.linalg.lstsq(a, gold_N)
        resid = gold_N - a @ coef
        return coef, jnp.sqrt(jnp.mean(resid * resid))
    return jax.vmap(one)(kl_BxN, gold_BxN)

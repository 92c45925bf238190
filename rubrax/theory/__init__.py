"""Reward-tail theory: tilted policies and best-of-n under a misspecified reward.

Implements section 2 of "Chasing the Tail" (arXiv 2509.21500): the tilted policy
pi_r ∝ pi0 e^{r/beta} that reinforcement fine-tuning converges to, its win rate,
expected gold reward and KL under a misspecification map f (Proposition 1, Theorem 1),
the paper's Figure 2 maps, the sample-based version of Proposition 1 (predict an
over-optimisation curve from scored base samples), best-of-n, and Gao et al.'s laws.

Public API:
    kl_tilted(beta), beta_for_kl(kl)                  Theorem 1's KL and its inverse
    tilted(f, beta) -> TiltedStats(win_rate, expected_reward, kl)
    misspec.correct/reversed/top_wrong/worst_wrong    the paper's maps
    misspec.shuffled_band/noisy_band/piecewise_linear  where-do-errors-hurt families
    tilted_from_samples(gold, proxy, beta)            Proposition 1 from samples
    mid_cdf(base, values)                             empirical CDF, ties counted half
    best_of_n_probs, best_of_n, best_of_n_kl_bound,
    best_of_n_unbiased, best_of_n_uniform             best-of-n, exact
    gao_bon, gao_rl, fit_gao                          Gao et al. (2022) laws and fit
    figures.write_figure2(out_root)                   the paper's Figure 2 (CSV + PNG)

Pure jnp; float64 when `jax.config.update("jax_enable_x64", True)`; jit/vmap/grad safe.
"""

from rubrax.theory import misspec
from rubrax.theory.best_of_n import (
    best_of_n,
    best_of_n_kl_bound,
    best_of_n_probs,
    best_of_n_unbiased,
    best_of_n_uniform,
)
from rubrax.theory.fits import GaoFit, fit_gao, gao_bon, gao_rl
from rubrax.theory.tilted import TiltedStats, beta_for_kl, kl_tilted, mid_cdf, tilted, tilted_from_samples

__all__ = [
    "misspec",
    "TiltedStats",
    "kl_tilted",
    "beta_for_kl",
    "tilted",
    "tilted_from_samples",
    "mid_cdf",
    "best_of_n",
    "best_of_n_kl_bound",
    "best_of_n_probs",
    "best_of_n_unbiased",
    "best_of_n_uniform",
    "GaoFit",
    "gao_bon",
    "gao_rl",
    "fit_gao",
]

"""rubrax.theory: the math of section 2 pinned against independent references.

References: mpmath (30-digit adaptive quadrature with the kinks as break points) for
Theorem 1 / Proposition 1; Monte Carlo for best-of-n; brute force over all subsets for
the unbiased best-of-n estimator; hand-computed tiny cases.
"""

from __future__ import annotations

import csv
import itertools
import math

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

from rubrax.theory import (
    beta_for_kl,
    best_of_n,
    best_of_n_kl_bound,
    best_of_n_probs,
    best_of_n_unbiased,
    best_of_n_uniform,
    fit_gao,
    gao_bon,
    gao_rl,
    kl_tilted,
    misspec,
    tilted,
    tilted_from_samples,
)

mp.mp.dps = 30


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --- mpmath references -------------------------------------------------------------------


def _mp_kl_closed(beta: float) -> mp.mpf:
    """The paper's closed form of Theorem 1, in 30 digits."""
    t = 1 / mp.mpf(beta)
    return ((t - 1) * mp.e**t + 1) / (mp.e**t - 1) - mp.log(mp.mpf(beta)) - mp.log(mp.e**t - 1)


def _mp_prop1(f, beta: float, kinks=()) -> tuple[float, float]:
    """Proposition 1 for R0 ~ U(0,1) by adaptive quadrature: (expected gold, KL)."""
    b = mp.mpf(beta)
    fmax = max(f(mp.mpf(u)) for u in np.linspace(0, 1, 2001))
    pts = sorted({0.0, 1.0, *kinks, *(k - d for k in (1.0, *kinks) for d in (3 * beta, 30 * beta) if k - d > 0),
                  *(k + d for k in kinks for d in (3 * beta, 30 * beta) if k + d < 1)})
    pts = [mp.mpf(p) for p in pts]
    wt = lambda u: mp.e ** ((f(u) - fmax) / b)  # noqa: E731
    z = mp.quad(wt, pts)
    er = mp.quad(lambda u: u * wt(u), pts) / z
    ex = mp.quad(lambda u: (f(u) - fmax) / b * wt(u), pts) / z
    return float(er), float(ex - mp.log(z))


def _top(c):
    return lambda u: u if u <= 1 - c else 2 - c - u


def _worst(c):
    return lambda u: c - u if u <= c else u


# --- Theorem 1: kl_tilted / beta_for_kl --------------------------------------------------


@pytest.mark.parametrize("beta", [1e-3, 0.01, 0.1, 0.5, 0.999, 1.0, 1.001, 3.0, 10.0, 100.0, 1e3])
def test_kl_tilted_matches_numerical_integration(x64, beta):
    # KL of the tilted density p(u) = e^{u/beta} / Z on [0, 1] against U(0, 1), integrated
    # numerically (not through the closed form), and the paper's closed form itself.
    b = mp.mpf(beta)
    z = mp.quad(lambda u: mp.e ** ((u - 1) / b), [0, max(0, 1 - 30 * beta), 1])
    kl_num = mp.quad(lambda u: mp.e ** ((u - 1) / b) / z * mp.log(mp.e ** ((u - 1) / b) / z), [0, max(0, 1 - 30 * beta), 1])
    got = float(kl_tilted(beta))
    assert got == pytest.approx(float(kl_num), rel=1e-13, abs=1e-300)
    assert got == pytest.approx(float(_mp_kl_closed(beta)), rel=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_tilted_stable_and_monotone_from_1e_3_to_1e3(dtype):
    with jax.enable_x64(dtype == "float64"):
        beta = jnp.geomspace(1e-3, 1e3, 2001, dtype=dtype)
        kl = np.asarray(kl_tilted(beta))
    assert kl.dtype == np.dtype(dtype)
    assert np.isfinite(kl).all() and (kl > 0).all()
    assert (np.diff(kl) < 0).all()  # strictly decreasing in beta
    # asymptotes: ~ 1/(24 beta^2) for large beta, ~ log(1/beta) - 1 for small beta
    assert kl[-1] == pytest.approx(1 / 24e6, rel=1e-5)
    assert kl[0] == pytest.approx(math.log(1e3) - 1, rel=1e-5)


def test_kl_tilted_limits(x64):
    assert float(kl_tilted(jnp.inf)) == 0.0
    assert float(kl_tilted(1e8)) == pytest.approx(1 / 24e16, rel=1e-10)


def test_beta_for_kl_inverts_kl_tilted(x64):
    kl = np.array([1e-12, 1e-6, 1e-3, 0.05, 0.5, 1.0, 2.0, 4.0, 8.0, 20.0])
    beta = beta_for_kl(kl)
    np.testing.assert_allclose(np.asarray(kl_tilted(beta)), kl, rtol=1e-12)
    beta_grid = np.geomspace(1e-3, 1e3, 25)
    np.testing.assert_allclose(np.asarray(beta_for_kl(kl_tilted(beta_grid))), beta_grid, rtol=1e-10)
    assert float(beta_for_kl(0.0)) == np.inf
    # Implicit-function gradient: d beta / d kl = 1 / (d KL / d beta).
    g = jax.grad(lambda k: beta_for_kl(k))(1.0)
    assert float(g) == pytest.approx(1 / float(jax.grad(kl_tilted)(beta_for_kl(1.0))), rel=1e-10)


def test_beta_for_kl_is_jittable_and_vmappable(x64):
    kl = jnp.linspace(0.1, 4, 7)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(beta_for_kl))(kl)), np.asarray(beta_for_kl(kl)), rtol=1e-14)


# --- tilted: Proposition 1 / Theorem 1 by quadrature -------------------------------------

PAPER_MAPS = [
    ("correct", misspec.correct(), lambda u: u, ()),
    ("reversed", misspec.reversed(), lambda u: 1 - u, ()),
    ("top25", misspec.top_wrong(0.25), _top(0.25), (0.75,)),
    ("top50", misspec.top_wrong(0.5), _top(0.5), (0.5,)),
    ("worst50", misspec.worst_wrong(0.5), _worst(0.5), (0.5,)),
    ("worst90", misspec.worst_wrong(0.9), _worst(0.9), (0.9,)),
]


@pytest.mark.parametrize("name,f,f_np,kinks", PAPER_MAPS, ids=[m[0] for m in PAPER_MAPS])
def test_tilted_measure_preserving_maps_give_theorem1(x64, name, f, f_np, kinks):
    betas = np.array([1e-3, 3e-3, 0.02, 0.1, 0.4, 1.0, 5.0, 100.0, 1e3])
    out = tilted(f, betas)
    # Theorem 1: the KL does not depend on f.
    np.testing.assert_allclose(np.asarray(out.kl), np.asarray(kl_tilted(betas)), rtol=1e-11)
    # Theorem 1: win rate = expected reward = int f^{-1}(u) e^{u/beta} du / (beta (e^{1/beta} - 1)).
    # All paper maps are involutions (f^{-1} = f), so the reference integrates f itself.
    for b, win in zip(betas, np.asarray(out.win_rate)):
        bb = mp.mpf(b)
        pts = [mp.mpf(p) for p in sorted({0.0, 1.0, *kinks, max(0.0, 1 - 3 * b), max(0.0, 1 - 30 * b)})]
        ref = mp.quad(lambda u: f_np(u) * mp.e ** ((u - 1) / bb), pts) / (bb * (1 - mp.e ** (-1 / bb)))
        assert win == pytest.approx(float(ref), abs=1e-13), b
    np.testing.assert_array_equal(np.asarray(out.win_rate), np.asarray(out.expected_reward))


def test_tilted_shuffled_band_is_theorem1(x64):
    f = misspec.shuffled_band(0.6, 0.9, perm=(2, 0, 1))
    betas = np.array([2e-3, 0.05, 0.5])
    out = tilted(f, betas)
    np.testing.assert_allclose(np.asarray(out.kl), np.asarray(kl_tilted(betas)), rtol=1e-11)
    # f^{-1}: the block moved to position perm[b] comes from block b.
    inv = {2: 0, 0: 1, 1: 2}

    def f_inv(v):
        if not 0.6 <= v < 0.9:
            return v
        t = (v - 0.6) / 0.1
        k = min(int(t), 2)
        return 0.6 + 0.1 * (inv[k] + t - k)

    for b, win in zip(betas, np.asarray(out.win_rate)):
        bb = mp.mpf(b)
        pts = [0, 0.6, 0.7, 0.8, 0.9, *([1 - 30 * b] if 1 - 30 * b > 0.9 else []), 1]
        ref = mp.quad(lambda u: f_inv(u) * mp.e ** ((u - 1) / bb), pts) / (bb * (1 - mp.e ** (-1 / bb)))
        assert win == pytest.approx(float(ref), abs=1e-12)


def test_tilted_non_bijective_map_matches_proposition1(x64):
    # A fold with a plateau (ties): not measure preserving, so only Proposition 1 holds.
    xs, ys = [0.0, 0.3, 0.5, 0.8, 1.0], [0.0, 0.9, 0.9, 0.4, 0.6]
    f = misspec.piecewise_linear(xs, ys)
    f_np = lambda u: mp.mpf(np.interp(float(u), xs, ys))  # noqa: E731
    for b in [2e-3, 0.05, 1.0]:
        out = tilted(f, b)
        er, kl = _mp_prop1(f_np, b, kinks=(0.3, 0.5, 0.8))
        assert float(out.expected_reward) == pytest.approx(er, abs=1e-10)
        assert float(out.kl) == pytest.approx(kl, rel=1e-9)


def test_tilted_plain_callable_with_declared_kinks(x64):
    # A user's own f (not a misspec map) runs eagerly; `kinks=` gives the quadrature its jumps.
    f = lambda u: jnp.where(u <= 0.75, u, 1.75 - u)  # noqa: E731 - top 25% wrong, by hand
    got = tilted(f, [1e-3, 0.1], kinks=[0.75])
    ref = tilted(misspec.top_wrong(0.25), [1e-3, 0.1])
    np.testing.assert_allclose(np.asarray(got.win_rate), np.asarray(ref.win_rate), rtol=1e-13)


def test_tilted_limits(x64):
    maps = [m[1] for m in PAPER_MAPS]
    for f in maps:
        far = tilted(f, [1e6, jnp.inf])
        np.testing.assert_allclose(np.asarray(far.win_rate), 0.5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(far.kl), [1 / 24e12, 0.0], rtol=1e-6, atol=1e-300)
    # Correct map, beta -> 0: the tilted policy picks the best response (win rate 1 - beta).
    near = tilted(misspec.correct(), [1e-3, 1e-5])
    np.testing.assert_allclose(np.asarray(near.win_rate), [1 - 1e-3, 1 - 1e-5], rtol=1e-10)
    assert float(tilted(misspec.reversed(), 1e-5).win_rate) == pytest.approx(1e-5, rel=1e-8)
    # Top-c wrong, beta -> 0: the policy lands at gold 1 - c.
    assert float(tilted(misspec.top_wrong(0.25), 1e-5).win_rate) == pytest.approx(0.75, abs=1e-4)


def test_tilted_gradients_wrt_beta_are_finite_and_correct(x64):
    betas = jnp.array([1e-3, 0.01, 0.1, 1.0, 2.0, 10.0, 1e3])
    h = 1e-6
    for f in (misspec.correct(), misspec.top_wrong(0.25), misspec.worst_wrong(0.5)):
        # Outputs are elementwise in beta, so one VJP with unit cotangents gives d out_k / d beta_k.
        out, vjp = jax.vjp(lambda b: tilted(f, b), betas)
        ones, zeros = jnp.ones_like(betas), jnp.zeros_like(betas)
        (g_win,) = vjp(type(out)(ones, zeros, zeros))
        (g_kl,) = vjp(type(out)(zeros, zeros, ones))
        assert np.isfinite(np.asarray(g_win)).all() and np.isfinite(np.asarray(g_kl)).all()
        np.testing.assert_allclose(np.asarray(g_kl), np.asarray(jax.grad(lambda b: kl_tilted(b).sum())(betas)), rtol=1e-8)
        pm = tilted(f, jnp.array([0.1 - h, 0.1 + h, 1.0 - h, 1.0 + h])).win_rate
        fd = np.asarray(pm[1::2] - pm[::2]) / (2 * h)
        np.testing.assert_allclose(np.asarray(g_win)[[2, 3]], fd, rtol=1e-6, atol=1e-9)


def test_tilted_float32_is_accurate():
    # Default (x32) mode: float32 outputs within float32 accuracy across the whole range.
    betas = jnp.array([1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3], jnp.float32)
    out = tilted(misspec.top_wrong(0.25), betas)
    assert out.kl.dtype == jnp.float32
    with jax.enable_x64(True):
        ref = tilted(misspec.top_wrong(0.25), np.asarray(betas, np.float64))
    np.testing.assert_allclose(np.asarray(out.kl), np.asarray(ref.kl), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.win_rate), np.asarray(ref.win_rate), atol=1e-5)


def test_tilted_vmaps_over_the_map_parameter_and_compiles_once(x64):
    cs = jnp.array([0.1, 0.25, 0.5])
    betas = jnp.array([0.01, 0.1, 1.0])
    batched = jax.vmap(lambda c: tilted(misspec.top_wrong(c), betas).win_rate)(cs)
    for c, row in zip([0.1, 0.25, 0.5], np.asarray(batched)):
        np.testing.assert_allclose(row, np.asarray(tilted(misspec.top_wrong(c), betas).win_rate), rtol=1e-12)
    from rubrax.theory.tilted import _tilted_jit

    before = _tilted_jit._cache_size()
    for c in (0.2, 0.3, 0.4):
        tilted(misspec.worst_wrong(c), betas)
    assert _tilted_jit._cache_size() - before <= 1


# --- tilted_from_samples -----------------------------------------------------------------


def test_tilted_from_samples_hand_computed(x64):
    gold = np.array([0.0, 1.0, 1.0, 3.0])
    proxy = np.array([0.0, 1.0, 2.0, 0.0])
    beta = 1.0
    w = np.exp(proxy / beta) / np.exp(proxy / beta).sum()
    cdf = np.array([0.5, 2.0, 2.0, 3.5]) / 4  # mid-ranks / n, the tie at gold 1 counted half
    out = tilted_from_samples(gold, proxy, beta)
    assert float(out.win_rate) == pytest.approx(float(w @ cdf), rel=1e-14)
    assert float(out.expected_reward) == pytest.approx(float(w @ gold), rel=1e-14)
    assert float(out.kl) == pytest.approx(float(np.sum(w * np.log(w * 4))), rel=1e-12)
    base = tilted_from_samples(gold, proxy, np.inf)
    assert float(base.win_rate) == 0.5 and float(base.kl) == 0.0
    # beta -> 0 picks the proxy-best sample (gold 1, tied with another: CDF 2/4).
    assert float(tilted_from_samples(gold, proxy, 1e-4).win_rate) == pytest.approx(0.5, abs=1e-12)
    assert float(tilted_from_samples(gold, proxy, 1e-4).kl) == pytest.approx(math.log(4), abs=1e-12)


def test_tilted_from_samples_converges_to_tilted(x64):
    key = jax.random.PRNGKey(0)
    u = jax.random.uniform(key, (400_000,), jnp.float64)
    betas = jnp.array([0.02, 0.1, 0.3, 1.0, 10.0])
    for f in (misspec.top_wrong(0.25), misspec.worst_wrong(0.5)):
        est = tilted_from_samples(u, f(u), betas)
        ref = tilted(f, betas)
        np.testing.assert_allclose(np.asarray(est.win_rate), np.asarray(ref.win_rate), atol=4e-3)
        np.testing.assert_allclose(np.asarray(est.expected_reward), np.asarray(ref.expected_reward), atol=4e-3)
        np.testing.assert_allclose(np.asarray(est.kl), np.asarray(ref.kl), rtol=2e-2, atol=1e-5)


def test_tilted_from_samples_prompts_valid_mask_and_shapes(x64):
    rng = np.random.default_rng(1)
    gold = rng.random((3, 50))
    proxy = gold + 0.1 * rng.normal(size=(3, 50))
    betas = np.array([[0.05, 0.5]])  # any beta shape
    out = tilted_from_samples(gold, proxy, betas)
    assert out.win_rate.shape == (1, 2, 3)
    for p in range(3):
        one = tilted_from_samples(gold[p], proxy[p], betas)
        np.testing.assert_allclose(np.asarray(out.kl[..., p]), np.asarray(one.kl), rtol=1e-12)
    # Padding marked invalid (even if NaN) changes nothing.
    gp = np.concatenate([gold, np.full((3, 7), np.nan)], axis=1)
    pp = np.concatenate([proxy, np.full((3, 7), 5.0)], axis=1)
    valid = np.arange(57) < 50
    padded = tilted_from_samples(gp, pp, betas, valid=np.broadcast_to(valid, (3, 57)))
    for a, b in zip(padded, out):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_tilted_from_samples_jits_and_differentiates(x64):
    gold = jnp.linspace(0, 1, 101)
    proxy = misspec.top_wrong(0.3)(gold)
    f = jax.jit(lambda b: tilted_from_samples(gold, proxy, b).win_rate)
    np.testing.assert_allclose(np.asarray(f(jnp.array([0.1]))), np.asarray(tilted_from_samples(gold, proxy, [0.1]).win_rate))
    g = jax.grad(lambda b: tilted_from_samples(gold, proxy, b).win_rate)(0.1)
    assert np.isfinite(float(g))


# --- best-of-n -------------------------------------------------------------------------


def test_best_of_n_probs_hand_computed(x64):
    # Three distinct proxies, n = 2: P(pick k-th lowest) = ((k/3)^2 - ((k-1)/3)^2).
    np.testing.assert_allclose(np.asarray(best_of_n_probs([0.1, 0.5, 0.9], 2)), [1 / 9, 3 / 9, 5 / 9], rtol=1e-14)
    # A tie at the top shares its level's probability 8/9 equally.
    np.testing.assert_allclose(np.asarray(best_of_n_probs([0.1, 0.5, 0.5], 2)), [1 / 9, 4 / 9, 4 / 9], rtol=1e-14)
    q = np.asarray(best_of_n_probs(np.random.default_rng(0).integers(0, 5, (4, 30)).astype(float), [1, 3, 1000]))
    assert q.shape == (3, 4, 30)
    np.testing.assert_allclose(q.sum(-1), 1, rtol=1e-12)
    np.testing.assert_allclose(q[0], 1 / 30, rtol=1e-12)  # n = 1 is the base policy
    gold = [0.0, 1.0, 2.0]
    out = best_of_n(gold, [0.1, 0.5, 0.9], 2)
    assert float(out.win_rate) == pytest.approx((1 * 1 + 3 * 3 + 5 * 5) / 54, rel=1e-14)
    assert float(out.expected_reward) == pytest.approx(13 / 9, rel=1e-14)
    q = np.array([1, 3, 5]) / 9
    assert float(out.kl) == pytest.approx(float(np.sum(q * np.log(3 * q))), rel=1e-13)


def test_best_of_n_exact_law_agrees_with_monte_carlo(x64):
    rng = np.random.default_rng(0)
    m, n, trials = 12, 4, 200_000
    proxy = rng.integers(0, 5, m).astype(float)  # many ties
    gold = rng.random(m)
    draws = rng.integers(0, m, (trials, n))
    r = proxy[draws] + rng.random((trials, n)) * 1e-9  # uniform tie-breaking
    picked = draws[np.arange(trials), np.argmax(r, axis=1)]
    freq = np.bincount(picked, minlength=m) / trials
    q = np.asarray(best_of_n_probs(proxy, n))
    assert (np.abs(freq - q) <= 4 * np.sqrt(q * (1 - q) / trials) + 1e-4).all()
    gs = np.sort(gold)
    cdf = (np.searchsorted(gs, gold, "left") + np.searchsorted(gs, gold, "right")) / (2 * m)
    out = best_of_n(gold, proxy, n)
    assert float(out.win_rate) == pytest.approx(cdf[picked].mean(), abs=3e-3)
    assert float(out.expected_reward) == pytest.approx(gold[picked].mean(), abs=3e-3)


def test_best_of_n_kl_approaches_log_n_formula(x64):
    u = np.random.default_rng(3).random(50_000)
    n = np.array([1, 2, 4, 16, 64])
    out = best_of_n(u, u, n)
    bound = np.asarray(best_of_n_kl_bound(n))
    np.testing.assert_allclose(np.asarray(out.kl), bound, atol=2e-3)
    assert (np.asarray(out.kl) <= bound + 1e-12).all()
    np.testing.assert_allclose(np.asarray(out.win_rate), n / (n + 1), atol=2e-3)  # calibrated: n/(n+1)
    # With ties (5 proxy levels) the KL stays below the formula and below log(1 / P(top level)).
    coarse = np.round(u * 4)
    kl_ties = np.asarray(best_of_n(u, coarse, n[1:]).kl)
    assert (kl_ties < bound[1:] - 1e-3).all()
    assert kl_ties[-1] <= -np.log(np.mean(coarse == 4)) + 1e-12


def test_best_of_n_unbiased_equals_brute_force_over_subsets(x64):
    rng = np.random.default_rng(2)
    m = 9
    gold = rng.random(m)
    proxy = rng.integers(0, 4, m).astype(float)
    for n in (1, 3, 5, 9):
        ref = []
        for subset in itertools.combinations(range(m), n):
            best = max(proxy[i] for i in subset)
            ref.append(np.mean([gold[i] for i in subset if proxy[i] == best]))
        assert float(best_of_n_unbiased(gold, proxy, n)) == pytest.approx(np.mean(ref), rel=1e-12)


def test_best_of_n_unbiased_is_unbiased_monte_carlo(x64):
    # gold = proxy ~ U(0,1): the true best-of-n expected gold is n / (n + 1).
    key = jax.random.PRNGKey(0)
    reps, m = 4000, 32
    u = jax.random.uniform(key, (reps, m), jnp.float64)
    est = np.asarray(best_of_n_unbiased(u, u, [4, 16]))  # [2, reps]
    assert (np.abs(est.mean(-1) - [4 / 5, 16 / 17]) < 4 * est.std(-1) / np.sqrt(reps)).all()


def test_best_of_n_uniform_theory(x64):
    n = np.array([1.0, 2.0, 8.0, 100.0, 5000.0])
    for _, f, f_np, _ in PAPER_MAPS:
        out = best_of_n_uniform(f, n)
        np.testing.assert_allclose(np.asarray(out.kl), np.asarray(best_of_n_kl_bound(n)), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.asarray(best_of_n_uniform(misspec.correct(), n).win_rate), n / (n + 1), rtol=1e-12)
    # Monte Carlo: top-25%-wrong proxy, best of 8.
    rng = np.random.default_rng(0)
    u = rng.random((200_000, 8))
    proxy = np.where(u <= 0.75, u, 1.75 - u)
    mc = u[np.arange(len(u)), proxy.argmax(1)].mean()
    assert float(best_of_n_uniform(misspec.top_wrong(0.25), 8.0).win_rate) == pytest.approx(mc, abs=2e-3)


# --- Gao et al. fits ---------------------------------------------------------------------


@pytest.mark.parametrize("form,law", [("bon", gao_bon), ("rl", gao_rl)])
def test_fit_gao_recovers_parameters(x64, form, law):
    kl = np.linspace(0.0, 10.0, 40)
    gold = np.stack([law(kl, 1.2, 0.3, 0.1), law(kl, 0.8, 0.15, -0.2)])
    fit = fit_gao(kl, gold, form=form)
    np.testing.assert_allclose(np.asarray(fit.alpha), [1.2, 0.8], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.beta), [0.3, 0.15], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.offset), [0.1, -0.2], atol=1e-10)
    noisy = gold[0] + 0.01 * np.random.default_rng(0).normal(size=kl.shape)
    fit = fit_gao(kl, noisy, form=form)
    assert float(fit.alpha) == pytest.approx(1.2, abs=0.05) and float(fit.beta) == pytest.approx(0.3, abs=0.03)
    assert float(fit.rmse) == pytest.approx(0.01, rel=0.4)
    np.testing.assert_allclose(np.asarray(fit.predict(kl)), noisy, atol=0.05)


def test_fit_gao_peak(x64):
    fit = fit_gao(np.linspace(0, 9, 20), gao_bon(np.linspace(0, 9, 20), 1.0, 0.25), form="bon", offset=False)
    assert float(fit.peak_kl) == pytest.approx(4.0, rel=1e-9)  # d* = alpha / (2 beta) = 2


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: kl_tilted(0.0),
    lambda: kl_tilted([1.0, -2.0]),
    lambda: kl_tilted(np.nan),
    lambda: tilted(misspec.correct(), 0.0),
    lambda: tilted(misspec.correct(), [0.1, -1.0]),
    lambda: beta_for_kl(-0.1),
    lambda: beta_for_kl(np.nan),
    lambda: misspec.top_wrong(0.0),
    lambda: misspec.top_wrong(1.0),
    lambda: misspec.worst_wrong(1.5),
    lambda: misspec.worst_wrong(np.nan),
    lambda: misspec.shuffled_band(0.5, 0.4),
    lambda: misspec.piecewise_linear([0.0, 0.5], [0.0, 1.0]),
    lambda: tilted_from_samples(np.zeros(5), np.zeros(4), 1.0),
    lambda: tilted_from_samples(np.array([0.1, np.nan]), np.zeros(2), 1.0),
    lambda: tilted_from_samples(np.zeros(2), np.array([0.1, np.inf]), 1.0),
    lambda: tilted_from_samples(np.zeros(2), np.zeros(2), 0.0),
    lambda: tilted_from_samples(np.zeros((2, 3)), np.zeros((2, 3)), 1.0, valid=np.array([[1, 1, 1], [0, 0, 0]], bool)),
    lambda: best_of_n(np.zeros(3), np.zeros(3), 0),
    lambda: best_of_n(np.zeros(3), np.zeros(3), [2, 0.5]),
    lambda: best_of_n(np.zeros(3), np.zeros(2), 2),
    lambda: best_of_n(np.zeros(3), np.array([0.0, np.nan, 1.0]), 2),
    lambda: best_of_n_probs(np.zeros(3), np.nan),
    lambda: best_of_n_kl_bound(0.0),
    lambda: best_of_n_unbiased(np.zeros(3), np.zeros(3), 4),
    lambda: best_of_n_unbiased(np.zeros(3), np.zeros(3), 1.5),
    lambda: best_of_n_uniform(misspec.correct(), 0.5),
    lambda: fit_gao(np.arange(3.0), np.arange(4.0)),
    lambda: fit_gao(np.array([0.0, -1.0, 2.0]), np.arange(3.0)),
    lambda: fit_gao(np.arange(2.0), np.arange(2.0)),
])
def test_bad_input_raises_clear_value_error(call):
    with pytest.raises(ValueError, match=r"rubrax\.theory\.\w+"):
        call()


def test_nan_from_a_user_map_is_an_error_not_a_silent_nan():
    with pytest.raises(ValueError, match="NaN"):
        tilted(lambda u: jnp.where(u > 0.5, jnp.nan, u), 0.1)


# --- Figure 2 and CLI ----------------------------------------------------------------------


def test_figure2_files_and_shape_of_the_curves(tmp_path):
    from rubrax.cli import main

    assert main(["theory", "figure2", "--out", str(tmp_path)]) == 0
    out = tmp_path / "figure2"
    names = {p.name for p in out.iterdir()}
    for stem in ("figure2a", "figure2b", "figure2_bon_vs_tilted"):
        assert {f"{stem}.csv", f"{stem}.png"} <= names
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "figure2a.csv")))
    curve = lambda label: np.array([float(r["win_rate"]) for r in rows if r["curve"] == label])  # noqa: E731
    kl = np.array([float(r["kl"]) for r in rows if r["curve"] == "correct"])
    assert kl[0] == 0 and kl[-1] == 8
    correct, top25, worst50 = curve("correct"), curve("top 25% wrong"), curve("worst 50% wrong")
    assert correct[0] == pytest.approx(0.5) and (np.diff(correct) > 0).all()
    # Finding I: top-region errors make the win rate rise, peak, then fall.
    peak = int(np.argmax(top25))
    assert 0 < peak < len(top25) - 1 and top25[peak] - top25[-1] > 0.05
    assert 1.0 < kl[peak] < 2.0
    # Bottom-region errors barely matter.
    assert np.max(np.abs(worst50 - correct)) < 0.03
    assert (curve("reversed")[1:] < 0.5).all()
    # Figure 2b (finding II): ranking the top 30% correctly is near-optimal at moderate KL.
    rows_b = list(csv.DictReader(open(out / "figure2b.csv")))
    at = {r["curve"]: float(r["win_rate"]) for r in rows_b if float(r["kl"]) == 2.0}
    assert at["top 100% correct"] - at["top 30% correct"] < 0.02 < at["top 100% correct"] - at["top 10% correct"]
    rows_n = [r for r in csv.DictReader(open(out / "figure2_bon_vs_tilted.csv")) if r["method"] == "best_of_n"]
    n = np.array([int(r["n"]) for r in rows_n if r["curve"] == "correct"])
    bon = np.array([float(r["win_rate"]) for r in rows_n if r["curve"] == "correct"])
    np.testing.assert_allclose(bon, n / (n + 1), rtol=1e-10)


def test_cli_predict_from_scored_samples(tmp_path, capsys):
    import json

    from rubrax.cli import main

    rng = np.random.default_rng(0)
    path = tmp_path / "scores.jsonl"
    with open(path, "w") as fh:
        for p in range(6):
            for j in range(40):
                g = float(rng.random())
                rec = {"prompt_id": f"p{p}", "gold": g, "proxy": g if g < 0.8 else 1.8 - g}
                if p == 1 and j == 0:
                    rec["proxy"] = None  # a failed judge call
                fh.write(json.dumps(rec) + "\n")
    out_csv = tmp_path / "curve.csv"
    assert main(["theory", "predict", str(path), "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    tilt = [r for r in rows if r["method"] == "tilted"]
    win = np.array([float(r["win_rate"]) for r in tilt])
    assert 0 < int(np.argmax(win)) < len(win) - 1  # over-optimisation predicted: rise then fall
    assert "1 failed scores dropped" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "gold": 0.5, "proxy": 0.1}\n{"prompt_id": "a", "gold": "high", "proxy": 1}\n')
    assert main(["theory", "predict", str(bad)]) == 2
    assert f"{bad}:2: field 'gold'" in capsys.readouterr().err


def test_mid_cdf_counts_ties_half_at_values_and_at_the_samples():
    from rubrax.theory import mid_cdf

    base = jnp.array([[0.1, 0.2, 0.2, 0.5], [3.0, 1.0, 2.0, 9.0]])
    valid = jnp.array([[True, True, True, True], [True, True, True, False]])  # row 1: n = 3, 9.0 left out
    at = mid_cdf(base, jnp.array([[0.2, 0.0, 0.6, 0.15], [2.0, 9.0, 0.0, 3.0]]), valid)
    np.testing.assert_allclose(at, [[(1 + 3) / 8, 0.0, 1.0, 2 / 8], [3 / 6, 1.0, 0.0, 5 / 6]], rtol=1e-6)
    own = mid_cdf(base, valid_PxN=valid)  # at the samples themselves (the tie-rank path)
    np.testing.assert_allclose(own[0], [1 / 8, 4 / 8, 4 / 8, 7 / 8], rtol=1e-6)
    np.testing.assert_allclose(own[1, :3], [5 / 6, 1 / 6, 3 / 6], rtol=1e-6)
    np.testing.assert_allclose(mid_cdf(base, base, valid)[:, :3], own[:, :3], rtol=1e-6)  # both paths agree
    # one row as 1-D arrays, the form the testbed uses for a prompt's base samples
    np.testing.assert_allclose(mid_cdf(jnp.array([0.0, 0.2, 0.2, 0.4]), jnp.array([0.2, 0.0, 0.6, 0.3])), [4 / 8, 1 / 8, 1.0, 6 / 8])

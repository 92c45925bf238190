"""Advantages, PPO loss pieces, KL estimators and aggregation: hand-computed cases,
a per-sample reference implementation, and known distributions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.rl import advantages as A
from rubrax.rl import losses as L


# --------------------------------------------------------------------------- advantages


def test_grpo_hand_computed():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    v = jnp.ones(8, bool)
    # group 1: mean .5, population std .5 -> +-1; group 2 ties -> exactly 0.
    np.testing.assert_allclose(A.grpo(r, v, group_size=4), [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-6)


def test_rloo_and_dr_grpo_hand_computed():
    r = jnp.array([3.0, 1.0, 2.0])
    v = jnp.ones(3, bool)
    # RLOO: 3 - (1+2)/2 = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0.
    np.testing.assert_allclose(A.rloo(r, v, group_size=3), [1.5, -1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(A.dr_grpo(r, v, group_size=3), [1.0, -1.0, 0.0], atol=1e-6)


def test_zero_variance_groups_give_exact_zero_no_nan():
    # 0.1 is not exactly representable: r - mean is ~1e-9, which a naive /(std+eps) blows up.
    r = jnp.full((8,), 0.1)
    v = jnp.ones(8, bool)
    for name in A.ADVANTAGES:
        adv = A.compute_advantages(name, r, v, group_size=4)
        assert np.all(np.asarray(adv) == 0.0), name
    assert float(A.zero_variance_fraction(r, v, group_size=4)) == 1.0


def test_invalid_samples_excluded_from_group_stats():
    r = jnp.array([1.0, 0.0, 123.0, 0.0])  # 123 is invalid: must not move the mean
    v = jnp.array([True, True, False, True])
    adv = np.asarray(A.grpo(r, v, group_size=4))
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    np.testing.assert_allclose(adv, [(1 - mean) / std, -mean / std, 0.0, -mean / std], rtol=1e-5)
    # one valid sample in a group -> no baseline -> 0
    adv1 = A.rloo(jnp.array([1.0, 2.0]), jnp.array([True, False]), group_size=2)
    np.testing.assert_array_equal(adv1, [0.0, 0.0])


def _reference_advantages(name, r, v, g):
    out = np.zeros(len(r))
    for start in range(0, len(r), g):
        idx = [i for i in range(start, start + g) if v[i]]
        vals = np.array([r[i] for i in idx], np.float64)
        if len(idx) < 2 or vals.std() <= 1e-6:
            continue
        for i in idx:
            if name == "grpo":
                out[i] = (r[i] - vals.mean()) / vals.std()
            elif name == "rloo":
                out[i] = r[i] - (vals.sum() - r[i]) / (len(idx) - 1)
            else:
                out[i] = r[i] - vals.mean()
    return out


@pytest.mark.parametrize("name", sorted(A.ADVANTAGES))
def test_advantages_match_per_sample_reference(name):
    rng = np.random.default_rng(0)
    g = 5
    r = rng.normal(size=40).astype(np.float32)
    r[10:15] = 2.0  # a tied group
    v = rng.random(40) > 0.2
    got = A.compute_advantages(name, jnp.asarray(r), jnp.asarray(v), group_size=g)
    np.testing.assert_allclose(got, _reference_advantages(name, r, v, g), rtol=1e-4, atol=1e-5)


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="grpo"):
        A.get_advantage_fn("ppo")


# --------------------------------------------------------------------------- PPO objective


def test_ppo_clip_hand_computed():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 0.7]]))
    old = jnp.zeros((1, 4))
    # A > 0: ratio 1.5 -> clipped to 1.2 (min picks 1.2); ratio .5 -> min(.5, .8) = .5 (not clipped).
    loss, ratio, clipped = L.ppo_clipped_objective(logp, old, jnp.array([2.0]), clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(loss, [[-2.4, -1.0, -2.2, -1.4]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[True, False, False, False]])
    # A < 0: ratio .5 -> clipped to .8; asymmetric clip_high=0.6 leaves 1.5 alone either way.
    loss, _, clipped = L.ppo_clipped_objective(logp, old, jnp.array([-1.0]), clip_low=0.2, clip_high=0.6)
    np.testing.assert_allclose(loss, [[1.5, 0.8, 1.1, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[False, True, False, True]])


def test_clip_higher_changes_only_the_upper_bound():
    logp = jnp.log(jnp.array([[1.25, 1.4]]))
    loss, _, clipped = L.ppo_clipped_objective(logp, jnp.zeros((1, 2)), jnp.array([1.0]), clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss, [[-1.25, -1.28]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[False, True]])


def test_ppo_gradient_is_zero_where_clipped():
    old = jnp.zeros((1, 2))
    f = lambda lp: L.ppo_clipped_objective(lp, old, jnp.array([1.0]), clip_low=0.2, clip_high=0.2)[0].sum()
    g = jax.grad(f)(jnp.log(jnp.array([[1.5, 1.0]])))
    np.testing.assert_allclose(g, [[0.0, -1.0]], atol=1e-6)  # d(-rho)/d logp = -rho = -1 at rho=1


# --------------------------------------------------------------------------- aggregation


def test_aggregation_modes_hand_computed():
    x = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(L.aggregate(x, m, "token")) == pytest.approx(10 / 4)
    assert float(L.aggregate(x, m, "sequence")) == pytest.approx((2 + 4) / 2)
    assert float(L.aggregate(x, m, "dr_grpo")) == pytest.approx(10 / (2 * 4))
    assert float(L.aggregate(x, m, "dr_grpo", max_len=10)) == pytest.approx(10 / 20)


def test_aggregation_of_micro_batches_sums_to_the_minibatch():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 6)))
    m = jnp.asarray(rng.random((8, 6)) > 0.4)
    for mode in L.AGGREGATIONS:
        whole = L.aggregate(x, m, mode)
        norms = {"num_tokens": m.sum(), "num_sequences": (m.sum(1) > 0).sum(), "max_len": 6}
        parts = sum(L.aggregate(x[i : i + 2], m[i : i + 2], mode, **norms) for i in range(0, 8, 2))
        np.testing.assert_allclose(parts, whole, rtol=1e-5, err_msg=mode)


# --------------------------------------------------------------------------- logprobs / entropy


def test_token_logprobs_and_entropy_alignment():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    tokens = jnp.array([[0, 1, 1]])
    np.testing.assert_allclose(L.token_logprobs(logits, tokens), [[0.0, math.log(0.5), math.log(0.1)]], rtol=1e-6)
    h = lambda p: -sum(q * math.log(q) for q in p)
    np.testing.assert_allclose(L.token_entropy(logits), [[0.0, h([0.5, 0.5]), h([0.9, 0.1])]], rtol=1e-5)


# --------------------------------------------------------------------------- KL estimators


def test_k1_k3_are_exactly_unbiased_on_categoricals():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(p * np.log(p / q)))
    logp, logq = jnp.log(p)[None], jnp.log(q)[None]
    for est in ("k1", "k3"):
        expectation = float(jnp.sum(p * L.kl_estimate(logp, logq, est)))
        assert expectation == pytest.approx(kl, rel=1e-6), est
    assert np.all(np.asarray(L.kl_estimate(logp, logq, "k3")) >= 0)
    # k1 alone can be negative for a sample that pi_ref likes more
    assert np.any(np.asarray(L.kl_estimate(logp, logq, "k1")) < 0)


def _gaussian_estimates(mu, s, n=200_000):
    x = jax.random.normal(jax.random.PRNGKey(0), (n,))
    logp = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    logq = -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    return {est: L.kl_estimate(logp, logq, est) for est in L.KL_ESTIMATORS}


@pytest.mark.parametrize("mu,s", [(0.3, 1.2), (0.1, 1.0), (1.0, 1.0)])
def test_kl_estimators_on_gaussians_monte_carlo(mu, s):
    # p = N(0, 1), q = N(mu, s^2): KL(p||q) = log s + (1 + mu^2) / (2 s^2) - 1/2
    kl = math.log(s) + (1 + mu**2) / (2 * s**2) - 0.5
    k = _gaussian_estimates(mu, s)
    for est in ("k1", "k3"):
        se = float(k[est].std()) / math.sqrt(k[est].size)
        assert abs(float(k[est].mean()) - kl) < 4 * se, est
    # equal variances: log_r = mu x - mu^2/2, so E[k2] = (mu^2 + mu^4/4)/2 = KL + mu^4/8 (biased)
    if s == 1.0:
        assert float(k["k2"].mean()) == pytest.approx(kl + mu**4 / 8, rel=0.02)


def test_k3_has_lower_variance_when_policies_are_close():
    # Schulman's example: N(0,1) vs N(0.1,1), KL = 0.005; k1's std is ~20x KL, k3's ~1.4x.
    k = _gaussian_estimates(0.1, 1.0)
    assert float(k["k3"].std()) < 0.1 * float(k["k1"].std())


def test_kl_zero_when_equal_and_unknown_estimator_rejected():
    lp = jnp.log(jnp.array([[0.2, 0.7]]))
    for est in L.KL_ESTIMATORS:
        np.testing.assert_array_equal(L.kl_estimate(lp, lp, est), 0.0)
    with pytest.raises(ValueError, match="k3"):
        L.kl_estimate(lp, lp, "k4")

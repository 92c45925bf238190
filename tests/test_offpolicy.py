"""Off-policy corrections: importance weights by hand (token TIS, sequence MIS), through
the update (on-policy equivalence, a stale sampler corrected) and through train()."""

import dataclasses

import numpy as np
import pytest

from rubrax.rl import losses

L = np.log
# Row 0: ratios 2, 5, 0.5 on its three completion tokens; row 1: 1.5, 1.5 (its last
# column is padding, whose huge log ratio must be ignored).
MASK = np.array([[0, 1, 1, 1], [0, 1, 1, 0]], np.float32)
BEHAVIOUR = np.array([[0.0, -2.0, -3.0, -1.0], [0.0, -1.0, -2.0, -30.0]], np.float32)
LOG_RATIO = np.array([[0.0, L(2), L(5), L(0.5)], [0.0, L(1.5), L(1.5), 10.0]], np.float32)
OLD = BEHAVIOUR + LOG_RATIO


def weights(mode, cap=3.0):
    w, stats = losses.importance_weights(OLD, BEHAVIOUR, MASK, mode=mode, cap=cap)
    return np.asarray(w), {k: float(v) for k, v in stats.items()}


def test_token_tis_truncates_each_ratio_at_the_cap():
    w, stats = weights("token_tis")
    np.testing.assert_allclose(w, [[0, 2, 3, 0.5], [0, 1.5, 1.5, 0]], rtol=1e-6)
    assert stats["truncated"] == 1  # only the ratio 5
    assert stats["log_ratio_abs"] == pytest.approx(L(2) + L(5) + L(2) + 2 * L(1.5), rel=1e-6)
    assert stats["log_ratio_abs_max"] == pytest.approx(L(5), rel=1e-6)
    assert stats["rows"] == 2


def test_sequence_mis_drops_rows_whose_product_exceeds_the_cap():
    w, stats = weights("sequence_mis")
    # Row 0: 2 * 5 * 0.5 = 5 > 3, dropped; row 1: 1.5 * 1.5 = 2.25 kept, on every token.
    np.testing.assert_allclose(w, [[0, 0, 0, 0], [0, 2.25, 2.25, 0]], rtol=1e-6)
    assert stats["truncated"] == 1
    w, stats = weights("sequence_mis", cap=6.0)
    np.testing.assert_allclose(w, [[0, 5, 5, 5], [0, 2.25, 2.25, 0]], rtol=1e-5)
    assert stats["truncated"] == 0


def test_no_correction_is_the_mask_and_huge_mismatch_never_overflows():
    w, stats = weights("none")
    np.testing.assert_array_equal(w, MASK)
    assert stats["truncated"] == 0
    old = BEHAVIOUR + np.where(MASK > 0, 200.0, 0.0).astype(np.float32)  # exp(200 * 3) = inf
    for mode in ("token_tis", "sequence_mis"):
        w, _ = losses.importance_weights(old, BEHAVIOUR, MASK, mode=mode, cap=2.0)
        assert np.isfinite(np.asarray(w)).all()
    with pytest.raises(ValueError, match="importance correction"):
        losses.importance_weights(OLD, BEHAVIOUR, MASK, mode="tis", cap=2.0)


# --------------------------------------------------------------------------- through the update

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from rubrax.rl.state import TrainState  # noqa: E402
from rubrax.rl.step import RLConfig, RolloutBatch, update  # noqa: E402

V, C, G = 4, 3, 8  # vocabulary, completion tokens, group size; the prompt is token 0


def bigram_logits(params, tokens_BxT, mask_BxT):
    return params["w"][tokens_BxT]


def bigram_logp(w, tokens_BxT):
    """log pi(tokens[:, t] | tokens[:, t-1]) at completion positions, 0 at the prompt."""
    z = w[tokens_BxT[:, :-1]]
    logp = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return np.asarray(jnp.pad(picked, ((0, 0), (1, 0))))


def sample_rollouts(w, rows, seed):
    """Completions drawn from the bigram policy w; reward: the share of token 1."""
    rng = np.random.default_rng(seed)
    p = np.asarray(jax.nn.softmax(w, axis=-1), np.float64)
    tokens = np.zeros((rows, 1 + C), np.int32)
    for t in range(1, 1 + C):
        u = rng.random(rows)[:, None]
        tokens[:, t] = (np.cumsum(p[tokens[:, t - 1]], axis=-1) < u).sum(-1).clip(0, V - 1)
    mask = np.ones_like(tokens)
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    rewards = (tokens[:, 1:] == 1).mean(-1).astype(np.float32)
    return RolloutBatch(tokens, mask, loss_mask, bigram_logp(w, tokens).astype(np.float32), rewards, np.ones(rows, bool), prompt_width=1)


def gradient(w, batch, **cfg_kwargs):
    """The update's gradient at w: one SGD step of learning rate 1 moves w by -g."""
    cfg = RLConfig(group_size=G, **cfg_kwargs)
    state = TrainState.create({"w": jnp.asarray(w)}, optax.sgd(1.0), seed=0)
    step = jax.jit(lambda st, b: update(st, b, None, cfg=cfg, logits_fn=bigram_logits, tx=optax.sgd(1.0)))
    new, metrics = step(state, batch)
    return np.asarray(w) - np.asarray(new.params["w"]), {k: float(v) for k, v in metrics.items()}


W = jax.random.normal(jax.random.PRNGKey(0), (V, V)) * 0.7
STALE = W + jax.random.normal(jax.random.PRNGKey(1), (V, V)) * 0.6  # the sampler's older params


@pytest.mark.parametrize("mode", ["token_tis", "sequence_mis"])
def test_on_policy_batch_the_correction_changes_nothing(mode):
    """behaviour == current logprobs: every weight is 1 (cap >= 1), so the corrected update
    equals the uncorrected one, and the mismatch metrics read 0."""
    batch = sample_rollouts(W, 64, seed=0)
    g_none, _ = gradient(W, batch)
    g_is, m = gradient(W, batch, importance_correction=mode, importance_cap=2.0)
    np.testing.assert_allclose(g_is, g_none, rtol=1e-5, atol=1e-7)
    assert m["is_log_ratio_abs_max"] < 1e-5 and m["is_truncated_frac"] == 0.0


@pytest.mark.parametrize("mode", ["token_tis", "sequence_mis"])
def test_a_stale_sampler_is_corrected_toward_the_on_policy_gradient(mode):
    """Rollouts from stale params, trained at the current ones: the importance-weighted
    gradient is closer to the on-policy gradient (estimated from 8x more on-policy samples)
    than the uncorrected one."""
    on, _ = gradient(W, sample_rollouts(W, 8 * 4096, seed=1))
    stale = sample_rollouts(STALE, 4096, seed=2)
    uncorrected, _ = gradient(W, stale)
    corrected, m = gradient(W, stale, importance_correction=mode, importance_cap=10.0)
    err = lambda g: float(np.linalg.norm(g - on))
    assert err(corrected) < 0.6 * err(uncorrected), (err(corrected), err(uncorrected))
    assert m["is_log_ratio_abs_mean"] > 0.1  # the mismatch is visible in the metrics


def test_truncation_is_counted_and_config_is_validated():
    stale = sample_rollouts(STALE, 256, seed=3)
    _, m = gradient(W, stale, importance_correction="token_tis", importance_cap=1.0)
    assert 0.2 < m["is_truncated_frac"] < 0.8  # cap 1: every token whose ratio exceeds 1
    with pytest.raises(ValueError, match="importance_correction"):
        RLConfig(group_size=G, importance_correction="tis")
    with pytest.raises(ValueError, match="importance_cap"):
        RLConfig(group_size=G, importance_correction="token_tis", importance_cap=0.5)
    with pytest.raises(ValueError, match="behaviour_logprobs='sampler'"):
        RLConfig(group_size=G, importance_correction="token_tis", behaviour_logprobs="recompute")
    RLConfig(group_size=G, importance_correction="token_tis", temperature=0.7)  # mu = the tempered sampler's logprobs


def test_train_feeds_the_sampled_distributions_logprobs_under_a_correction(tmp_path):
    """train() with top-k / tempered sampling, one step off policy and token TIS: the update
    sees the sampler's own log q (mismatch metrics logged), and pending rollouts saved for a
    resume keep it."""
    from test_rl_loop import CONFIG, TOK

    from rubrax.models import init_params
    from rubrax.policy import SampleConfig
    from rubrax.rl.loop import LoopConfig, train
    from rubrax.rl.rollouts import Rollouts
    from rubrax.rl.toy import TargetWordReward, toy_prompts
    from rubrax.sharding import make_mesh
    from rubrax.train.optim import OptimConfig

    res = train(params=init_params(CONFIG, jax.random.PRNGKey(0)), model_config=CONFIG, tokenizer=TOK,
                reward_fn=TargetWordReward(target="yes"), prompts=toy_prompts(16),
                rl=RLConfig(group_size=4, importance_correction="token_tis", temperature=0.8),
                sample=SampleConfig(max_new_tokens=4, n=4, temperature=0.8, top_k=5, prompt_bucket=8),
                optim=OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0),
                loop=LoopConfig(total_steps=3, prompts_per_step=2, max_prompt_tokens=8, overlap="one_step_off_policy",
                                out_dir=str(tmp_path), checkpoint_every=1, progress=False, tensorboard=False),
                mesh=make_mesh(jax.devices()[:1]))
    steps = [h for h in res.history if "is_log_ratio_abs_mean" in h]
    assert len(steps) == 3
    # Step 0 is on policy: pi_old / q differs from 1 only by the top-k renormalisation
    # (q > pi_old on kept tokens), a real mismatch the metrics see.
    assert all(0 < h["is_log_ratio_abs_mean"] < 5 and np.isfinite(h["is_log_ratio_abs_max"]) for h in steps)
    pending = Rollouts.from_npz(str(tmp_path / "pending" / "1.npz"))
    assert pending.sampling_logprobs is not None and pending.sampling_logprobs.shape == pending.logprobs.shape
    real = pending.mask > 0
    assert not np.allclose(pending.sampling_logprobs[real], pending.logprobs[real], atol=1e-3)  # q is not the model's p
    assert pending.behaviour_logprobs("token_tis") is pending.sampling_logprobs and pending.behaviour_logprobs("none") is pending.logprobs
    with pytest.raises(ValueError, match="sampling_logprobs"):
        dataclasses.replace(pending, sampling_logprobs=None).behaviour_logprobs("token_tis")

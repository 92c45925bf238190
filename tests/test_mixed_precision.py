"""Mixed precision in the RL update: the sampler-vs-update logprob mismatch metrics, the
reference kept in the compute dtype, and bf16 compute over float32 master weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rubrax import policy
from rubrax.models import ModelConfig, init_params
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.state import TrainState
from rubrax.rl.step import RLConfig, Trainer, model_logits_fn, update
from rubrax.sharding import make_mesh

W, C, G, P = 4, 6, 2, 2
B, T = G * P, W + C


def _batch(params, config, shift=None) -> RolloutBatch:
    """Rollouts whose behaviour logprobs are the model's own (on policy), optionally with
    one completion token's logprob shifted by `shift`."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.int32)
    loss_mask[:, W:] = 1
    logp = np.asarray(policy.logprobs(params, jnp.asarray(tokens), jnp.asarray(mask), config=config)) * loss_mask
    if shift is not None:
        logp[1, W + 2] += shift
    return RolloutBatch(tokens, mask, loss_mask, logp.astype(np.float32), rng.random(B).astype(np.float32),
                        np.ones(B, bool), prompt_width=W)


def _metrics(config, batch, params, **rl):
    cfg = RLConfig(group_size=G, **rl)
    state = TrainState.create(params, optax.sgd(0.0), seed=0)
    batch = jax.tree.map(jnp.asarray, batch)
    _, m = update(state, batch, params, cfg=cfg, logits_fn=model_logits_fn(config), tx=optax.sgd(0.0))
    return jax.device_get(m)


def test_mismatch_metrics_by_hand():
    config = ModelConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    m = _metrics(config, _batch(params, config), params)
    assert m["sampler_logp_diff_max"] < 1e-5  # float32, on policy
    m = _metrics(config, _batch(params, config, shift=0.25), params)
    np.testing.assert_allclose(m["sampler_logp_diff_max"], 0.25, atol=1e-5)
    np.testing.assert_allclose(m["sampler_logp_diff_mean"], 0.25 / (B * C), atol=1e-6)
    # "recompute": measured against the batch's sampler logprobs, over the whole batch
    m = _metrics(config, _batch(params, config, shift=0.25), params, behaviour_logprobs="recompute")
    np.testing.assert_allclose(m["sampler_logp_diff_max"], 0.25, atol=1e-5)


def test_bf16_compute_fp32_master_weights():
    """bf16 compute: float32 params, gradients and Adam state; float32 metrics; the frozen
    reference stored in bf16 gives exactly the logprobs of the float32 params; the
    mismatch against float32 sampler logprobs is non-zero but bf16-sized."""
    f32 = ModelConfig.tiny()
    bf16 = f32.replace(dtype="bfloat16")
    params = init_params(f32, jax.random.PRNGKey(0))
    batch = _batch(params, f32)
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx, seed=0)
    trainer = Trainer(RLConfig(group_size=G, kl_coef=0.1), model_logits_fn(bf16), tx, state, params,
                      mesh=make_mesh(jax.devices()[:1]))
    ref = trainer.place_ref(params)
    assert {x.dtype for x in jax.tree.leaves(ref)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask = jnp.asarray(batch.tokens_BxT), jnp.asarray(batch.mask_BxT)
    np.testing.assert_array_equal(policy.logprobs(ref, tokens, mask, config=bf16),
                                  policy.logprobs(params, tokens, mask, config=bf16))
    new_state, m = trainer(trainer.place_state(state), batch, ref)
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert all(np.asarray(v).dtype in (np.float32, np.int32) for v in m.values())
    assert 1e-4 < float(m["sampler_logp_diff_mean"]) < 0.1
    assert np.isfinite(float(m["loss"]))

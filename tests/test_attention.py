"""Attention implementations and rematerialisation policies compute the same function.

The reference is the einsum path (materialised scores, the implementation rubrax has
used since its transformers parity tests were written); every other implementation and
every remat policy must give the same values and gradients within float tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.models import ModelConfig, attention, hidden_states, init_params, llama


def _qkv(B=2, T=37, S=37, K=2, G=3, Dh=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (B, T, K, G, Dh))
    k = jax.random.normal(keys[1], (B, S, K, Dh))
    v = jax.random.normal(keys[2], (B, S, K, Dh))
    return q, k, v


def _masked_loss(impl, q_offset, kv_mask, block, w):
    def loss(q, k, v):
        out = attention.attend(q, k, v, impl=impl, q_offset=q_offset, kv_mask_BxS=kv_mask, block=block)
        return jnp.sum(out * w)
    return loss


@pytest.mark.parametrize("T,S,q_offset,block", [(37, 37, 0, 8), (37, 37, 0, 64), (5, 40, 35, 16), (12, 40, 3, 5)])
def test_blockwise_equals_einsum_values_and_grads(T, S, q_offset, block):
    q, k, v = _qkv(T=T, S=S)
    # left padding, a hole, and real keys: every query row keeps at least slot 6
    kv_mask = np.ones((2, S), np.int32)
    kv_mask[0, :4] = 0
    kv_mask[1, 10:13] = 0
    kv_mask = jnp.asarray(kv_mask)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    rows = np.asarray(q_offset + np.arange(T) >= 6)  # queries that see at least one real key
    ref_out = attention.attend(q, k, v, impl="einsum", q_offset=q_offset, kv_mask_BxS=kv_mask)
    out = attention.attend(q, k, v, impl="blockwise", q_offset=q_offset, kv_mask_BxS=kv_mask, block=block)
    np.testing.assert_allclose(out[:, rows], ref_out[:, rows], atol=2e-5, rtol=1e-5)
    w = w * jnp.asarray(rows)[None, :, None, None, None]
    g_ref = jax.grad(_masked_loss("einsum", q_offset, kv_mask, block, w), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(_masked_loss("blockwise", q_offset, kv_mask, block, w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_blockwise_unmasked_and_xla_equal_einsum():
    q, k, v = _qkv(T=33, S=33)
    ref = attention.attend(q, k, v, impl="einsum")
    for impl in ("blockwise", "xla"):
        np.testing.assert_allclose(attention.attend(q, k, v, impl=impl, block=8), ref, atol=2e-5, rtol=1e-5)


def test_blockwise_holds_no_quadratic_buffer():
    """Compiled temporaries of the blockwise kernel grow ~linearly in T, the einsum's
    quadratically (a 4x longer sequence: < 6x vs > 8x)."""
    def temp(impl, T):
        spec = jax.ShapeDtypeStruct
        q = spec((1, T, 2, 2, 16), jnp.float32)
        kv = spec((1, T, 2, 16), jnp.float32)
        f = jax.jit(jax.grad(lambda q, k, v: attention.attend(q, k, v, impl=impl, block=128).sum(),
                             argnums=(0, 1, 2)))
        return f.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    assert temp("blockwise", 2048) < 6 * temp("blockwise", 512)
    assert temp("einsum", 2048) > 8 * temp("einsum", 512)


def test_resolve_impl_defaults():
    r = lambda platform, **kw: attention.resolve_impl("auto", platform=platform, **{
        "T": 2048, "S": 2048, "dtype": jnp.bfloat16, "head_dim": 128, "masked": False, **kw})
    assert r("gpu") == "cudnn"
    assert r("gpu", dtype=jnp.float32) == "blockwise"
    assert r("tpu") == "tpu_flash"
    assert r("cpu") == "blockwise"
    assert r("cpu", T=256, S=256) == "einsum"
    assert r("gpu", T=1, S=4096, masked=True) == "einsum"  # decoding
    assert attention.resolve_impl("xla", T=1, S=1, dtype=jnp.float32, head_dim=8, masked=False) == "xla"


def _batch(B=3, T=40, V=256):
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, T), 3, V)
    mask = np.ones((B, T), np.int32)
    mask[0, :7] = 0  # left-padded prompt
    mask[1, -9:] = 0  # completion padding on the right
    mask[2, :3] = 0
    mask[2, -4:] = 0
    return tokens, jnp.asarray(mask)


CASES = [dict(attention="blockwise", attention_block=8), dict(attention="xla"),
         dict(remat="full"), dict(remat="dots"), dict(remat="full", attention="blockwise", attention_block=16)]


@pytest.mark.parametrize("settings", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_model_settings_same_values_and_grads(settings):
    base = ModelConfig.tiny(attention="einsum", remat="none")
    params = init_params(base, jax.random.PRNGKey(0))
    tokens, mask = _batch()
    w = jax.random.normal(jax.random.PRNGKey(5), tokens.shape + (base.hidden_size,)) * mask[..., None]

    def loss(p, config):
        return jnp.sum(hidden_states(p, tokens, config=config, mask_BxT=mask) * w)

    cfg = base.replace(**settings)
    h_ref = hidden_states(params, tokens, config=base, mask_BxT=mask)
    h = hidden_states(params, tokens, config=cfg, mask_BxT=mask)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], atol=3e-5, rtol=1e-5)
    g_ref = jax.grad(loss)(params, base)
    g = jax.grad(loss)(params, cfg)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=2e-4)


def test_remat_full_keeps_less_for_the_backward():
    """Per-layer remat: the compiled backward of a 4-layer model at T = 256 holds less."""
    def temp(remat):
        cfg = ModelConfig.tiny(num_hidden_layers=4, remat=remat, attention="einsum")
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
        tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
        f = jax.jit(jax.grad(lambda p, t: hidden_states(p, t, config=cfg).astype(jnp.float32).sum()))
        return f.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp("full") < 0.5 * temp("none")
    assert llama.resolve_remat("auto", "cpu") == "none" and llama.resolve_remat("auto", "gpu") == "full"

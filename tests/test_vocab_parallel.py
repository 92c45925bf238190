"""The vocabulary-sized ends of the model (rubrax.models.head): the LM head's chunked
log-prob / entropy pass with its hand-written backward, and the embedding lookup, give
the values and gradients of plain autodiff on one device, and under FSDP on 8 devices
(1-D and the hybrid 2 x 4 mesh) never build a whole head or table on any device."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rubrax import sharding
from rubrax.models import head
from rubrax.policy import head_logprobs_and_entropy

D, V, B, T, TEMP = 16, 40, 8, 21, 0.7


def _data():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V)) * 0.3
    y = jax.random.randint(k3, (B, T), 0, V)
    return h, w, y


def _head_loss(make_head, w, h, y, *, entropy_grad, start=3, chunk=5):
    coef = jnp.linspace(-1.0, 1.0, B * T).reshape(B, T)
    logp, ent = head_logprobs_and_entropy(make_head(w), h, y, temperature=TEMP, chunk_tokens=chunk,
                                          entropy_grad=entropy_grad, start=start)
    return jnp.sum(coef * logp) + jnp.sum(coef**2 * ent)


def _on_mesh(fn, mesh, fsdp: bool):
    def run(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.fsdp_params(mesh if fsdp else None):
            return fn(*args)

    return jax.jit(run)


MESHES = [("1-D fsdp", None, True), ("2x4 hybrid fsdp", 4, True), ("1-D replicated", None, False)]


@pytest.mark.parametrize("vd", [False, True], ids=["kernel", "tied"])
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_linear_head_equals_autodiff_on_1_and_8_devices(vd, entropy_grad):
    """LinearHead (hand-written backward) == autodiff of a plain head_fn, for values and
    for the gradients in w and h; on 8 devices with the vocabulary split (FSDP, each
    device its slice of V) and with the head replicated, the gradient lands in the
    weight's own sharding."""
    h, w, y = _data()
    ww = w.T if vd else w
    plain = lambda w: (lambda x: x @ w.T) if vd else (lambda x: x @ w)
    linear = lambda w: head.LinearHead(w, vd=vd)
    ref_loss, ref_grads = jax.value_and_grad(functools.partial(_head_loss, plain, y=y, entropy_grad=entropy_grad),
                                             argnums=(0, 1))(ww, h)
    loss_fn = jax.value_and_grad(functools.partial(_head_loss, linear, y=y, entropy_grad=entropy_grad), argnums=(0, 1))
    loss, grads = jax.jit(loss_fn)(ww, h)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for name, fsdp_size, fsdp in MESHES:
        mesh = sharding.make_mesh(jax.devices()[:8], fsdp_axis_size=fsdp_size)
        w_s = jax.device_put(ww, sharding.param_sharding(ww, mesh, fsdp=fsdp))
        h_s = jax.device_put(h, sharding.batch_sharding(mesh))
        loss8, grads8 = _on_mesh(loss_fn, mesh, fsdp)(w_s, h_s)
        np.testing.assert_allclose(loss8, ref_loss, rtol=1e-5, err_msg=name)
        for a, b in zip(grads8, ref_grads):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
        assert grads8[0].sharding.spec == w_s.sharding.spec, name


def test_linear_head_bf16_close_to_float32():
    """bf16 compute over float32 weights: within bf16 rounding of the float32 result."""
    h, w, y = _data()
    linear = lambda w: head.LinearHead(w)
    f32 = jax.grad(functools.partial(_head_loss, linear, y=y, entropy_grad=True), argnums=(0, 1))(w, h)
    b16 = jax.grad(functools.partial(_head_loss, linear, y=y, entropy_grad=True), argnums=(0, 1))(w, h.astype(jnp.bfloat16))
    assert b16[0].dtype == jnp.float32 and b16[1].dtype == jnp.bfloat16
    for a, b in zip(b16, f32):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 2e-2 * scale


@pytest.mark.parametrize("name,fsdp_size,fsdp", MESHES)
def test_embedding_lookup_equals_take_on_8_devices(name, fsdp_size, fsdp):
    """The vocabulary-parallel lookup gives table[tokens] and the table gradient of
    autodiff through jnp.take; the gradient is born in the table's sharding."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    table = jax.random.normal(k1, (V, D))
    tokens = jax.random.randint(k2, (B, 700), 0, V)  # 700: two time chunks, the second padded
    coef = jax.random.normal(k3, (B, 700, D))
    loss = lambda t, tok: jnp.sum(coef * head.embed(t, tok, jnp.float32) ** 2)
    ref = jax.value_and_grad(lambda t: jnp.sum(coef * jnp.take(t, tokens, axis=0) ** 2))(table)
    mesh = sharding.make_mesh(jax.devices()[:8], fsdp_axis_size=fsdp_size)
    t_s = jax.device_put(table, sharding.param_sharding(table, mesh, fsdp=fsdp))
    tok_s = jax.device_put(tokens, sharding.batch_sharding(mesh))
    value, grad = _on_mesh(jax.value_and_grad(loss), mesh, fsdp)(t_s, tok_s)
    np.testing.assert_allclose(value, ref[0], rtol=1e-6)
    np.testing.assert_allclose(grad, ref[1], atol=1e-4, rtol=1e-5)
    assert grad.sharding.spec == t_s.sharding.spec
    h = _on_mesh(lambda t, tok: head.embed(t, tok, jnp.bfloat16), mesh, fsdp)(t_s, tok_s)
    np.testing.assert_array_equal(h, jnp.take(table.astype(jnp.bfloat16), tokens, axis=0))  # exact: one slice holds each


def test_fsdp_update_builds_no_whole_head_or_table():
    """The RL update with FSDP on 8 devices, compiled: no instruction of the optimized HLO
    has the shape of the whole embedding table or LM head (in any dtype), so neither is
    ever gathered onto one device, nor its gradient built whole before a reduction. (The
    autodiff head of before all-reduced a float32 [D, V] gradient after every chunk.)"""
    from rubrax.models import ModelConfig
    from rubrax import plan
    from rubrax.rl.step import RLConfig
    from rubrax.train.optim import OptimConfig

    config = ModelConfig.tiny(hidden_size=64, intermediate_size=96, vocab_size=1000, tie_word_embeddings=False,
                              dtype="bfloat16", param_dtype="float32")
    mesh = sharding.make_mesh(jax.devices()[:8])
    rl = RLConfig(group_size=4, kl_coef=0.01, grad_accum=2)
    captured = {}
    real_compile = plan._compile

    def keep(lowered, platform):
        captured["compiled"] = real_compile(lowered, platform)
        return captured["compiled"]

    plan._compile = keep
    try:
        plan.plan_update(config, rl, OptimConfig(), rows=32, width=8, completion=56, mesh=mesh, fsdp=True,
                         total_steps=2, platform="cpu")
    finally:
        plan._compile = real_compile
    text = captured["compiled"].as_text()
    whole = re.compile(r"\[(1000,64|64,1000)\]")
    offenders = [line.strip()[:160] for line in text.splitlines() if whole.search(line.split("=")[1] if "=" in line else "")]
    assert not offenders, offenders[:5]
    assert re.search(r"\[(125,64|64,125)\]", text)  # the shards are there


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_sampler_keeps_vocabulary_split_same_samples(tie):
    """sample() from FSDP params with the scan layer loop keeps the embedding / LM head
    split along the vocabulary (SampleConfig.vocab_parallel): the decode copy holds an
    eighth of each, the compiled sampler gathers no vocabulary-sized array (only the
    rows' hidden states), and the samples and logprobs equal one device's and those of
    the fully gathered copy (1-D and hybrid 2 x 4 meshes)."""
    import dataclasses

    from rubrax import policy
    from rubrax.models import ModelConfig, init_params

    config = ModelConfig.tiny(vocab_size=128, tie_word_embeddings=tie)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(3, 128, (4, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    cfg = policy.SampleConfig(max_new_tokens=12, n=4, layer_loop="scan", stop_token_ids=(), temperature=0.8, top_k=20)
    key = jax.random.PRNGKey(1)
    one = policy.sample(params, tokens, mask, key, cfg, config=config)
    for fsdp_size in (None, 4):
        mesh = sharding.make_mesh(jax.devices()[:8], fsdp_axis_size=fsdp_size)
        placed = jax.device_put(params, sharding.param_sharding(params, mesh, fsdp=True))
        assert policy._vocab_split(placed, config, mesh, cfg)
        dec = policy.decode_params(placed, config=config, mesh=mesh, layer_loop="scan", vocab_split=True)
        name = ("embed_tokens", "embedding") if tie else ("lm_head", "kernel")
        w = dec[name[0]][name[1]]
        split = 8 if fsdp_size is None else 4
        assert w.addressable_shards[0].data.size * split == w.size
        assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dec["layers"]))
        for c in (cfg, dataclasses.replace(cfg, vocab_parallel=False)):
            out = policy.sample(placed, tokens, mask, key, c, config=config)
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
            np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(one.logprobs), atol=1e-5)
        rows = jax.device_put(jnp.ones((16, 8), jnp.int32), sharding.batch_sharding(mesh))
        text = policy._sample_rows.lower(dec, rows, rows, jax.random.key(0), cfg=cfg, config=config, mesh=mesh,
                                         vocab_parallel=True).compile().as_text()
        gathers = [line for line in text.splitlines() if re.search(r"all-gather(-start)?\(", line)]
        assert gathers  # the hidden rows are gathered ...
        assert not [g for g in gathers if "128" in g.split("all-gather")[0]], gathers  # ... never the vocabulary


def test_model_jits_key_on_the_fsdp_context():
    """llama.hidden_states traced inside a data-parallel step and then inside an FSDP step
    on the same mesh (same abstract mesh, same shapes) is traced again for FSDP (its
    vocabulary-parallel lookup appears: a reduce-scatter), and back: jit's own cache would
    have handed the FSDP step the data-parallel trace."""
    from rubrax.models import ModelConfig, init_params, llama

    config = ModelConfig.tiny(vocab_size=128)
    params = init_params(config, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(jax.devices()[:8])
    placed = jax.device_put(params, sharding.param_sharding(params, mesh, fsdp=True))
    tokens = jax.device_put(jnp.ones((8, 16), jnp.int32), sharding.batch_sharding(mesh))

    def scatters(fsdp: bool) -> int:
        step = _on_mesh(lambda p, t: llama.hidden_states(p, t, config=config).sum(), mesh, fsdp)
        return step.lower(placed, tokens).compile().as_text().count("reduce-scatter(")

    assert [scatters(False) > 0, scatters(True) > 0, scatters(False) > 0] == [False, True, False]

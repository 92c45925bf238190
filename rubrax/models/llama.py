"""Llama-family decoder (Llama 3, SmolLM2, Qwen2/2.5, Qwen3) in Flax linen.

Why linen: its modules are pure functions of an explicit params PyTree, so params are a
plain nested dict (`init_params` returns it, `forward` takes it) that jits, shards and
checkpoints like any other PyTree; no module state crosses the jit boundary.

Layout of the params PyTree (kernels are [in, out]; the layer stack has a leading axis
L = num_hidden_layers because the layers run under `nn.scan`, so a 30-layer model
compiles one layer body instead of 30):

    embed_tokens/embedding                  [V, D]
    layers/input_layernorm/scale            [L, D]
    layers/self_attn/{q,k,v,o}_proj/kernel  [L, D, H*Dh] ... [L, H*Dh, D]
    layers/self_attn/{q,k,v}_proj/bias      [L, H*Dh]   (attention_bias; Qwen2)
    layers/self_attn/o_proj/bias            [L, D]      (attention_out_bias)
    layers/self_attn/{q,k}_norm/scale       [L, Dh]     (qk_norm; Qwen3)
    layers/post_attention_layernorm/scale   [L, D]
    layers/mlp/{gate,up,down}_proj/kernel   [L, D, F] ... [L, F, D]
    norm/scale                              [D]
    lm_head/kernel                          [D, V]      (absent when tied)

Math (per layer, HF LlamaDecoderLayer):
    h = h + o_proj(Attn(RoPE(q), RoPE(k), v))      on RMSNorm(h)
    h = h + down(silu(gate(x)) * up(x))            on x = RMSNorm(h)
    RMSNorm(x) = scale * x / sqrt(mean(x^2) + eps)  (computed in float32)
    RoPE rotates pairs (i, i + Dh/2) by angle pos * theta^(-2i/Dh) (HF "rotate_half").
Grouped-query attention shares each K/V head among H/K query heads.

Masks: `mask_BxT` is 1 for real tokens and 0 for padding on either side. Attention is
causal in array order and never attends to padding keys. Positions default to
cumsum(mask) - 1 clipped at 0, so a left-padded sequence gets the same positions (and
the same logits at its real tokens) as the unpadded one.

The same layer code serves full-sequence forward passes and KV-cached decoding
(`forward_with_cache`): the cache (k, v), each [L, B, K, S, Dh], holds K/V for S slots;
new K/V are written at `cache_index`, and query t at absolute slot cache_index + t attends
to slots j <= cache_index + t with kv_mask[j] = 1. The cache is part of the layer scan's
carry so each step updates it in place (emitting it as scan outputs copied the whole cache
every step).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rubrax.models import attention as attn_lib
from rubrax.models import head as head_lib
from rubrax.models.config import ModelConfig
from rubrax.sharding import compute_copy, jit_keyed_by_fsdp

Params = dict[str, Any]
_DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def jnp_dtype(name: str):
    return _DTYPE[name]


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies theta^(-2i/Dh), with HF's "linear" and "llama3" scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict or {}
    rope_type = config.rope_type
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions_BxT: jax.Array, config: ModelConfig):
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x_BxTxHxD, cos_BxTxD, sin_BxTxD):
    half = x_BxTxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxHxD[..., half:], x_BxTxHxD[..., :half]], axis=-1)
    cos, sin = cos_BxTxD[:, :, None, :], sin_BxTxD[:, :, None, :]
    return (x_BxTxHxD * cos.astype(x_BxTxHxD.dtype) + rotated * sin.astype(x_BxTxHxD.dtype))


def constrain_batch(h_BxTxD):
    """Pins activations to rows split over the row axes of the mesh in context
    (`jax.sharding.use_abstract_mesh`, set by the trainers' jitted steps): "data", and
    "fsdp" too on the hybrid 2-D mesh, every device its own rows. So under FSDP XLA
    gathers the weights, not the batch, and reduce-scatters the weight gradients. A no-op
    without such a mesh, or when the rows do not divide over it."""
    mesh, axes = head_lib.row_mesh(h_BxTxD.shape[0])
    if mesh is None:
        return h_BxTxD
    spec = axes[0] if len(axes) == 1 else axes
    return jax.lax.with_sharding_constraint(h_BxTxD, jax.sharding.PartitionSpec(spec))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class Dense(nn.Module):
    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.einsum("...d,df->...f", x.astype(self.dtype), compute_copy(kernel, self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, kv_mask_BxS, cache_index, cache, layer):
        c = self.config
        dt, pdt = jnp_dtype(c.dtype), jnp_dtype(c.param_dtype)
        B, T, _ = x_BxTxD.shape
        H, K, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dense = functools.partial(Dense, dtype=dt, param_dtype=pdt)
        q = dense(H * Dh, c.attention_bias, name="q_proj")(x_BxTxD).reshape(B, T, H, Dh)
        k = dense(K * Dh, c.attention_bias, name="k_proj")(x_BxTxD).reshape(B, T, K, Dh)
        v = dense(K * Dh, c.attention_bias, name="v_proj")(x_BxTxD).reshape(B, T, K, Dh)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, dt, pdt, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, dt, pdt, name="k_norm")(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            # The whole [L, B, K, S, Dh] cache is the scan carry, updated in place at
            # (layer, cache_index): a decode step writes B x K x T x Dh values, not the
            # cache. Head-major slots keep the written block contiguous.
            k_all, v_all = cache
            start = (layer, 0, 0, cache_index, 0)
            k_new = k.transpose(0, 2, 1, 3)[None].astype(k_all.dtype)
            v_new = v.transpose(0, 2, 1, 3)[None].astype(v_all.dtype)
            k_all = jax.lax.dynamic_update_slice(k_all, k_new, start)
            v_all = jax.lax.dynamic_update_slice(v_all, v_new, start)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
            cache = (k_all, v_all)
        q = q.reshape(B, T, K, H // K, Dh)
        S = k.shape[2] if cache is not None else T
        impl = attn_lib.resolve_impl(c.attention, T=T, S=S, dtype=dt, head_dim=Dh,
                                     masked=kv_mask_BxS is not None or cache is not None)
        out = attn_lib.attend(q, k.astype(dt), v.astype(dt), impl=impl, q_offset=cache_index,
                              kv_mask_BxS=kv_mask_BxS, block=c.attention_block,
                              head_major=cache is not None)
        out = dense(c.hidden_size, c.attention_out_bias, name="o_proj")(out.reshape(B, T, H * Dh))
        return out, cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(Dense, use_bias=False, dtype=jnp_dtype(c.dtype),
                                  param_dtype=jnp_dtype(c.param_dtype))
        gate = dense(c.intermediate_size, name="gate_proj")(x)
        up = dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, kv_mask_BxS, cache_index, layer):
        h, cache = carry
        c = self.config
        dt, pdt = jnp_dtype(c.dtype), jnp_dtype(c.param_dtype)
        h = constrain_batch(h)
        x = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(h)
        attn, cache = Attention(c, name="self_attn")(x, cos, sin, kv_mask_BxS, cache_index, cache, layer)
        h = h + attn
        x = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(h)
        return (constrain_batch(h + MLP(c, name="mlp")(x)), cache), None


REMAT_POLICIES = ("auto", "none", "full", "dots")


def resolve_remat(remat: str, platform: str | None = None) -> str:
    """The rematerialisation policy "auto" means: "none" on CPU (small models, where the
    recomputed forward would only cost time), "full" on GPU/TPU (measured with `rubrax
    plan`: "dots" keeps every matmul output of every layer, ~63 GB per device for the
    paper's Qwen3-8B recipe, "full" keeps only each layer's input, see README)."""
    if remat != "auto":
        return remat
    return "none" if (platform or jax.default_backend()) == "cpu" else "full"


def _layer_class(config: ModelConfig):
    """DecoderLayer, under jax.checkpoint (nn.remat) for the "full" / "dots" policies:
    the backward pass recomputes each layer's internals from its saved input (plus, for
    "dots", its matmul outputs) instead of keeping them from the forward pass."""
    remat = resolve_remat(config.remat)
    if remat == "none":
        return DecoderLayer
    policy = (jax.checkpoint_policies.nothing_saveable if remat == "full"
              else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=False)


class CausalLM(nn.Module):
    """Embedding -> scanned decoder layers -> final norm; `logits` applies the LM head."""

    config: ModelConfig

    def setup(self):
        c = self.config
        dt, pdt = jnp_dtype(c.dtype), jnp_dtype(c.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = nn.scan(
            _layer_class(c),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_hidden_layers,
        )(c)
        self.norm = RMSNorm(c.rms_norm_eps, dt, pdt)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, False, dt, pdt)

    def __call__(self, tokens_BxT, positions_BxT, kv_mask_BxS, cache_index, cache):
        """Returns (h_BxTxD after the final norm, updated cache or None). kv_mask_BxS
        None: causal self-attention over all T tokens (no padding)."""
        # = self.embed_tokens(tokens_BxT); vocabulary-parallel under FSDP (rubrax.models.head)
        h = head_lib.embed(self.embed_tokens.embedding, tokens_BxT, self.embed_tokens.dtype)
        cos, sin = rope_cos_sin(positions_BxT, self.config)
        layer_ids = jnp.arange(self.config.num_hidden_layers)
        (h, cache), _ = self.layers((h, cache), cos, sin, kv_mask_BxS, cache_index, layer_ids)
        return self.norm(h), cache

    def logits(self, h_BxTxD):
        """float32 logits; the matmul accumulates in float32 even for bf16 compute."""
        if self.config.tie_word_embeddings:
            w_VxD = compute_copy(self.embed_tokens.embedding, h_BxTxD.dtype)
            return jnp.einsum("btd,vd->btv", h_BxTxD, w_VxD, preferred_element_type=jnp.float32)
        w_DxV = compute_copy(self.lm_head.variables["params"]["kernel"], h_BxTxD.dtype)
        return jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)

    def init_all(self, tokens_BxT):
        pos = jnp.zeros(tokens_BxT.shape, jnp.int32)
        h, _ = self(tokens_BxT, pos, None, 0, None)
        if not self.config.tie_word_embeddings:
            self.lm_head(h)
        return h


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ModelConfig):
    # One compiled initialiser per (hashable) config: repeated init_params calls with new keys
    # (seeds, arms of an experiment) do not recompile.
    return jax.jit(functools.partial(CausalLM(config).init, method=CausalLM.init_all))


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random-init params (normal(0.02) weights, unit norms, zero biases) as a nested dict."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = _jitted_init(config)(key, tokens)
    return flax.core.unfreeze(variables["params"])


def default_positions(mask_BxT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def _prepare(tokens_BxT, mask_BxT, positions_BxT):
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
        positions_BxT = default_positions(mask_BxT)
    return mask_BxT, positions_BxT


def self_attention_config(config: ModelConfig, T: int) -> ModelConfig:
    """config with its attention implementation resolved for full-sequence (no cache)
    passes of T tokens, so every layer (and `rubrax plan`) uses exactly the same one."""
    impl = attn_lib.resolve_impl(config.attention, T=T, S=T, dtype=jnp_dtype(config.dtype),
                                 head_dim=config.head_dim, masked=False)
    return config if impl == config.attention else config.replace(attention=impl)


def _real_first(mask_BxT):
    """Per-row permutation putting the real tokens first (in order), padding after."""
    return jnp.argsort(1 - mask_BxT.astype(jnp.int32), axis=-1, stable=True)


def _gather_rows(x_BxT, perm_BxT):
    idx = perm_BxT.reshape(perm_BxT.shape + (1,) * (x_BxT.ndim - 2))
    return jnp.take_along_axis(x_BxT, idx, axis=1)


@jit_keyed_by_fsdp(("config",))
def hidden_states(params: Params, tokens_BxT: jax.Array, *, config: ModelConfig,
                  mask_BxT: jax.Array | None = None,
                  positions_BxT: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states h_BxTxD (compute dtype), e.g. for a reward head.

    Masks without a [B, T, S] array: the einsum and blockwise kernels take the key
    padding mask as a [B, T] vector; for the fused kernels (cuDNN, TPU flash), which know
    only "causal", each row's real tokens are moved first (a stable per-row permutation,
    positions moving with them), so causal attention in the permuted order is exactly
    causal attention among the real tokens, and h is permuted back. Padding rows are
    garbage either way.

    Works on both layer layouts: stacked params (a scan over layers) and
    `unstack_layers` params (an unrolled loop; on CPU its backward pass is ~1.3x faster
    for SmolLM2, and decoding needs no per-call split). Same values and gradients.
    """
    given = mask_BxT is not None
    mask_BxT, positions_BxT = _prepare(tokens_BxT, mask_BxT, positions_BxT)
    config = self_attention_config(config, tokens_BxT.shape[1])
    kv_mask = mask_BxT if given else None
    perm = None
    if given and config.attention in attn_lib.FUSED:
        perm = _real_first(mask_BxT)
        tokens_BxT, positions_BxT, kv_mask = _gather_rows(tokens_BxT, perm), _gather_rows(positions_BxT, perm), None
    if is_unstacked(params):
        h, _ = forward_with_cache_unrolled(params, tokens_BxT, positions_BxT, kv_mask, None, 0, config=config)
    else:
        h, _ = CausalLM(config).apply({"params": params}, tokens_BxT, positions_BxT, kv_mask, 0, None)
    return h if perm is None else _gather_rows(h, jnp.argsort(perm, axis=-1))


@jit_keyed_by_fsdp(("config",))
def forward(params: Params, tokens_BxT: jax.Array, *, config: ModelConfig,
            mask_BxT: jax.Array | None = None,
            positions_BxT: jax.Array | None = None) -> jax.Array:
    """float32 logits_BxTxV; logits[:, t] predicts token t+1. Padding rows are garbage."""
    h = hidden_states(params, tokens_BxT, config=config, mask_BxT=mask_BxT,
                      positions_BxT=positions_BxT)
    return lm_logits(params, h, config=config)


def lm_logits(params: Params, h_BxTxD: jax.Array, *, config: ModelConfig) -> jax.Array:
    """float32 logits from final hidden states (the LM head alone)."""
    head = {k: v for k, v in params.items() if k != "layers"}
    return CausalLM(config).apply({"params": head}, h_BxTxD, method=CausalLM.logits)


def init_cache(config: ModelConfig, batch: int, length: int):
    """Zeroed KV cache (k, v), each [L, B, K, S, Dh] (head-major slots) in the compute
    dtype."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length,
             config.head_dim)
    dt = jnp_dtype(config.dtype)
    return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


def forward_with_cache(params: Params, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                       kv_mask_BxS: jax.Array, cache, cache_index, *, config: ModelConfig):
    """Run T new tokens at cache slots [cache_index, cache_index + T).

    kv_mask_BxS (None = all slots real) marks which cache slots hold real tokens (including the new ones).
    Returns (h_BxTxD, updated cache). Not jitted itself: it is traced inside the sampler.
    """
    return CausalLM(config).apply({"params": params}, tokens_BxT, positions_BxT, kv_mask_BxS,
                                  cache_index, cache)



def is_unstacked(params: Params) -> bool:
    """True for the per-layer layout of `unstack_layers` (params["layers"] a tuple)."""
    return isinstance(params.get("layers"), tuple)


def stack_layers(params: Params) -> Params:
    """Inverse of `unstack_layers` (no-op on stacked params)."""
    if not is_unstacked(params):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def unstack_layers(params: Params) -> Params:
    """The same params with the stacked [L, ...] layer weights split into a tuple of L
    per-layer dicts (separate buffers). Eager, outside jit.

    Decoding reads every weight once per token, so it is bound by memory traffic. Inside a
    scan over stacked weights, XLA on CPU copies each layer's slice before using it (about
    twice the traffic); separate per-layer buffers in an unrolled loop are read in place.
    On one CPU device the split is free (the per-layer arrays alias the stacked buffers);
    elsewhere it costs one extra copy of the layer weights while it is alive.
    """
    if is_unstacked(params):
        return params
    layers = params["layers"]
    L = jax.tree.leaves(layers)[0].shape[0]
    device = _single_cpu_device(layers)
    if device is not None:
        # Zero-copy: numpy views of the stacked buffers, handed back to XLA by device_put
        # (which aliases aligned host memory on CPU). The views keep the stacked buffers
        # alive, and JAX declines to donate a buffer with such external references, so
        # neither side can be overwritten under the other.
        host = jax.tree.map(np.asarray, layers)
        return {**params, "layers": tuple(jax.tree.map(lambda h, i=i: jax.device_put(h[i], device), host)
                                          for i in range(L))}
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(L))}


def _single_cpu_device(tree):
    """The one CPU device holding every leaf of tree (concrete jax.Arrays), else None."""
    devices = set()
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        devices |= x.devices()
    device = devices.pop() if len(devices) == 1 else None
    return device if device is not None and device.platform == "cpu" else None


def forward_with_cache_unrolled(params_u: Params, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                                kv_mask_BxS: jax.Array, cache, cache_index, *,
                                config: ModelConfig):
    """`forward_with_cache` on `unstack_layers` params: a Python loop over layers (unrolled
    in the trace) instead of a scan. Same values; faster decoding on CPU."""
    c = config
    dt, pdt = jnp_dtype(c.dtype), jnp_dtype(c.param_dtype)
    h = jnp.take(params_u["embed_tokens"]["embedding"], tokens_BxT, axis=0).astype(dt)
    cos, sin = rope_cos_sin(positions_BxT, c)
    layer = _layer_class(c)(c)
    for i, layer_params in enumerate(params_u["layers"]):
        (h, cache), _ = layer.apply({"params": layer_params}, (h, cache), cos, sin, kv_mask_BxS,
                                    cache_index, i)
    h = RMSNorm(c.rms_norm_eps, dt, pdt).apply({"params": params_u["norm"]}, h)
    return h, cache

"""Causal grouped-query attention, one function with several implementations.

    out_BxTxKxGxDh = attend(q_BxTxKxGxDh, k_BxSxKxDh, v_BxSxKxDh, impl=...,
                            q_offset=0, kv_mask_BxS=None)

Query t sits at key slot q_offset + t and attends to slots j <= q_offset + t (causal in
array order) with kv_mask_BxS[j] = 1 (all slots when None). K = key/value heads, G =
query heads per K/V head. Softmax in float32 over scaled scores q.k / sqrt(Dh); the
output is in the query's dtype. A query with no allowed key (a padding row) gets the
uniform average over its masked keys, as a softmax over equal -1e30 scores would: such
rows are garbage by contract and masked out downstream.

Implementations (`ModelConfig.attention`; "auto" resolved by `resolve_impl`, the one place
the defaults are chosen):
- "einsum": scores [B, K, G, T, S] materialised (float32), then softmax and a second
  einsum. Fastest for short sequences and for decoding (T = 1) on CPU; O(T * S) memory.
- "blockwise": flash-style online softmax in plain JAX with a custom VJP: blocks of
  `block` queries x `block` keys, fully masked blocks skipped, only (out, logsumexp)
  saved for the backward, which recomputes each block's probabilities (FlashAttention-2
  recurrences). O(T) memory on every backend, so CPU runs and CPU-compiled plans hold
  no [T, S] array.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`, the
  fused cuDNN flash kernel (GPU; bf16/fp16, Dh <= 128 and a multiple of 8; no kv_mask,
  q_offset 0: the training/scoring path, whose padding `llama` removes by packing the
  real tokens first, see `llama.hidden_states`).
- "xla": `jax.nn.dot_product_attention(implementation="xla", is_causal=True)`, the same
  maths materialised by XLA (a reference point in benchmarks/accelerator.py).
- "tpu_flash": the Pallas TPU flash-attention kernel
  (jax.experimental.pallas.ops.tpu.flash_attention, causal; K/V heads repeated G times).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLS = ("auto", "einsum", "blockwise", "cudnn", "xla", "tpu_flash")
FUSED = ("cudnn", "xla", "tpu_flash")  # causal only: padding handled by the caller
_NEG_INF = -1e30  # finite: a fully masked row gives no NaN
# Sequences at least this long use the blockwise kernel where no fused one exists: below
# it the materialised scores are small and the einsum path is faster on CPU.
BLOCKWISE_MIN_LEN = 1024


def resolve_impl(impl: str, *, T: int, S: int, dtype, head_dim: int, masked: bool,
                 platform: str | None = None) -> str:
    """The implementation "auto" means for this call (static shapes, backend).

    GPU: cuDNN for unmasked causal self-attention in bf16/fp16 with a supported head
    size; TPU: the Pallas flash kernel for the same case with T a multiple of 128;
    elsewhere (CPU, decoding, cache prefill): blockwise from BLOCKWISE_MIN_LEN keys,
    einsum below. Decoding (T = 1) is always einsum: one query row is a vector product.
    """
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    self_attn = not masked and T == S
    if T > 1 and self_attn:
        if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
                and head_dim <= 128:
            return "cudnn"
        if platform == "tpu" and T % 128 == 0:
            return "tpu_flash"
    if T > 1 and S >= BLOCKWISE_MIN_LEN:
        return "blockwise"
    return "einsum"


def attend(q, k, v, *, impl: str, q_offset=0, kv_mask_BxS=None, block: int = 512,
           head_major: bool = False):
    """Causal GQA attention (see module docstring); impl must already be resolved.

    head_major: k and v come as [B, K, S, Dh] (the KV cache's layout, read in place by the
    einsum path when decoding) instead of [B, S, K, Dh].
    """
    B, T, K, G, Dh = q.shape
    if impl == "einsum":
        return _einsum_attention(q, k, v, q_offset, kv_mask_BxS, "bksd" if head_major else "bskd")
    if head_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if impl == "blockwise":
        mask = jnp.ones(k.shape[:2], jnp.int32) if kv_mask_BxS is None else kv_mask_BxS.astype(jnp.int32)
        return _blockwise(q, k, v, mask, jnp.asarray(q_offset, jnp.int32), block)
    if kv_mask_BxS is not None or T != k.shape[1]:
        raise ValueError(f"attention impl {impl!r} serves unmasked causal self-attention only")
    if impl in ("cudnn", "xla"):
        out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, Dh), k, v, is_causal=True,
                                           implementation=impl)
        return out.reshape(B, T, K, G, Dh)
    if impl == "tpu_flash":
        return _tpu_flash(q, k, v)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def _allowed(T: int, S: int, q_offset, kv_mask_BxS, q0=0, k0=0):
    """bool [B or 1, Tq, Sk]: query q0 + t may see key k0 + j."""
    q_slot = q_offset + q0 + jnp.arange(T)[:, None]
    causal = (k0 + jnp.arange(S)[None, :] <= q_slot)[None]
    if kv_mask_BxS is None:
        return causal
    return causal & (kv_mask_BxS[:, None, :] > 0)


def _einsum_attention(q, k, v, q_offset, kv_mask_BxS, kv: str):
    B, T, K, G, Dh = q.shape
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(Dh)
    allowed = _allowed(T, k.shape[kv.index("s")], q_offset, kv_mask_BxS)
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum(f"bkgts,{kv}->btkgd", probs, v.astype(q.dtype))


# --------------------------------------------------------------------------- blockwise


def _pad_to(x, axis: int, size: int):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _blocks(T: int, S: int, block: int):
    bq, bk = min(block, T), min(block, S)
    return bq, bk, -(-T // bq), -(-S // bk)


def _kv_blocks_needed(i, q_offset, bq: int, bk: int, nk: int):
    """Key blocks [0, n) that queries of block i can see (causal): later ones are skipped."""
    last_slot = q_offset + (i + 1) * bq - 1
    return jnp.clip(last_slot // bk + 1, 1, nk)


def _block_scores(q_blk, k_blk, mask_blk, q_offset, q0, k0, scale):
    """float32 scores [B, K, G, bq, bk] of one block, disallowed pairs at -1e30."""
    s = jnp.einsum("btkgd,bskd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    allowed = _allowed(q_blk.shape[1], k_blk.shape[1], q_offset, mask_blk, q0, k0)
    return jnp.where(allowed[:, None, None], s, _NEG_INF)


def _blockwise_fwd_impl(q, k, v, mask_BxS, q_offset, block: int):
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    bq, bk, nq, nk = _blocks(T, S, block)
    scale = 1.0 / math.sqrt(Dh)
    qp = _pad_to(q, 1, nq * bq)
    kp, vp = _pad_to(k.astype(q.dtype), 1, nk * bk), _pad_to(v.astype(q.dtype), 1, nk * bk)
    mp = _pad_to(mask_BxS, 1, nk * bk)  # padded keys are masked

    def q_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, 1)

        def kv_step(j, carry):
            m, l, acc = carry
            k_blk = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, 1)
            v_blk = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, 1)
            m_blk = jax.lax.dynamic_slice_in_dim(mp, j * bk, bk, 1)
            s = _block_scores(q_blk, k_blk, m_blk, q_offset, i * bq, j * bk, scale)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), v_blk,
                                                     preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, Dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _kv_blocks_needed(i, q_offset, bq, bk, nk), kv_step, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, (Dh)]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, nq * bq, Dh)[:, :, :, :T]
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, nq * bq)[..., :T]
    return jnp.einsum("bkgtd->btkgd", out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, mask_BxS, q_offset, block: int):
    return _blockwise_fwd_impl(q, k, v, mask_BxS, q_offset, block)[0]


def _blockwise_fwd(q, k, v, mask_BxS, q_offset, block):
    out, lse = _blockwise_fwd_impl(q, k, v, mask_BxS, q_offset, block)
    return out, (q, k, v, mask_BxS, q_offset, out, lse)


def _blockwise_bwd(block, res, d_out):
    """FlashAttention-2 backward: per key block j (outer), per query block i that sees it
    (inner): P = exp(S - lse), dV_j += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)),
    dQ_i += dS K_j * scale, dK_j += dS^T Q_i * scale."""
    q, k, v, mask_BxS, q_offset, out, lse = res
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    bq, bk, nq, nk = _blocks(T, S, block)
    scale = 1.0 / math.sqrt(Dh)
    dt = q.dtype
    qp = _pad_to(q, 1, nq * bq)
    dop = _pad_to(d_out.astype(dt), 1, nq * bq)
    kp, vp = _pad_to(k.astype(dt), 1, nk * bk), _pad_to(v.astype(dt), 1, nk * bk)
    mp = _pad_to(mask_BxS, 1, nk * bk)
    lsep = _pad_to(lse, 3, nq * bq)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    deltap = _pad_to(delta, 3, nq * bq)
    # first query block that can see key block j: its last slot >= j * bk
    first_q = lambda j: jnp.clip((j * bk - q_offset) // bq, 0, nq)

    def kv_block(dq, j):
        k_blk = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, 1)
        v_blk = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, 1)
        m_blk = jax.lax.dynamic_slice_in_dim(mp, j * bk, bk, 1)

        def q_step(i, carry):
            dq, dk, dv = carry
            q_blk = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, 1)
            do_blk = jax.lax.dynamic_slice_in_dim(dop, i * bq, bq, 1)
            lse_blk = jax.lax.dynamic_slice_in_dim(lsep, i * bq, bq, 3)
            d_blk = jax.lax.dynamic_slice_in_dim(deltap, i * bq, bq, 3)
            s = _block_scores(q_blk, k_blk, m_blk, q_offset, i * bq, j * bk, scale)
            p = jnp.exp(s - lse_blk[..., None])  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgts,btkgd->bskd", p.astype(dt), do_blk, preferred_element_type=jnp.float32)
            dp = jnp.einsum("btkgd,bskd->bkgts", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = (p * (dp - d_blk[..., None]) * scale).astype(dt)
            dq_blk = jnp.einsum("bkgts,bskd->btkgd", ds, k_blk, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_blk, i * bq, 1)
            dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, q_blk, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((B, bk, K, Dh), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(first_q(j), nq, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qp.shape, jnp.float32), jnp.arange(nk))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(B, nk * bk, K, Dh)[:, :S]
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(B, nk * bk, K, Dh)[:, :S]
    return (dq[:, :T].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --------------------------------------------------------------------------- TPU


def _tpu_flash(q, k, v):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    B, T, K, G, Dh = q.shape
    q_BxHxTxD = jnp.einsum("btkgd->bkgtd", q).reshape(B, K * G, T, Dh)
    rep = lambda x: jnp.repeat(jnp.einsum("bskd->bksd", x), G, axis=1).astype(q.dtype)
    out = fa.flash_attention(q_BxHxTxD, rep(k), rep(v), causal=True, sm_scale=1.0 / math.sqrt(Dh))
    return jnp.einsum("bkgtd->btkgd", out.reshape(B, K, G, T, Dh))

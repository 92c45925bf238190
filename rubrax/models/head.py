"""The LM head as one matrix, with its chunked log-prob / entropy pass and a hand-written
backward pass (`chunked_stats`), for `rubrax.policy.head_logprobs_and_entropy`.

Per chunk of positions, with z = h @ w / temperature (float32 logits over V),
p = softmax(z), lse = logsumexp(z):

    logp = z[y] - lse                      d logp / dz = onehot(y) - p
    H    = lse - sum_v p_v z_v             d H / dz    = -p * (z - E_p[z])

The backward pass recomputes each chunk's logits (nothing [B, T, V] is kept), casts dz to
the compute dtype for its two matmuls (float32 accumulation) and sums dw in float32 over
the chunks. Under a mesh (the trainers' jitted steps put one in context, rows split over
its row axes) the chunk loops run inside `jax.shard_map`, one device's rows each: the
head's compute-dtype copy is gathered once per pass (not once per chunk), every device
sums its own rows' dw locally, and one reduce-scatter (FSDP: straight into the weight's
shard, float32) or all-reduce (replicated weights) ends the backward pass. Left to the
SPMD partitioner, autodiff of the chunk loop reduces the full float32 [D, V] gradient
across devices after every chunk (seen in the compiled HLO: an all-reduce inside the
loop) and keeps several full float32 copies of the head alive.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rubrax.sharding import ROW_AXES, compute_copy, fsdp_mesh_in_context, fsdp_spec


class LinearHead:
    """logits = h @ w in float32 (matmul in h's dtype, float32 accumulation); w is the LM
    head kernel [D, V], or with vd=True a tied embedding [V, D]. Callable like any
    head_fn (h_NxD -> logits_NxV)."""

    def __init__(self, w: jax.Array, vd: bool = False):
        self.w, self.vd = w, vd

    @property
    def vocab_size(self) -> int:
        return self.w.shape[0 if self.vd else 1]

    def __call__(self, h_NxD: jax.Array) -> jax.Array:
        return _logits(h_NxD, compute_copy(self.w, h_NxD.dtype), self.vd)


class Options(NamedTuple):
    temperature: float
    entropy: bool
    entropy_grad: bool
    vd: bool


def _logits(h, w_c, vd: bool):
    return jnp.einsum("...d,vd->...v" if vd else "...d,dv->...v", h, w_c, preferred_element_type=jnp.float32)


def _softmax_stats(z):
    """(lse, p) with one exp over the chunk's logits."""
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return (m + jnp.log(s))[..., 0], e / s


def _chunk_stats(w_c, h, y, o: Options):
    z = _logits(h, w_c, o.vd) / o.temperature
    lse, p = _softmax_stats(z)
    logp = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0] - lse
    if not o.entropy:
        return logp, jnp.zeros_like(lse)
    return logp, lse - jnp.sum(p * z, axis=-1)


def _chunk_grads(w_c, h, y, g_logp, g_ent, o: Options):
    """(dh in h's dtype, dw in float32) of sum(g_logp * logp + g_ent * H) over one chunk."""
    z = _logits(h, w_c, o.vd) / o.temperature
    _, p = _softmax_stats(z)
    onehot = jnp.arange(z.shape[-1], dtype=y.dtype) == y[..., None]
    dz = g_logp[..., None] * (onehot.astype(jnp.float32) - p)
    if o.entropy and o.entropy_grad:
        dz = dz - g_ent[..., None] * p * (z - jnp.sum(p * z, axis=-1, keepdims=True))
    dz = (dz / o.temperature).astype(w_c.dtype)
    dh = jnp.einsum("...v,vd->...d" if o.vd else "...v,dv->...d", dz, w_c, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...v,...d->vd" if o.vd else "...d,...v->dv", dz if o.vd else h, h if o.vd else dz,
                    preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw


def _fwd_local(w_c, h_n, y_n, o: Options):
    return jax.lax.map(lambda xs: _chunk_stats(w_c, xs[0], xs[1], o), (h_n, y_n))


def _bwd_local(w_c, h_n, y_n, gl_n, ge_n, o: Options, reduce=None):
    def body(dw, xs):
        dh, dw_chunk = _chunk_grads(w_c, *xs, o)
        return dw + dw_chunk, dh

    dw, dh_n = jax.lax.scan(body, jnp.zeros(w_c.shape, jnp.float32), (h_n, y_n, gl_n, ge_n))
    return (dw if reduce is None else reduce(dw)), dh_n


def row_mesh(rows: int):
    """(abstract mesh, its row axes) when a mesh in context splits `rows` over >1 devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, ()
    axes = tuple(a for a in mesh.axis_names if a in ROW_AXES)
    n = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if n <= 1 or rows % n:
        return None, ()
    return mesh, axes


def row_shards(rows: int) -> int:
    """How many ways the mesh in context splits `rows` (1 without one)."""
    mesh, axes = row_mesh(rows)
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)


def _weight_reduction(w_shape, axes):
    """(out spec of dw, the in-shard_map reduction of a device's partial dw): FSDP params
    get a float32 reduce-scatter straight into their shard, replicated ones an all-reduce."""
    fsdp = fsdp_mesh_in_context()
    spec = fsdp_spec(w_shape, fsdp) if fsdp is not None else P()
    split = [(d, a) for d, a in enumerate(spec) if a is not None]
    if not split or split[0][1] not in axes:
        return P(), lambda dw: jax.lax.psum(dw, axes)
    d, axis = split[0]
    others = tuple(a for a in axes if a != axis)

    def reduce(dw):
        if others:
            dw = jax.lax.psum(dw, others)
        return jax.lax.psum_scatter(dw, axis, scatter_dimension=d, tiled=True)

    return spec, reduce


def _vocab_axis(w_shape, vd: bool, axes) -> str | None:
    """The mesh axis FSDP splits the head's vocabulary dimension over, when it is one of
    the rows' axes (then each device computes its vocabulary slice for its group's rows:
    no full head on any device); else None."""
    fsdp = fsdp_mesh_in_context()
    if fsdp is None:
        return None
    axis = fsdp_spec(w_shape, fsdp)[0 if vd else 1]
    return axis if axis in axes else None


# ---- vocabulary-parallel chunks: w_local is this device's [D, V/k] (or [V/k, D]) slice,
# rows are gathered over the vocabulary axis A (the devices sharing one copy of the head)


def _gather_rows(x, axis: str):
    return jax.lax.all_gather(x, axis, axis=0, tiled=True)


def _own_rows(x_g, axis: str):
    b = x_g.shape[0] // jax.lax.axis_size(axis)
    return jax.lax.dynamic_slice_in_dim(x_g, jax.lax.axis_index(axis) * b, b, axis=0)


def _vp_logits(w_local, h, y, o: Options, axis: str):
    """Group rows' logit slices and the softmax statistics across the slices."""
    hg, yg = _gather_rows(h, axis), _gather_rows(y, axis)
    z = _logits(hg, w_local, o.vd) / o.temperature  # [B_group, u, V / k]
    vl = z.shape[-1]
    lo = jax.lax.axis_index(axis) * vl
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, axis=-1)), axis)
    lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(z - m[..., None]), axis=-1), axis))
    mine = (yg >= lo) & (yg < lo + vl)
    local_y = jnp.clip(yg - lo, 0, vl - 1)
    return hg, z, lse, mine, local_y


def _vp_fwd_local(w_local, h_n, y_n, o: Options, axis: str):
    def chunk(xs):
        _, z, lse, mine, local_y = _vp_logits(w_local, *xs, o, axis)
        zy = jax.lax.psum(jnp.where(mine, jnp.take_along_axis(z, local_y[..., None], axis=-1)[..., 0], 0.0), axis)
        ent = jnp.zeros_like(lse)
        if o.entropy:
            ent = lse - jax.lax.psum(jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1), axis)
        return _own_rows(zy - lse, axis), _own_rows(ent, axis)

    return jax.lax.map(chunk, (h_n, y_n))


def _vp_bwd_local(w_local, h_n, y_n, gl_n, ge_n, o: Options, axis: str, others: tuple):
    def body(dw, xs):
        h, y, gl, ge = xs
        hg, z, lse, mine, local_y = _vp_logits(w_local, h, y, o, axis)
        glg, geg = _gather_rows(gl, axis), _gather_rows(ge, axis)
        p = jnp.exp(z - lse[..., None])
        onehot = (jnp.arange(z.shape[-1], dtype=y.dtype) == local_y[..., None]) & mine[..., None]
        dz = glg[..., None] * (onehot.astype(jnp.float32) - p)
        if o.entropy and o.entropy_grad:
            ez = jax.lax.psum(jnp.sum(p * z, axis=-1), axis)
            dz = dz - geg[..., None] * p * (z - ez[..., None])
        dz = (dz / o.temperature).astype(w_local.dtype)
        dh_g = jnp.einsum("...v,vd->...d" if o.vd else "...v,dv->...d", dz, w_local, preferred_element_type=jnp.float32)
        dh = jax.lax.psum_scatter(dh_g, axis, scatter_dimension=0, tiled=True)  # sum over slices, own rows
        dw_chunk = jnp.einsum("...v,...d->vd" if o.vd else "...d,...v->dv", dz if o.vd else hg, hg if o.vd else dz,
                              preferred_element_type=jnp.float32)
        return dw + dw_chunk, dh.astype(h.dtype)

    dw, dh_n = jax.lax.scan(body, jnp.zeros(w_local.shape, jnp.float32), (h_n, y_n, gl_n, ge_n))
    return (jax.lax.psum(dw, others) if others else dw), dh_n


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_stats(w, h_nxBxuxD, y_nxBxu, o: Options):
    """(logp, entropy), each [n, B, u], of the chunks h [n, B, u, D] with targets y under
    the head w (see module docstring); differentiable in w and h."""
    return _stats_fwd(w, h_nxBxuxD, y_nxBxu, o)[0]


def _stats_fwd(w, h_n, y_n, o: Options):
    w_c = compute_copy(w, h_n.dtype)
    mesh, axes = row_mesh(h_n.shape[1])
    if mesh is None:
        out = _fwd_local(w_c, h_n, y_n, o)
    else:
        rows = P(None, axes)
        axis = _vocab_axis(w.shape, o.vd, axes)
        if axis is not None:
            body = functools.partial(_vp_fwd_local, o=o, axis=axis)
            w_spec = fsdp_spec(w.shape, fsdp_mesh_in_context())
        else:
            body, w_spec = functools.partial(_fwd_local, o=o), P()
        out = jax.shard_map(body, mesh=mesh, in_specs=(w_spec, rows, rows), out_specs=(rows, rows),
                            check_vma=False)(w_c, h_n, y_n)
    return out, (w, h_n, y_n)


def _stats_bwd(o: Options, res, g):
    w, h_n, y_n = res
    g_logp, g_ent = (x.astype(jnp.float32) for x in g)
    w_c = compute_copy(w, h_n.dtype)
    mesh, axes = row_mesh(h_n.shape[1])
    if mesh is None:
        dw, dh = _bwd_local(w_c, h_n, y_n, g_logp, g_ent, o)
    else:
        rows = P(None, axes)
        axis = _vocab_axis(w.shape, o.vd, axes)
        if axis is not None:
            spec = fsdp_spec(w.shape, fsdp_mesh_in_context())
            body = functools.partial(_vp_bwd_local, o=o, axis=axis, others=tuple(a for a in axes if a != axis))
            in_w = spec
        else:
            spec, reduce = _weight_reduction(w.shape, axes)
            body, in_w = functools.partial(_bwd_local, o=o, reduce=reduce), P()
        dw, dh = jax.shard_map(body, mesh=mesh, in_specs=(in_w, rows, rows, rows, rows), out_specs=(spec, rows),
                               check_vma=False)(w_c, h_n, y_n, g_logp, g_ent)
    return dw.astype(w.dtype), dh, None


chunked_stats.defvjp(_stats_fwd, _stats_bwd)


# --------------------------------------------------------------------------- embedding


def embed(table_VxD: jax.Array, tokens_BxT: jax.Array, dtype: Any) -> jax.Array:
    """table[tokens] in the compute dtype (`jnp.take`, as flax's nn.Embed). Under a mesh
    whose FSDP split of the table is along the vocabulary over one of the rows' axes, a
    vocabulary-parallel lookup (`embed_sharded`): no device ever holds the whole table or
    a whole-table gradient (Qwen3-8B's: 2.5 GB in float32), where the SPMD partitioner
    would gather the table and all-reduce a float32 table-sized scatter-add."""
    mesh, axes = row_mesh(tokens_BxT.shape[0])
    axis = None if mesh is None else _vocab_axis(table_VxD.shape, True, axes)
    if axis is None:
        return jnp.take(compute_copy(table_VxD, dtype), tokens_BxT, axis=0)
    o = _EmbedOptions(jnp.dtype(dtype).name, axis, axes, tuple(table_VxD.shape), jnp.dtype(table_VxD.dtype).name)
    return embed_sharded(table_VxD, tokens_BxT, o)


class _EmbedOptions(NamedTuple):
    dtype: str
    axis: str  # the mesh axis the table's vocabulary is split over
    axes: tuple  # the rows' axes
    table_shape: tuple
    table_dtype: str


_EMBED_CHUNK = 512  # time steps per chunk: the group's [B, 512, D] partial lookups stay small


def _time_chunks(x_BxT, t: int):
    B, T = x_BxT.shape[:2]
    n = -(-T // t)
    x = jnp.pad(x_BxT, ((0, 0), (0, n * t - T)) + ((0, 0),) * (x_BxT.ndim - 2))
    return x.reshape(B, n, t, *x_BxT.shape[2:]).swapaxes(0, 1)


def _embed_fwd_local(table_local, tokens, o: _EmbedOptions):
    vl = table_local.shape[0]
    lo = jax.lax.axis_index(o.axis) * vl
    T = tokens.shape[1]

    def chunk(tok):
        tg = _gather_rows(tok, o.axis)
        mine = (tg >= lo) & (tg < lo + vl)
        part = jnp.take(table_local, jnp.clip(tg - lo, 0, vl - 1), axis=0) * mine[..., None].astype(table_local.dtype)
        return jax.lax.psum_scatter(part, o.axis, scatter_dimension=0, tiled=True)  # one slice holds each token

    t = min(_EMBED_CHUNK, T)
    h_n = jax.lax.map(chunk, _time_chunks(tokens, t))
    return h_n.swapaxes(0, 1).reshape(tokens.shape[0], -1, table_local.shape[1])[:, :T]


def _embed_bwd_local(tokens, g, vl: int, o: _EmbedOptions):
    lo = jax.lax.axis_index(o.axis) * vl
    T = tokens.shape[1]
    t = min(_EMBED_CHUNK, T)

    def body(dtable, xs):
        tok, gc = xs
        tg, gg = _gather_rows(tok, o.axis), _gather_rows(gc, o.axis).astype(jnp.float32)
        mine = (tg >= lo) & (tg < lo + vl)
        idx = jnp.where(mine, tg - lo, vl)  # out of range: dropped
        return dtable.at[idx.reshape(-1)].add(gg.reshape(-1, gg.shape[-1]), mode="drop"), None

    zeros = jnp.zeros((vl, g.shape[-1]), jnp.float32)
    dtable, _ = jax.lax.scan(body, zeros, (_time_chunks(tokens, t), _time_chunks(g, t)))
    others = tuple(a for a in o.axes if a != o.axis)
    return jax.lax.psum(dtable, others) if others else dtable


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_sharded(table_VxD, tokens_BxT, o: _EmbedOptions):
    """The vocabulary-parallel lookup of `embed`: each device gathers its group's tokens
    (over o.axis), looks up those in its vocabulary slice and a reduce-scatter hands every
    device its own rows; the backward pass gathers the group's gradient rows and
    scatter-adds them, in float32, into the device's slice of the table's gradient."""
    return _embed_fwd(table_VxD, tokens_BxT, o)[0]


def _embed_specs(table_shape, o: _EmbedOptions):
    return fsdp_spec(table_shape, fsdp_mesh_in_context()), P(o.axes)


def _embed_fwd(table, tokens, o: _EmbedOptions):
    t_spec, rows = _embed_specs(table.shape, o)
    mesh = jax.sharding.get_abstract_mesh()
    h = jax.shard_map(functools.partial(_embed_fwd_local, o=o), mesh=mesh, in_specs=(t_spec, rows),
                      out_specs=rows, check_vma=False)(compute_copy(table, o.dtype), tokens)
    return h, tokens


def _embed_bwd(o: _EmbedOptions, tokens, g):
    t_spec, rows = _embed_specs(o.table_shape, o)
    mesh = jax.sharding.get_abstract_mesh()
    vl = o.table_shape[0] // mesh.shape[o.axis]
    dtable = jax.shard_map(functools.partial(_embed_bwd_local, vl=vl, o=o), mesh=mesh, in_specs=(rows, rows),
                           out_specs=t_spec, check_vma=False)(tokens, g)
    return dtable.astype(o.table_dtype), None


embed_sharded.defvjp(_embed_fwd, _embed_bwd)


# --------------------------------------------------------------------------- decoding


def vocab_parallel_logits_VxR(w: jax.Array, h_RxD: jax.Array, *, vd: bool) -> jax.Array | None:
    """Decode-step logits [V, R] (float32, vocabulary-major like the sampler's) from a head
    whose vocabulary FSDP splits over one of the rows' axes, without gathering it: each
    device gathers its group's hidden rows ([R_group, D], small), multiplies them by its
    vocabulary slice and an all-to-all hands every device all V logits of its own rows
    (exact: a permutation of values). None when the mesh and params in context do not
    call for it (then the caller uses the whole head)."""
    mesh, axes = row_mesh(h_RxD.shape[0])
    axis = None if mesh is None else _vocab_axis(w.shape, vd, axes)
    if axis is None:
        return None
    spec = fsdp_spec(w.shape, fsdp_mesh_in_context())

    def local(w_local, h):
        hg = _gather_rows(h, axis)
        z = jnp.einsum("vd,rd->vr" if vd else "dv,rd->vr", w_local, hg, preferred_element_type=jnp.float32)
        return jax.lax.all_to_all(z, axis, split_axis=1, concat_axis=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(axes)), out_specs=P(None, axes),
                         check_vma=False)(compute_copy(w, h_RxD.dtype), h_RxD)

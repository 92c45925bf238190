"""Mesh and sharding helpers shared by the RL update (rubrax.rl.step), the supervised
trainer (rubrax.train.trainer) and the sampler (rubrax.policy).

The default mesh is 1-D, one axis "data" over the devices (all hosts' when
`jax.distributed` is initialised): batches are split along their row axis, params are
replicated or (FSDP) each leaf is split along its largest axis divisible by the device
count, optimizer moments land where their parameter does.

Hybrid sharding: `make_mesh(fsdp_axis_size=F)` makes a 2-D ("data", "fsdp") mesh of
(N / F) x F devices, each "fsdp" row a block of consecutive devices (one node's, since
jax.devices() lists them process by process). FSDP then splits parameters over "fsdp"
only (gathers stay inside a node, on its fast links) and replicates them across "data"
(only gradients cross nodes); batches are split over both axes, every device its own
rows. The single-axis default is F = N.

Multi-host: every process holds the same host values of the state and builds only its
own shards (`put_global`); each process feeds its own rows of a batch (`local_rows`,
`shard_batch`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
ROW_AXES = (DATA_AXIS, FSDP_AXIS)  # the axes a batch's rows are split over, where the mesh has them


def make_mesh(devices: Any = None, *, fsdp_axis_size: int | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all, on all hosts), or with
    fsdp_axis_size F a 2-D ("data", "fsdp") mesh of shape (N / F, F)."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp_axis_size is None:
        return Mesh(np.asarray(devices), (DATA_AXIS,))
    if fsdp_axis_size < 1 or len(devices) % fsdp_axis_size:
        raise ValueError(f"fsdp_axis_size={fsdp_axis_size} must divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // fsdp_axis_size, fsdp_axis_size)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def params_mesh(params: Any) -> Mesh | None:
    """The mesh that `params` are placed on (NamedSharding over more than one device), or
    None."""
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def row_axes(mesh: Mesh) -> str | tuple[str, ...]:
    """The mesh axes a batch's row axis is split over: all of them."""
    return mesh.axis_names[0] if len(mesh.axis_names) == 1 else tuple(mesh.axis_names)


def fsdp_axis(mesh: Mesh) -> str:
    """The axis FSDP splits parameters over: "fsdp" on a 2-D mesh, else "data"."""
    return FSDP_AXIS if FSDP_AXIS in mesh.axis_names else mesh.axis_names[0]


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """The FSDP rule for one leaf: split over `fsdp_axis(mesh)` along its largest dimension
    divisible by that axis' size (the first such, on ties), else replicated."""
    axis = fsdp_axis(mesh)
    size = mesh.shape[axis]
    if size > 1:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % size == 0:
                return P(*[axis if i == d else None for i in range(len(shape))])
    return P()


def param_sharding(params: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Replicated params, or (fsdp) each leaf split over `fsdp_axis(mesh)` along its
    largest dimension divisible by that axis' size (replicated over the other axis;
    `fsdp_spec`). Works on arrays and on jax.ShapeDtypeStructs alike."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh) if fsdp else P()), params)


def sharded_mesh(shardings: Any) -> Mesh | None:
    """The mesh of a PyTree of NamedShardings when some leaf is split (FSDP), else None."""
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(s, NamedSharding) and any(a is not None for a in s.spec):
            return s.mesh
    return None


_FSDP_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("rubrax_fsdp_mesh", default=None)


@contextlib.contextmanager
def fsdp_params(mesh: Mesh | None):
    """While a step is traced: its params are FSDP-sharded over `mesh` (param_sharding with
    fsdp=True; None: they are not). The models' `compute_copy` reads it."""
    token = _FSDP_MESH.set(mesh)
    try:
        yield
    finally:
        _FSDP_MESH.reset(token)


def jit_keyed_by_fsdp(static_argnames: tuple[str, ...] = ()):
    """`jax.jit(fun, static_argnames=...)` whose compilation cache also keys on the
    `fsdp_params` mesh in context, for functions whose trace reads it (the models' weight
    casts, vocabulary-parallel lookup and head). jit's own cache keys on the abstract mesh
    in context but not on this flag, so a function traced for a data-parallel step would
    be reused, unchanged, inside an FSDP step on the same mesh."""

    def decorate(fun):
        def impl(*args, _fsdp_mesh=None, **kwargs):
            return fun(*args, **kwargs)

        jitted = jax.jit(impl, static_argnames=tuple(static_argnames) + ("_fsdp_mesh",))

        @functools.wraps(fun)
        def call(*args, **kwargs):
            return jitted(*args, _fsdp_mesh=_FSDP_MESH.get(), **kwargs)

        return call

    return decorate


def fsdp_mesh_in_context() -> Mesh | None:
    """The mesh of `fsdp_params` in context (the params being traced are split over it)."""
    return _FSDP_MESH.get()


def compute_copy(w: jax.Array, dtype: Any) -> jax.Array:
    """`w.astype(dtype)`, and under `fsdp_params` pinned to the FSDP rule's sharding, so the
    conversion runs on each device's own shard and what XLA gathers for the matmul is the
    compute-dtype copy (bf16 over float32 master weights: half the bytes, no full float32
    copy). XLA's partitioner mostly chooses this order by itself (the compiled update of
    the paper recipe is the same with and without the pin); the pin keeps it so. Same
    values: conversion and gathering commute. Note that XLA:CPU runs bf16 collectives in
    float32, so CPU-compiled plans still show float32 gathers that accelerators do not do.
    The vocabulary-sized weights go further (rubrax.models.head: never gathered at all)."""
    w_c = w.astype(dtype)
    mesh = _FSDP_MESH.get()
    if mesh is None or w.dtype == w_c.dtype or w.ndim == 0:
        return w_c
    spec = fsdp_spec(w.shape, mesh)
    if spec == P():
        return w_c
    return jax.lax.with_sharding_constraint(w_c, NamedSharding(mesh, spec))


def state_sharding(state: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Shardings for a train state (a dataclass with `params` and `opt_state`, RL's or the
    supervised one). The FSDP rule depends on a leaf's shape only, so Adam moments land
    exactly where their parameter does; every other field (step, key) is replicated."""
    replicated = NamedSharding(mesh, P())
    fields = {f.name: replicated for f in dataclasses.fields(state)}
    fields["params"] = param_sharding(state.params, mesh, fsdp=fsdp)
    fields["opt_state"] = param_sharding(state.opt_state, mesh, fsdp=fsdp)
    return type(state)(**fields)


def batch_sharding(mesh: Mesh, *, axis: int = 0) -> NamedSharding:
    """Arrays split along `axis` (the row axis; 1 for [A, M, ...] accumulation batches)."""
    return NamedSharding(mesh, P(*([None] * axis), row_axes(mesh)))


def local_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a `rows`-row global batch that this process feeds (multi-host): those of
    its own devices under `batch_sharding(mesh)` (one contiguous block, since make_mesh
    orders devices by process)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    spans = sorted({(i[0].start or 0, rows if i[0].stop is None else i[0].stop) for i in index.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"this process's rows of the batch are not contiguous: {spans}")
    return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch on the mesh, split along the batch axis.

    Single host: `batch` is the global batch. Multi-host: each process passes its own
    rows and the global array is assembled from the process-local pieces.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)



def put_global(tree: Any, shardings: Any) -> Any:
    """device_put onto (possibly multi-host) shardings. Single process: plain device_put.
    Several processes: every process holds the same host values (same init / checkpoint),
    and each builds only its own shards (`jax.make_array_from_callback`); device_put
    itself refuses arrays already committed to a local device there."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)

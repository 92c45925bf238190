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

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


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


def param_sharding(params: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Replicated params, or (fsdp) each leaf split over `fsdp_axis(mesh)` along its
    largest dimension divisible by that axis' size (replicated over the other axis).
    Works on arrays and on jax.ShapeDtypeStructs alike."""
    axis = fsdp_axis(mesh)
    size = mesh.shape[axis]

    def one(x):
        if not fsdp or size == 1:
            return NamedSharding(mesh, P())
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % size == 0:
                spec = [None] * x.ndim
                spec[d] = axis
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, params)


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

"""Mesh and sharding helpers shared by the RL update (rubrax.rl.step) and the supervised
trainer (rubrax.train.trainer).

A 1-D `jax.sharding.Mesh` named "data" spans the devices (all hosts' when
`jax.distributed` is initialised): batches are split along their row axis, params are
replicated or (FSDP) each leaf is split along its largest axis divisible by the device
count, optimizer moments land where their parameter does. Multi-host: every process
holds the same host values of the state and builds only its own shards (`put_global`);
each process feeds its own rows of a batch (`local_rows`, `shard_batch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all, on all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def param_sharding(params: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Replicated params, or (fsdp) each leaf split along its largest axis divisible by the mesh."""

    def one(x):
        if not fsdp or mesh.size == 1:
            return NamedSharding(mesh, P())
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % mesh.size == 0:
                spec = [None] * x.ndim
                spec[d] = DATA_AXIS
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
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


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

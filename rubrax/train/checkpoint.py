"""Orbax-backed checkpoints: one folder per step holding a PyTree and a JSON dict.

    save(ckpt_dir, step, pytree, extra)        -> writes <ckpt_dir>/<step>/{state,extra}
    restore(ckpt_dir, target, step=None)       -> (pytree, extra); step None = latest
    latest_step(ckpt_dir)                      -> int | None

Writes are atomic (orbax writes to a temporary folder and renames it when complete),
so a crash mid-save leaves the previous checkpoints intact and `latest_step` never
points at a half-written step. Saves are synchronous: when `save` returns, the step
is on disk.

`target` fixes the tree structure, shapes, dtypes and shardings of the restored
arrays (pass the freshly initialised state, or a tree of `jax.ShapeDtypeStruct`).
`extra` is for small JSON-able host state: data-loader position, config, RNG seed,
metrics. It must not hold arrays.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_EXTRA = "extra"


def _manager(ckpt_dir: str | os.PathLike, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(ckpt_dir)),
        options=options,
        item_names=(_STATE, _EXTRA),
    )


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(extra))
    except TypeError as err:
        raise TypeError(f"checkpoint extra must be JSON-serialisable (no arrays): {err}") from None


def save(
    ckpt_dir: str | os.PathLike,
    step: int,
    pytree: Any,
    extra: dict[str, Any] | None = None,
    *,
    max_to_keep: int | None = None,
    overwrite: bool = False,
) -> str:
    """Saves `pytree` (arrays) and `extra` (JSON dict) as step `step`; returns the step folder.

    `max_to_keep` deletes the oldest steps beyond that many (None keeps all).
    An existing step raises FileExistsError unless `overwrite=True`.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    extra = _jsonable(dict(extra or {}))
    if jax.process_count() == 1:
        # Host copies: orbax would otherwise keep references to donated device buffers.
        pytree = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, pytree)
    # Multi-host: arrays span other processes' devices, so each process hands orbax its
    # global arrays and writes its own shards (ckpt_dir must be on a shared filesystem);
    # the save is synchronous, so nothing is read after the next step donates them.
    with _manager(ckpt_dir, max_to_keep) as mngr:
        if step in mngr.all_steps():
            if not overwrite:
                raise FileExistsError(f"checkpoint step {step} already exists in {ckpt_dir}")
            mngr.delete(step)
        mngr.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(pytree), _EXTRA: ocp.args.JsonSave(extra)}
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return os.path.join(os.fspath(ckpt_dir), str(step))


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    """The largest complete step in `ckpt_dir`, or None if there is none (or no folder)."""
    if not os.path.isdir(ckpt_dir):
        return None
    with _manager(ckpt_dir) as mngr:
        return mngr.latest_step()


def all_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """All complete steps in `ckpt_dir`, ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    with _manager(ckpt_dir) as mngr:
        return sorted(mngr.all_steps())


def restore(
    ckpt_dir: str | os.PathLike, target_pytree: Any, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` (default: latest) into the structure of `target_pytree`.

    Returns `(pytree, extra)`. Raises FileNotFoundError when there is no such step.
    """
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint folder {ckpt_dir}")
    with _manager(ckpt_dir) as mngr:
        steps = mngr.all_steps()
        if step is None:
            step = mngr.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        elif int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}; available: {sorted(steps)}")
        abstract = jax.tree.map(_abstract, target_pytree)
        out = mngr.restore(
            int(step),
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
    return out[_STATE], dict(out[_EXTRA] or {})


def restore_extra(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Only the JSON `extra` of a step (default: latest), e.g. to rebuild a config first."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint folder {ckpt_dir}")
    with _manager(ckpt_dir) as mngr:
        step = mngr.latest_step() if step is None else int(step)
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}")
        out = mngr.restore(step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
    return dict(out[_EXTRA] or {})


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        # Host arrays come back as single-device jax arrays of the same dtype.
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return x


def restore_item(ckpt_dir: str | os.PathLike, name: str, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """One top-level entry of a saved state (e.g. "params"), as numpy arrays, without a
    target: shapes and dtypes come from the checkpoint's own metadata, so no optimizer or
    model has to be rebuilt first (export, evaluation). Returns (tree, extra, step)."""
    extra = restore_extra(ckpt_dir, step)
    if step is None:
        step = latest_step(ckpt_dir)
    path = os.path.join(os.path.abspath(os.fspath(ckpt_dir)), str(int(step)), _STATE)
    ckptr = ocp.PyTreeCheckpointer()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the step-level metadata file is not in the item folder, as orbax warns: expected
    try:
        meta = ckptr.metadata(path)
    finally:
        absl.setLevel(level)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    if not isinstance(tree, dict) or name not in tree:
        raise KeyError(f"{path}: the saved state has no entry {name!r}; entries: {sorted(tree) if isinstance(tree, dict) else tree}")
    item = {name: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[name])}
    args = {name: jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree[name])}
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    return out[name], extra, int(step)

"""Orbax-backed checkpoints: one folder per step holding a PyTree and a JSON dict.

    save(ckpt_dir, step, pytree, extra)        -> writes <ckpt_dir>/<step>/{state,extra}
    restore(ckpt_dir, target, step=None)       -> (pytree, extra); step None = latest
    latest_step(ckpt_dir)                      -> int | None

Writes are atomic (orbax writes to a temporary folder and renames it when complete),
so a crash mid-save leaves the previous checkpoints intact. Saves are synchronous: when
`save` returns, the step is on disk.

Fail safe: only committed steps count (a step folder holding orbax's commit record
`_CHECKPOINT_METADATA` and both items); a stray or half-copied `checkpoints/25/` is
ignored, with a warning. A committed step that cannot be read raises
`CheckpointCorrupt` naming the step folder and the file. `restore(step=None)` then
falls back automatically to the newest earlier step that reads, with a warning naming
the corrupt one (`fallback=False` raises instead); a resumed run redoes the steps
after it, so nothing is lost but time. A checkpoint whose arrays do not fit the target
(another model size) raises `CheckpointMismatch` naming the first parameter that
differs, and never falls back.

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

log = logging.getLogger("rubrax.checkpoint")

_STATE = "state"
_EXTRA = "extra"
_COMMIT = "_CHECKPOINT_METADATA"  # written by orbax when the step is finalised


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; `path` is the step folder or file at fault."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class CheckpointCorrupt(CheckpointError):
    pass


class CheckpointMismatch(CheckpointError):
    pass


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


def _committed(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, _COMMIT)) and all(os.path.isdir(os.path.join(step_dir, i)) for i in (_STATE, _EXTRA))


def all_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """All committed steps in `ckpt_dir`, ascending (stray step folders are skipped, with a warning)."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = []
    for name in os.listdir(ckpt_dir):
        if name.isdigit() and os.path.isdir(os.path.join(ckpt_dir, name)):
            if _committed(os.path.join(ckpt_dir, name)):
                steps.append(int(name))
            else:
                log.warning("%s: not a committed checkpoint (no %s or items); ignored", os.path.join(os.fspath(ckpt_dir), name), _COMMIT)
    return sorted(steps)


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    """The largest committed step in `ckpt_dir`, or None if there is none (or no folder)."""
    steps = all_steps(ckpt_dir)
    return steps[-1] if steps else None


def restore(
    ckpt_dir: str | os.PathLike, target_pytree: Any, step: int | None = None, *, fallback: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` (default: the latest committed one) into the structure of `target_pytree`.

    Returns `(pytree, extra)`. Raises FileNotFoundError when there is no such step,
    CheckpointMismatch when the arrays do not fit the target, CheckpointCorrupt when the
    step cannot be read. With step=None and `fallback`, a corrupt step is skipped (warned)
    for the newest earlier one that reads: callers resume from `extra` (its "step").
    """
    steps = all_steps(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint folder {ckpt_dir}")
    if step is not None:
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}; available: {steps}")
        return _restore_step(ckpt_dir, int(step), target_pytree)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    for i, s in enumerate(reversed(steps)):
        try:
            return _restore_step(ckpt_dir, s, target_pytree)
        except CheckpointCorrupt as err:
            if not fallback or i == len(steps) - 1:
                raise
            log.warning("%s; falling back to the previous checkpoint, step %d", err, steps[-2 - i])
    raise AssertionError("unreachable")


def _restore_step(ckpt_dir: str | os.PathLike, step: int, target_pytree: Any) -> tuple[Any, dict[str, Any]]:
    step_dir = os.path.join(os.fspath(ckpt_dir), str(step))
    extra = _read_extra(step_dir)
    _check_fits(step_dir, target_pytree)
    abstract = jax.tree.map(_abstract, target_pytree)
    try:
        with _manager(ckpt_dir) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))
    except Exception as err:  # orbax / tensorstore errors on damaged array files
        raise CheckpointCorrupt(os.path.join(step_dir, _STATE), f"array data unreadable ({type(err).__name__}: {_first_line(err)})") from err
    return out[_STATE], extra


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _read_extra(step_dir: str) -> dict[str, Any]:
    path = os.path.join(step_dir, _EXTRA, "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            extra = json.load(f)
    except FileNotFoundError:
        raise CheckpointCorrupt(path, "missing (the checkpoint's JSON extra)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(path, f"not valid JSON ({err})") from None
    if not isinstance(extra, dict):
        raise CheckpointCorrupt(path, f"expected a JSON object, got {type(extra).__name__}")
    return extra


def _leaf_name(path: tuple) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
    return ".".join(parts)


def _check_fits(step_dir: str, target_pytree: Any) -> None:
    """CheckpointMismatch naming the first parameter whose shape or presence differs."""
    from etils import epath

    state_dir = os.path.join(step_dir, _STATE)
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        tree = getattr(meta, "tree", meta)
        stored = {_leaf_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(m, "shape")}
    except Exception as err:
        raise CheckpointCorrupt(os.path.join(state_dir, "_METADATA"), f"unreadable ({type(err).__name__}: {_first_line(err)})") from err
    wanted = {_leaf_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(target_pytree)[0]}
    for name, shape in wanted.items():
        if name not in stored:
            raise CheckpointMismatch(state_dir, f"parameter {name!r} is not in the checkpoint (another model or layer layout?)")
        if stored[name] != shape:
            raise CheckpointMismatch(state_dir, f"parameter {name!r} has shape {stored[name]} in the checkpoint but {shape} in the model")
    extra_names = sorted(set(stored) - set(wanted))
    if extra_names:
        raise CheckpointMismatch(state_dir, f"the checkpoint has parameters the model lacks: {extra_names[:5]}")


def restore_extra(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Only the JSON `extra` of a step (default: latest), e.g. to rebuild a config first."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint folder {ckpt_dir}")
    steps = all_steps(ckpt_dir)
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None or step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}")
    return _read_extra(os.path.join(os.fspath(ckpt_dir), str(step)))


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

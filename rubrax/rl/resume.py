"""Checkpoints of the RL loop and resuming from them.

Every `checkpoint_every` steps and at the end, the TrainState goes to
<out_dir>/checkpoints/<step> (orbax, via rubrax.train.checkpoint); with
overlap="one_step_off_policy" the batch already sampled for the next step goes to
<out_dir>/pending/<step>.npz beside it, so a resumed run is the same run. A run started
with the same out_dir resumes from the latest checkpoint; keys and data order being
functions of the step, it reproduces the uninterrupted run step for step.
Multi-host: orbax saves/restores global arrays from every process; process 0 alone writes
and prunes the pending batches (identical on every host).

The run folder (rubrax.runs): process 0 holds its lock for the run; the fingerprint
(`run.json`: the RL, optimizer, sampling and loop settings, the model config, the
reward's name, the caller's run_config and the prompt file's hash) is checked by every
process before anything is written. `SAFE_ON_RESUME` lists what `allow_changed` may
accept; stop_after, progress, tensorboard, wandb_project, export_dir and out_dir are not part of it.
A corrupt latest checkpoint falls back to the previous good one (rubrax.train.checkpoint),
with a warning; the steps after it are redone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from rubrax.rl.rollouts import Rollouts

log = logging.getLogger("rubrax.rl")


SAFE_ON_RESUME = ("loop.total_steps", "loop.checkpoint_every", "loop.keep_checkpoints", "loop.eval_every",
                  "loop.reward_timeout_s", "loop.max_invalid_steps", "loop.num_devices", "run_config.loop.*")
_NOT_FINGERPRINTED = ("stop_after", "progress", "tensorboard", "wandb_project", "out_dir", "restart", "allow_changed", "export_dir")


def run_inputs(*, rl: Any, optim: Any, sample: Any, loop: Any, model_config: Any, reward_fn: Any,
               prompts: Any, run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fingerprint of what determines an RL run's outputs (rubrax.runs.fingerprint)."""
    import dataclasses

    from rubrax import runs

    loop_cfg = {k: v for k, v in dataclasses.asdict(loop).items() if k not in _NOT_FINGERPRINTED}
    config = {"rl": rl, "optim": optim, "sample": sample, "loop": loop_cfg, "model": model_config,
              "reward": getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", type(reward_fn).__name__),
              "run_config": {k: v for k, v in dict(run_config or {}).items() if k not in _NOT_FINGERPRINTED}}
    files = {"prompts": os.fspath(prompts)} if isinstance(prompts, str | os.PathLike) else {}
    return runs.fingerprint(config, files)


def _folder_kwargs(loop: Any) -> dict[str, Any]:
    names = ("checkpoints", "pending", "metrics.jsonl", "tb") + ((loop.export_dir,) if getattr(loop, "export_dir", None) else ())
    outputs = [os.path.join(loop.out_dir, name) for name in names]
    return dict(folder=True, outputs=outputs, safe=SAFE_ON_RESUME, restart=loop.restart, allow_changed=loop.allow_changed)


def check_run_folder(loop: Any, fp: Mapping[str, Any]) -> None:
    """The fingerprint check alone, read-only (InputsChanged early, before any compilation)."""
    from rubrax import runs

    if loop.out_dir:  # process 0 holds the lock of a multi-host run: only it asks who else does
        runs.check_run(loop.out_dir, fp, **_folder_kwargs(loop), probe_lock=jax.process_index() == 0)


def open_run_folder(loop: Any, fp: Mapping[str, Any]) -> Any:
    """Locks out_dir (process 0) and checks its fingerprint; returns the lock (or None)."""
    from rubrax import runs

    if not loop.out_dir:
        return None
    kwargs = _folder_kwargs(loop)
    if jax.process_index() == 0:
        lock = runs.open_run(loop.out_dir, fp, **kwargs)
    else:
        lock = None
        if not loop.restart:  # process 0 may have just written the new fingerprint: then equal
            runs.check_run(loop.out_dir, fp, **kwargs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rubrax run folder checked")  # nobody reads what process 0 removes
    return lock


class RunCheckpoints:
    """The checkpoints (and pending batches) of one RL run under `out_dir` (None: none)."""

    def __init__(self, out_dir: str | None, *, keep: int | None, run_config: Mapping[str, Any] | None):
        self.ckpt_dir = os.path.join(out_dir, "checkpoints") if out_dir else None
        self.pending_dir = os.path.join(out_dir, "pending") if out_dir else None
        self.keep, self.run_config = keep, dict(run_config or {})

    def restore(self, state: Any, *, with_pending: bool, total_steps: int) -> tuple[Any, int, Rollouts | None]:
        """(state, first step to run, pre-sampled batch of that step or None)."""
        from rubrax.train import checkpoint

        if not self.ckpt_dir or checkpoint.latest_step(self.ckpt_dir) is None:
            return state, 0, None
        state, extra = checkpoint.restore(self.ckpt_dir, state)
        start = int(extra["step"])
        log.info("resumed from %s at step %d", self.ckpt_dir, start)
        pending = None
        if with_pending and start < total_steps:
            pending = Rollouts.from_npz(os.path.join(self.pending_dir, f"{start}.npz"))
        return state, start, pending

    def save(self, done: int, state: Any, pending: Rollouts | None) -> None:
        """Checkpoint after `done` steps (+ the batch pre-sampled for step `done`)."""
        from rubrax.train import checkpoint

        if not self.ckpt_dir:
            return
        if pending is not None and jax.process_index() == 0:  # identical on every host
            os.makedirs(self.pending_dir, exist_ok=True)
            pending.to_npz(os.path.join(self.pending_dir, f"{done}.npz"))
        checkpoint.save(self.ckpt_dir, done, state, {"step": done, "config": self.run_config},
                        max_to_keep=self.keep, overwrite=True)
        kept = checkpoint.all_steps(self.ckpt_dir)  # every process: orbax syncs them
        if jax.process_index() == 0:
            prune_pending(self.pending_dir, kept)


def prune_pending(pending_dir: str, kept_steps: Sequence[int]) -> None:
    """Removes pre-sampled batches whose checkpoint orbax has deleted (keep_checkpoints)."""
    if not os.path.isdir(pending_dir):
        return
    for name in os.listdir(pending_dir):
        if name.endswith(".npz") and name[:-4].isdigit() and int(name[:-4]) not in kept_steps:
            os.remove(os.path.join(pending_dir, name))

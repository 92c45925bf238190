"""Checkpoints of the RL loop and resuming from them.

Every `checkpoint_every` steps and at the end, the TrainState goes to
<out_dir>/checkpoints/<step> (orbax, via rubrax.train.checkpoint); with
overlap="one_step_off_policy" the batch already sampled for the next step goes to
<out_dir>/pending/<step>.npz beside it, so a resumed run is the same run. A run started
with the same out_dir resumes from the latest checkpoint; keys and data order being
functions of the step, it reproduces the uninterrupted run step for step.
Multi-host: orbax saves/restores global arrays from every process; process 0 alone writes
and prunes the pending batches (identical on every host).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from rubrax.rl.rollouts import Rollouts

log = logging.getLogger("rubrax.rl")


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

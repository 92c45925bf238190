"""The RL loop's metrics logger: JSONL (+TensorBoard, +W&B) and a progress bar, host-side only.

Exact resume: a run resumed from the checkpoint of step k first cuts metrics.jsonl back
to what that checkpoint covers (training records of steps < k, evaluation records of
steps <= k; they are written in that order) and tells TensorBoard to drop its events
from step k on; `evaluated` says which evaluations are already there, so that one that
did not complete (killed after its checkpoint) runs again. The file then equals, line
for line, the one of an uninterrupted run (time fields aside).
Multi-host: process 0 alone writes metrics and W&B (every process reads `evaluated`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger("rubrax.rl")


class RunLogger:
    """JSONL (+TensorBoard, +W&B) metrics, a progress bar; host-side only."""

    def __init__(self, loop: Any, start: int, run_config: Mapping[str, Any] | None):
        from tqdm.auto import tqdm

        self.writer = None
        primary = jax.process_index() == 0  # multi-host: one process writes metrics / W&B
        path = os.path.join(loop.out_dir, "metrics.jsonl") if loop.out_dir else None
        kept = resume_metrics(path, start, cut=primary) if path else []
        self.evaluated = {r["step"] for r in kept if is_eval(r)}
        if loop.out_dir and primary:
            from rubrax.train.metrics import MetricsWriter

            tb = os.path.join(loop.out_dir, "tb") if loop.tensorboard else None
            self.writer = MetricsWriter(path, tensorboard_dir=tb, purge_step=start if os.path.isdir(tb or "") else None)
            for r in kept:  # TensorBoard dropped step `start` on; an evaluation at it is kept
                if r["step"] >= start:
                    self.writer.write_tensorboard(r["step"], r)
        self.wandb = None
        if loop.wandb_project and primary:
            try:
                import wandb
            except ImportError:
                log.warning("wandb_project=%r but wandb is not installed; logging to JSONL/TensorBoard only", loop.wandb_project)
            else:
                self.wandb = wandb.init(project=loop.wandb_project, config=dict(run_config or {}), resume="allow")
        self.bar = tqdm(total=loop.total_steps, initial=start, disable=not loop.progress, desc="rl")
        self.history: list[dict[str, Any]] = []

    def eval_due(self, loop: Any, step: int) -> bool:
        """Whether an evaluation belongs at `step` (every eval_every steps, and at the end)."""
        return step > 0 and ((loop.eval_every and step % loop.eval_every == 0) or step == loop.total_steps)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        self.history.append({"step": step, **record})
        if self.writer:
            self.writer.write(step, record)
        if self.wandb:
            self.wandb.log(record, step=step)
        if "reward_mean" in record:
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record.get('kl', 0.0):.4f}")

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def is_eval(record: Mapping[str, Any]) -> bool:
    return any(str(k).startswith("eval/") for k in record)


def resume_metrics(path: str, start: int, *, cut: bool = True) -> list[dict[str, Any]]:
    """The records of `path` that the checkpoint of step `start` covers; with `cut`, the file
    is truncated to them (rubrax.runs.cut_jsonl)."""
    from rubrax.runs import cut_jsonl

    def covered(rec: Mapping[str, Any]) -> bool:
        step = rec.get("step")
        return isinstance(step, int) and (step <= start if is_eval(rec) else step < start)

    return cut_jsonl(path, covered, truncate=cut)

"""The RL loop's metrics logger: JSONL (+TensorBoard, +W&B) and a progress bar, host-side only.

Multi-host: process 0 alone writes metrics and W&B.
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
        if loop.out_dir and primary:
            from rubrax.train.metrics import MetricsWriter

            tb = os.path.join(loop.out_dir, "tb") if loop.tensorboard else None
            self.writer = MetricsWriter(os.path.join(loop.out_dir, "metrics.jsonl"), tensorboard_dir=tb)
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

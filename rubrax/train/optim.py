"""Optimizer and learning-rate schedules for the supervised trainers (SFT, Bradley-Terry).

    lr(s) = peak * s / W                                  for s < W   (linear warmup)
    cosine:   lr(s) = end + (peak - end) * (1 + cos(pi * (s - W) / (S - W))) / 2
    constant: lr(s) = peak
    linear:   lr(s) = peak + (end - peak) * (s - W) / (S - W)

with W warmup steps (`warmup_steps`, or `warmup_ratio * S`), S total optimizer
updates and end = `end_lr_ratio * peak`. The paper's BT reward model uses cosine with
warmup ratio 0.1 and peak 1e-5; its GRPO runs use warmup 0.1 then constant.

The optimizer is AdamW with optional global-norm clipping, and parameters can be
frozen with a boolean mask PyTree (frozen leaves get no update, no weight decay and no
optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW + schedule + clipping. `max_grad_norm=None` turns clipping off.

    `weight_decay` applies to parameters with ndim >= 2 only (matrices, embeddings);
    norms' scales and biases are not decayed.
    """

    learning_rate: float = 1e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        from rubrax.validate import check_float, check_int

        check_float("OptimConfig.learning_rate", self.learning_rate, low=0, open_low=True)
        check_float("OptimConfig.warmup_ratio", self.warmup_ratio, low=0, high=1, open_high=True)
        check_int("OptimConfig.warmup_steps", self.warmup_steps, low=0, optional=True)
        check_float("OptimConfig.end_lr_ratio", self.end_lr_ratio, low=0, high=1)
        check_float("OptimConfig.weight_decay", self.weight_decay, low=0)
        for name in ("b1", "b2"):
            check_float(f"OptimConfig.{name}", getattr(self, name), low=0, high=1, open_high=True)
        check_float("OptimConfig.eps", self.eps, low=0)
        check_float("OptimConfig.max_grad_norm", self.max_grad_norm, low=0, open_low=True, optional=True)


def num_warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer-update count (see module doc)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    warmup = num_warmup_steps(cfg, total_steps)
    decay = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(peak, end, decay)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, trainable_mask: Any | None = None
) -> optax.GradientTransformation:
    """AdamW(schedule) after global-norm clipping; frozen leaves (mask False) are left alone.

    The trainer zeroes frozen gradients before this transformation, so clipping sees
    only the trainable parameters' gradient norm.
    """
    tx = optax.adamw(
        make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    if cfg.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    if trainable_mask is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

"""Training the Bradley-Terry reward model with the supervised trainer.

The model, its loss and its reward function live in `rubrax.rewards.bradley_terry`;
this workflow runs `pair_loss` / `pair_eval` through `rubrax.train.trainer.train`
(checkpoints, exact resume, held-out evaluation, metrics).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from rubrax.models import ModelConfig
from rubrax.rewards.bradley_terry import BTConfig, pair_eval, pair_loss, trainable_mask
from rubrax.train.trainer import SupervisedResult, TrainConfig, train


def train_reward_model(
    params: Mapping[str, Any],
    config: ModelConfig,
    train_pairs: Mapping[str, np.ndarray],
    train_cfg: TrainConfig,
    bt: BTConfig = BTConfig(),
    *,
    eval_pairs: Mapping[str, np.ndarray] | None = None,
    **train_kwargs: Any,
) -> SupervisedResult:
    """Trains BT params on token arrays {tokens [N,2,T], mask [N,2,T], margin [N]?}.

    `train_kwargs` go to `rubrax.train.trainer.train` (ckpt_dir, metrics_path, stop_at, ...).
    Held-out metrics: eval/accuracy (pair accuracy) and eval/loss.
    """
    return train(
        functools.partial(pair_loss, config=config, bt=bt),
        params,
        train_pairs,
        train_cfg,
        eval_fn=functools.partial(pair_eval, config=config, bt=bt),
        eval_data=eval_pairs,
        trainable_mask=trainable_mask(params, freeze_backbone=bt.freeze_backbone),
        desc=train_kwargs.pop("desc", "bt"),
        **train_kwargs,
    )

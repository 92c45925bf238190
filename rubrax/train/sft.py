"""Supervised fine-tuning: next-token cross-entropy on the response tokens only.

    loss = - sum_{b,t} l[b,t] log p(x[b,t] | x[b,<t]) / sum_{b,t} l[b,t]

with l the loss mask (1 on response tokens incl. eos, 0 on the prompt and padding;
rubrax.data.sft.encode_sft builds it). The paper's "SFT on great responses" arm
(Table 1) fine-tunes the base policy on a strong model's responses this way.
With gradient accumulation each micro-batch's token mean is averaged, which equals the
full-batch token mean when micro-batches hold equally many response tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rubrax.models import ModelConfig
from rubrax.policy import logprobs
from rubrax.train.trainer import SupervisedResult, TrainConfig, train


def sft_token_nll(params: Any, batch: Mapping[str, jax.Array], *, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over loss-mask tokens, number of those tokens) per row: two [B] arrays."""
    logp_BxT = logprobs(params, batch["tokens"], batch["mask"], config=config)
    loss_mask = batch["loss_mask"].astype(jnp.float32) * (batch["mask"] > 0)
    return -jnp.sum(logp_BxT * loss_mask, axis=-1), jnp.sum(loss_mask, axis=-1)


def sft_loss(params: Any, batch: Mapping[str, jax.Array], *, config: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean NLL over response tokens (float32); metrics: number of tokens."""
    nll_B, n_B = sft_token_nll(params, batch, config=config)
    n = jnp.sum(n_B)
    return jnp.sum(nll_B) / jnp.maximum(n, 1.0), {"tokens": n}


def sft_eval(params: Any, batch: Mapping[str, jax.Array], *, config: ModelConfig) -> dict[str, jax.Array]:
    """Held-out sums: token NLL; the trainer divides by "count" (response tokens)."""
    nll_B, n_B = sft_token_nll(params, batch, config=config)
    w = batch["example_weight"]
    return {"loss": jnp.sum(w * nll_B), "count": jnp.sum(w * n_B)}


def train_sft(
    params: Any,
    config: ModelConfig,
    data: Mapping[str, np.ndarray],
    train_cfg: TrainConfig,
    *,
    eval_data: Mapping[str, np.ndarray] | None = None,
    **train_kwargs: Any,
) -> SupervisedResult:
    """Fine-tunes LM `params` on arrays {tokens [N,T], mask [N,T], loss_mask [N,T]}.

    `train_kwargs` go to `rubrax.train.trainer.train` (ckpt_dir, metrics_path,
    trainable_mask, stop_at, ...). Held-out metric: eval/loss (token-mean NLL).
    """
    for k in ("tokens", "mask", "loss_mask"):
        if k not in data:
            raise KeyError(f"SFT data needs array {k!r}; got {sorted(data)}")
    return train(
        functools.partial(sft_loss, config=config),
        params,
        data,
        train_cfg,
        eval_fn=functools.partial(sft_eval, config=config),
        eval_data=eval_data,
        desc=train_kwargs.pop("desc", "sft"),
        **train_kwargs,
    )

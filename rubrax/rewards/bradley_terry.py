"""Bradley-Terry reward model: an LM backbone plus a scalar head at the last real token.

    r(x, y) = w . h_last(x, y) + b          h_last = final-norm hidden state of the last
                                            token with mask 1 (left or right padding)
    P(y_c > y_r | x) = sigmoid(r_c - r_r)   (Bradley & Terry 1952)
    loss = -mean log sigmoid(r_c - r_r - m) + lambda * mean (r_c + r_r)^2

m is an optional per-pair margin (Llama 2's margin loss); the second term is reward
centring (Eisenstein et al. 2023, "Helping or Herding"; TRL's
`center_rewards_coefficient`): it pins the reward's mean near 0 without changing the
preference probabilities. Pairs sit on a size-2 axis: index 0 = chosen, 1 = rejected.
Rewards and the loss are float32 whatever the backbone's compute dtype.

The paper's BT baseline (Sec. 5): Llama-3.1-8B-Instruct backbone, GPT-4.1 labels,
lr 1e-5, 10 epochs, cosine schedule, warmup ratio 0.1, trained on on-policy,
off-policy or mixed pairs (rubrax.data.pairs builds them).

Params layout: {"backbone": LM params (rubrax.models), "head": {"kernel": [D], "bias": []}}.
`BTReward` wraps trained params as a reward function (registered "bradley_terry");
`rubrax.train.reward_model.train_reward_model` trains them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rubrax.models import ModelConfig, hidden_states
from rubrax.models import init_params as init_lm_params
from rubrax.rewards.base import RewardBatch, RewardFnBase, _check_lengths
from rubrax.train import checkpoint
from rubrax.sharding import jit_keyed_by_fsdp


@dataclasses.dataclass(frozen=True, kw_only=True)
class BTConfig:
    """Loss options. `margin` is added to every pair (a per-pair "margin" column in the
    batch is added on top); `center_coef` is lambda of the reward-centring term;
    `freeze_backbone` trains the head only."""

    margin: float = 0.0
    center_coef: float = 0.0
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        if self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {self.center_coef}")


# --------------------------------------------------------------------------- params


def init_head(key: jax.Array, hidden_size: int) -> dict[str, jax.Array]:
    """w ~ N(0, 1/D), b = 0 (float32: the head is tiny and its output is the reward)."""
    return {
        "kernel": jax.random.normal(key, (hidden_size,), jnp.float32) / np.sqrt(hidden_size),
        "bias": jnp.zeros((), jnp.float32),
    }


def init_params(config: ModelConfig, key: jax.Array, backbone: Any | None = None) -> dict[str, Any]:
    """BT params; `backbone` (e.g. a pretrained or SFT policy's params) is used as given."""
    k_lm, k_head = jax.random.split(key)
    if backbone is None:
        backbone = init_lm_params(config, k_lm)
    return {"backbone": backbone, "head": init_head(k_head, config.hidden_size)}


def trainable_mask(params: Mapping[str, Any], *, freeze_backbone: bool = False) -> dict[str, Any]:
    """True for leaves the optimizer may change: the head always; the backbone unless
    frozen, and never the LM output layer (`lm_head`), which the reward does not use."""

    def backbone_leaf(path, _):
        untouched = any(getattr(k, "key", None) == "lm_head" for k in path)
        return not (freeze_backbone or untouched)

    return {
        "backbone": jax.tree_util.tree_map_with_path(backbone_leaf, params["backbone"]),
        "head": jax.tree.map(lambda _: True, params["head"]),
    }


# --------------------------------------------------------------------------- device side


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
    """Index of the last position with mask 1 in each row (left, right or both-side padding).

    A row without any real token gives T - 1 (its score is meaningless).
    """
    T = mask_BxT.shape[-1]
    return T - 1 - jnp.argmax(jnp.flip(mask_BxT > 0, axis=-1), axis=-1)


def score(params: Mapping[str, Any], tokens_BxT: jax.Array, mask_BxT: jax.Array, *, config: ModelConfig) -> jax.Array:
    """float32 rewards_B = w . h[b, last(b)] + b."""
    h_BxTxD = hidden_states(params["backbone"], tokens_BxT, config=config, mask_BxT=mask_BxT)
    idx_B = last_token_index(mask_BxT)
    h_BxD = jnp.take_along_axis(h_BxTxD, idx_B[:, None, None], axis=1)[:, 0]
    head = params["head"]
    return h_BxD.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def score_pairs(params: Mapping[str, Any], tokens_Bx2xT: jax.Array, mask_Bx2xT: jax.Array, *, config: ModelConfig) -> jax.Array:
    """rewards_Bx2 for pairs stacked on axis 1 (one backbone pass over 2B sequences)."""
    B, two, T = tokens_Bx2xT.shape
    r = score(params, tokens_Bx2xT.reshape(B * two, T), mask_Bx2xT.reshape(B * two, T), config=config)
    return r.reshape(B, two)


def bt_loss(
    rewards_Bx2: jax.Array,
    *,
    margin_B: jax.Array | float = 0.0,
    center_coef: float = 0.0,
    weight_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-mean_b log sigmoid(r_c - r_r - m_b) + center_coef * mean_b (r_c + r_r)^2 (float32).

    `weight_B` (default all ones) gives a weighted mean, e.g. 0 for padding pairs.
    Metrics: accuracy (r_c > r_r; ties count as wrong), mean margin r_c - r_r, mean reward.
    """
    r = rewards_Bx2.astype(jnp.float32)
    diff_B = r[:, 0] - r[:, 1]
    w = jnp.ones_like(diff_B) if weight_B is None else weight_B.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1e-9)

    def wmean(x):
        return jnp.sum(w * x) / denom

    nll = wmean(-jax.nn.log_sigmoid(diff_B - jnp.asarray(margin_B, jnp.float32)))
    center = wmean(jnp.square(r[:, 0] + r[:, 1]))
    loss = nll + center_coef * center
    metrics = {
        "bt_nll": nll,
        "accuracy": wmean((diff_B > 0).astype(jnp.float32)),
        "reward_margin": wmean(diff_B),
        "reward_mean": wmean(r.mean(axis=1)),
    }
    return loss, metrics


def pair_loss(params, batch, *, config: ModelConfig, bt: BTConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Trainer loss: batch {tokens [B,2,T], mask [B,2,T], margin [B] (optional)}."""
    r = score_pairs(params, batch["tokens"], batch["mask"], config=config)
    margin = bt.margin + batch["margin"] if "margin" in batch else bt.margin
    return bt_loss(r, margin_B=margin, center_coef=bt.center_coef)


def pair_eval(params, batch, *, config: ModelConfig, bt: BTConfig) -> dict[str, jax.Array]:
    """Held-out sums: pair accuracy and BT loss, weighted by batch["example_weight"]."""
    r = score_pairs(params, batch["tokens"], batch["mask"], config=config)
    margin = bt.margin + batch["margin"] if "margin" in batch else bt.margin
    w = batch["example_weight"]
    n = jnp.sum(w)
    loss, m = bt_loss(r, margin_B=margin, center_coef=bt.center_coef, weight_B=w)
    return {"loss": loss * n, "accuracy": m["accuracy"] * n, "reward_margin": m["reward_margin"] * n, "count": n}


# --------------------------------------------------------------------------- host side


def save_reward_model(path: str | os.PathLike, params: Mapping[str, Any], config: ModelConfig, *, tokenizer_path: str | None = None) -> None:
    """Writes BT params and the model config (an orbax step-0 checkpoint under `path`)."""
    extra = {"model_config": _config_to_dict(config), "tokenizer_path": tokenizer_path}
    checkpoint.save(path, 0, params, extra, overwrite=True)


def load_reward_model(path: str | os.PathLike, *, mesh: Any = None,
                      fsdp: bool = False) -> tuple[dict[str, Any], ModelConfig, str | None]:
    """(params, model config, tokenizer path or None) written by `save_reward_model`;
    with `mesh`, restored straight into `rubrax.sharding.param_sharding(mesh, fsdp)`."""
    extra = checkpoint.restore_extra(path, step=0)
    config = _config_from_dict(extra["model_config"])
    target = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if mesh is not None:
        from rubrax.sharding import param_sharding

        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              target, param_sharding(target, mesh, fsdp=fsdp))
    params, _ = checkpoint.restore(path, target, step=0)
    return params, config, extra.get("tokenizer_path")


def _config_to_dict(config: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["rope_scaling"] = config.rope_scaling_dict
    return d


def _config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(**d)


@jit_keyed_by_fsdp(("config",))
def _score_jit(params, tokens_BxT, mask_BxT, *, config):
    return score(params, tokens_BxT, mask_BxT, config=config)


class BTReward(RewardFnBase):
    """A trained BT model as a reward function: r(prompt, completion) on the host.

    Each (prompt, completion) is encoded like the training pairs (chat-templated prompt,
    completion tokens, eos), right-padded to a multiple of `length_multiple` and scored
    in batches of `batch_size` (short batches are padded), so few shapes are compiled.
    Scores are always valid; info records whether the sequence was truncated.
    Build with `BTReward(params, config, tokenizer)` or `BTReward.from_path(path, tokenizer)`.

    Sharded: params placed on a mesh (replicated or FSDP, e.g. the trainer's result) are
    scored where they are, each batch split over the mesh's devices (batch_size rounded
    up to a multiple of the device count); `mesh` (+ `fsdp`) with `path` restores the
    params straight into those shardings.
    """

    name = "bradley_terry"

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        config: ModelConfig | None = None,
        tokenizer: Any | None = None,
        *,
        path: str | os.PathLike | None = None,
        max_length: int = 1024,
        batch_size: int = 16,
        length_multiple: int = 64,
        mesh: Any = None,
        fsdp: bool = False,
    ):
        from rubrax.sharding import params_mesh

        if path is not None:
            params, config, tok_path = load_reward_model(path, mesh=mesh, fsdp=fsdp)
            if tokenizer is None and tok_path:
                from rubrax.models import load_tokenizer  # type: ignore[attr-defined]

                tokenizer = load_tokenizer(tok_path)
        if params is None or config is None or tokenizer is None:
            raise ValueError("BTReward needs params, config and tokenizer (or a path saved with a tokenizer path)")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.mesh = params_mesh(params)
        if self.mesh is not None:
            batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self.max_length, self.batch_size, self.length_multiple = max_length, batch_size, length_multiple

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        from rubrax.data.sft import encode_prompt_response, pad_id, padded_length

        n = _check_lengths(prompts, completions, columns)
        encoded = [
            encode_prompt_response(self.tokenizer, p, c, max_length=self.max_length)
            for p, c in zip(prompts, completions)
        ]
        scores = np.zeros(n, np.float32)
        for start in range(0, n, self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            t = padded_length([len(ids) for ids, _, _ in chunk], self.max_length, self.length_multiple)
            tokens = np.full((self.batch_size, t), pad_id(self.tokenizer), np.int32)
            mask = np.zeros((self.batch_size, t), np.int32)
            for i, (ids, _, _) in enumerate(chunk):
                tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
            mask[len(chunk) :, 0] = 1  # padding rows: one dummy token, scores discarded
            if self.mesh is not None:
                from rubrax.sharding import batch_sharding

                tokens, mask = jax.device_put((tokens, mask), batch_sharding(self.mesh))
            r = np.asarray(_score_jit(self.params, tokens, mask, config=self.config))
            scores[start : start + len(chunk)] = r[: len(chunk)]
        info = tuple({"truncated": bool(trunc)} for _, _, trunc in encoded)
        return RewardBatch(scores, np.ones(n, bool), info)

    @classmethod
    def from_path(cls, path: str | os.PathLike, tokenizer: Any | None = None, **kwargs: Any) -> "BTReward":
        return cls(tokenizer=tokenizer, path=path, **kwargs)

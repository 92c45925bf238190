"""One batch of rollouts for the update: `RolloutBatch` and `make_batch` (host side).

Shape letters: P prompts, G group size, B = P * G rows (prompt-major), W prompt width,
C completion length, T = W + C.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rubrax import pytree

@pytree.dataclass
class RolloutBatch:
    """One batch of rollouts, B = P * G rows (prompt-major), T = prompt + completion.

    tokens_BxT int32; mask_BxT (1 = real token, prompt or completion; attention);
    loss_mask_BxT (1 = completion token, the ones trained on); behaviour_logp_BxT
    float32 (sampling logprobs at completion positions, aligned like
    `rubrax.policy.logprobs`); rewards_B float32; valid_B bool. prompt_width (static):
    columns before the first completion column (make_batch sets it; 0 = unknown). The
    fused LM head skips positions before it (they are never trained on).
    """

    tokens_BxT: jax.Array
    mask_BxT: jax.Array
    loss_mask_BxT: jax.Array
    behaviour_logp_BxT: jax.Array
    rewards_B: jax.Array
    valid_B: jax.Array
    prompt_width: int = pytree.field(static=True, default=0)


def make_batch(
    prompt_tokens_PxL: Any,
    prompt_mask_PxL: Any,
    completion_tokens_BxC: Any,
    completion_mask_BxC: Any,
    completion_logp_BxC: Any,
    rewards_B: Any,
    valid_B: Any,
    *,
    group_size: int,
) -> RolloutBatch:
    """Builds a RolloutBatch from left-padded prompts and `rubrax.policy.sample` output.

    Full sequence = concat(prompt repeated G times, completion) on the time axis.
    Host-side numpy (runs before the batch is sharded onto devices).
    """
    prompt_tokens = np.repeat(np.asarray(prompt_tokens_PxL), group_size, axis=0)
    prompt_mask = np.repeat(np.asarray(prompt_mask_PxL), group_size, axis=0)
    comp_mask = np.asarray(completion_mask_BxC).astype(np.int32)
    if prompt_tokens.shape[0] != comp_mask.shape[0]:
        raise ValueError(f"{prompt_tokens.shape[0]} prompt rows x group but {comp_mask.shape[0]} completions")
    return RolloutBatch(
        tokens_BxT=np.concatenate([prompt_tokens, np.asarray(completion_tokens_BxC)], axis=1).astype(np.int32),
        mask_BxT=np.concatenate([prompt_mask.astype(np.int32), comp_mask], axis=1),
        loss_mask_BxT=np.concatenate([np.zeros_like(prompt_mask, np.int32), comp_mask], axis=1),
        behaviour_logp_BxT=np.concatenate(
            [np.zeros(prompt_mask.shape, np.float32), np.asarray(completion_logp_BxC, np.float32) * comp_mask], axis=1
        ),
        rewards_B=np.asarray(rewards_B, np.float32),
        valid_B=np.asarray(valid_B, bool),
        prompt_width=int(prompt_tokens.shape[1]),
    )

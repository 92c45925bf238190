"""Reward functions: the protocol, a registry, combinators; BT and rubric rewards.

`rubrax.rewards.bradley_terry` (device side) and `rubrax.rewards.rubric` (host side)
are imported on demand, so importing this package does not import jax.
"""

from rubrax.rewards.base import (
    AsyncRewardFn,
    CallableReward,
    Clip,
    Normalize,
    RewardBatch,
    RewardFn,
    RewardFnBase,
    WeightedSum,
    acall_reward,
    as_reward_fn,
    available_rewards,
    get_reward,
    register_reward,
)

__all__ = [
    "AsyncRewardFn",
    "CallableReward",
    "Clip",
    "Normalize",
    "RewardBatch",
    "RewardFn",
    "RewardFnBase",
    "WeightedSum",
    "acall_reward",
    "as_reward_fn",
    "available_rewards",
    "get_reward",
    "register_reward",
]

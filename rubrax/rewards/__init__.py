"""Reward functions: the protocol, a lazy registry, combinators; BT and rubric rewards.

`rubrax.rewards.bradley_terry` (device side) and `rubrax.rewards.rubric` (host side)
are imported on demand (`get_reward("rubric")` imports no jax), so importing this
package does not import jax. Names: see `rubrax.rewards.registry`.
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
    get_reward,
    make_reward,
)
from rubrax.rewards.registry import UnknownRewardError, available_rewards, register_reward, resolve_reward

__all__ = [
    "AsyncRewardFn",
    "CallableReward",
    "Clip",
    "Normalize",
    "RewardBatch",
    "RewardFn",
    "RewardFnBase",
    "UnknownRewardError",
    "WeightedSum",
    "acall_reward",
    "as_reward_fn",
    "available_rewards",
    "get_reward",
    "make_reward",
    "register_reward",
    "resolve_reward",
]

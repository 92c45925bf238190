"""Reward functions of the tail world, registered by name (by `rubrax.sim` on import).

    "sim_gold"   the gold reward r*(x, y) of a tail world (the oracle arm; also what
                 every arm is evaluated with). Reads the `prompt_id` column; falls
                 back to matching the prompt text.

Build one with ``get_reward("sim_gold", world=world)`` or
``get_reward("sim_gold", seed=0, n_prompts=8, ...)`` (WorldConfig fields).
Host side only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rubrax.rewards.base import RewardBatch, RewardFnBase
from rubrax.sim.world import World, WorldConfig


def prompt_ids_for(world: World, prompts: Sequence[str], prompt_id: Sequence[str] | None) -> list[str | None]:
    """The world prompt id of each row: the `prompt_id` column, else the prompt text's."""
    if prompt_id is not None:
        return [str(p) for p in prompt_id]
    by_text = {p.text: p.id for p in world.prompts}
    return [by_text.get(p.strip()) for p in prompts]


class GoldReward(RewardFnBase):
    """r*(x, y) of a tail world. A row whose prompt is not in the world is invalid."""

    name = "sim_gold"

    def __init__(self, world: World | None = None, **world_config: Any):
        if world is not None and world_config:
            raise ValueError("GoldReward: pass either world= or WorldConfig fields, not both")
        self.world = world if world is not None else World(WorldConfig(**world_config))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        if len(prompts) != len(completions):
            raise ValueError(f"sim_gold: {len(prompts)} prompts but {len(completions)} completions")
        ids = prompt_ids_for(self.world, prompts, columns.get("prompt_id"))
        scores = np.zeros(len(completions), np.float32)
        valid = np.ones(len(completions), bool)
        info = []
        for i, (pid, c) in enumerate(zip(ids, completions)):
            try:
                b = self.world.gold_breakdown(pid, c) if pid is not None else None
            except KeyError:
                b = None
            if b is None:
                valid[i] = False
                info.append({"error": f"prompt not in the tail world: {prompts[i]!r}"})
                continue
            scores[i] = b.reward
            info.append({"met": b.met, "repetition": b.repetition, "over_length": b.over_length})
        return RewardBatch(scores, valid, tuple(info))

"""A toy RL task with a programmatic reward, for tests, CPU presets and benchmarks.

Prompts read ``say <word>``; the reward of a completion is the fraction of its
words equal to a target word (by default the prompt's own word, read from the
`target` column; a fixed `target=` overrides it). A random policy over a vocabulary
of V words scores about 1/V; a policy that learned the task scores 1.

Registered as reward "target_word". Its over-optimisation twin "half_target_word" pays
1 - 2 |share of the target word - 1/2|: a gold reward under which the proxy
"target_word" helps until half the words are the target, then hurts (for testing the
gold monitor). Host side only (no jax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rubrax.rewards.base import RewardBatch, RewardFnBase, register_reward

TOY_WORDS: tuple[str, ...] = (
    "say", "red", "green", "blue", "cat", "dog", "sun", "moon",
    "one", "two", "three", "four", "up", "down", "left", "right",
    "hot", "cold", "big", "small", "yes", "no", "fast", "slow", "tree", "rock",
)  # fmt: skip
TARGETS: tuple[str, ...] = TOY_WORDS[1:]


def toy_tokenizer():
    """The word-level tokenizer of the toy task (rubrax.sim's WordTokenizer over TOY_WORDS)."""
    from rubrax.sim.tokenizer import WordTokenizer

    return WordTokenizer(TOY_WORDS)


def toy_prompts(n: int, *, seed: int = 0, targets: Sequence[str] = TARGETS) -> list[dict[str, str]]:
    """n records {"prompt_id", "prompt": "say <w>", "target": w} with w drawn from targets."""
    rng = np.random.default_rng(seed)
    words = rng.choice(np.asarray(targets), size=n)
    return [{"prompt_id": f"toy-{i}", "prompt": f"say {w}", "target": str(w)} for i, w in enumerate(words)]


@register_reward("target_word")
class TargetWordReward(RewardFnBase):
    """Fraction of the completion's words equal to the target word (0 for an empty one)."""

    name = "target_word"

    def __init__(self, target: str | None = None):
        self.target = target

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        targets = [self.target] * len(completions) if self.target else columns.get("target")
        if targets is None:
            raise ValueError("target_word: pass target= or a `target` column")
        scores = []
        for text, target in zip(completions, targets):
            words = text.split()
            scores.append(sum(w == target for w in words) / len(words) if words else 0.0)
        return RewardBatch(np.asarray(scores, np.float32), np.ones(len(scores), bool))


@register_reward("half_target_word")
class HalfTargetWordReward(TargetWordReward):
    """1 - 2 |share of the target word - 1/2|: best when half the words are the target."""

    name = "half_target_word"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        share = super().__call__(prompts, completions, **columns)
        return RewardBatch(1.0 - 2.0 * np.abs(share.scores - 0.5), share.valid)

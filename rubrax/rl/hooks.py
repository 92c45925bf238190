"""Hooks of the RL loop (rubrax.rl.loop.train).

Eval hooks: `(step, params) -> {name: scalar}`, run every `eval_every` steps and at the
end, logged as "eval/<name>". `reward_eval_hook` and `winrate_eval_hook` build the usual ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.rewards.base import as_reward_fn
from rubrax.rl.prompts import PromptSet
from rubrax.rl.reward_runner import reward_inputs
from rubrax.rl.rollouts import EvalSampler

EvalHook = Callable[[int, Any], Mapping[str, float]]


def reward_eval_hook(
    prompts: PromptSet, reward_fn: Any, tokenizer: Any, model_config: Any, sample_cfg: Any, *, max_prompt_tokens: int,
    seed: int = 0, batch_size: int = 64,
) -> EvalHook:
    """An eval hook: mean reward (and invalid count) of samples on held-out prompts.

    Use a greedy SampleConfig (temperature=0, n=1) for the paper's evaluation decoding.
    """
    fn = as_reward_fn(reward_fn)
    generate = EvalSampler(prompts, tokenizer, model_config, sample_cfg, max_prompt_tokens, seed, batch_size)

    def hook(step: int, params: Any) -> dict[str, float]:
        scores, valid = [], []
        for ro in generate(step, params):
            texts, completions, columns = reward_inputs(prompts, ro, sample_cfg.n)
            rb = fn(texts, completions, **columns)
            scores.append(rb.scores[rb.valid])
            valid.append(rb.valid)
        s = np.concatenate(scores)
        return {"reward_mean": float(s.mean()) if s.size else float("nan"), "reward_invalid": int((~np.concatenate(valid)).sum())}

    return hook


def winrate_eval_hook(
    prompts: PromptSet, references: Sequence[str], judge: Any, tokenizer: Any, model_config: Any, sample_cfg: Any, *,
    max_prompt_tokens: int, both_orders: bool = False, seed: int = 0, batch_size: int = 64,
) -> EvalHook:
    """An eval hook: win rate of the policy's responses against `references[i]` (the
    reference response to held-out prompt i) under a pairwise judge
    (`judge.compare(prompt, a, b, key=..., swap=...)`, e.g. rubrax.eval's LLM judge),
    through rubrax.eval.winrate. Logs win_rate, its bootstrap interval and failures.
    """
    from rubrax.eval.winrate import WinItem, judge_outcome, win_rate

    if len(references) != len(prompts):
        raise ValueError(f"winrate_eval_hook: {len(references)} references for {len(prompts)} prompts")
    if sample_cfg.n != 1:
        raise ValueError("winrate_eval_hook: use one sample per prompt (SampleConfig.n=1)")
    generate = EvalSampler(prompts, tokenizer, model_config, sample_cfg, max_prompt_tokens, seed, batch_size)

    def hook(step: int, params: Any) -> dict[str, float]:
        items = [
            WinItem(key=f"{step}:{i}", prompt=prompts.texts[i], response=text, reference=references[i])
            for ro in generate(step, params) for i, text in zip(ro.indices, ro.completions)
        ]

        async def judge_all():
            return await asyncio.gather(*(judge_outcome(judge, it, both_orders=both_orders) for it in items))

        wr = win_rate(asyncio.run(judge_all()), seed=seed)
        return {"win_rate": wr.win_rate, "win_rate_ci_low": wr.ci_low, "win_rate_ci_high": wr.ci_high, "win_rate_failed": wr.failed}

    return hook

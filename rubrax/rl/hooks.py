"""Hooks of the RL loop (rubrax.rl.loop.train): how experiments plug into the one loop.

Step hooks: `(view: StepView) -> {name: scalar}`, called once per RL step with a
read-only view of what the step did (its prompts, rollouts, rewards and the update's
metrics); what they return is logged with the step's metrics (names must not clash with
the loop's own). They run when the step's metrics reach the host, one step late, so the
device never waits for them; a resumed run calls them for the steps it runs.
Eval hooks: `(step, params) -> {name: scalar}`, run every `eval_every` steps and at the
end, logged as "eval/<name>". `reward_eval_hook` and `winrate_eval_hook` build the usual ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.rewards.base import as_reward_fn
from rubrax.rl.prompts import PromptSet
from rubrax.rl.reward_runner import reward_inputs
from rubrax.rl.rollouts import EvalSampler, Rollouts

EvalHook = Callable[[int, Any], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class StepView:
    """What RL step `step` did, for step hooks (arrays are read-only).

    rollouts: the samples the update trained on (rows prompt-major: row i * G + j is
    sample j of record rollouts.indices[i]; completions decoded); scores_B / valid_B: their
    rewards (multi-host: rows another host scored are invalid here); metrics: the
    update's metrics (host floats, e.g. reward_mean, kl, seq_kl) and the loop's timings.
    """

    step: int
    prompts: PromptSet
    rollouts: Rollouts
    scores_B: np.ndarray
    valid_B: np.ndarray
    metrics: Mapping[str, float]
    infos: tuple[Mapping[str, Any], ...] = ()  # the reward's per-row info (RewardBatch.info) of the rows this host scored


StepHook = Callable[[StepView], Mapping[str, float]]


def run_step_hooks(hooks: Sequence[StepHook], view: StepView) -> dict[str, float]:
    """The hooks' metrics of one step; a name that clashes with the loop's is an error."""
    for x in (view.scores_B, view.valid_B, view.rollouts.tokens, view.rollouts.logprobs, view.rollouts.mask):
        x.flags.writeable = False
    out: dict[str, float] = {}
    for hook in hooks:
        for k, v in hook(view).items():
            if k in view.metrics or k in out:
                raise ValueError(f"step hook {hook!r} returned {k!r}, which another hook or the loop already logs")
            out[k] = float(v)
    return out


def run_eval_hooks(hooks: Sequence[EvalHook], step: int, params: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for hook in hooks:
        out.update({f"eval/{k}": float(v) for k, v in hook(step, params).items()})
    return out


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
    through rubrax.eval.winrate. Logs win_rate, its bootstrap interval and failures, and
    the judge's length bias (judge_length_corr); with both_orders also its position bias
    (judge_flip_rate, judge_first_position_rate; rubrax.eval.winrate.JudgeBias).
    """
    from rubrax.eval.winrate import WinItem, judge_bias, judge_orders, judge_outcome, outcome_of_orders, win_rate

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
            if both_orders:
                return await asyncio.gather(*(judge_orders(judge, it) for it in items))
            return await asyncio.gather(*(judge_outcome(judge, it) for it in items))

        judged = asyncio.run(judge_all())
        orders = judged if both_orders else []
        outcomes = [outcome_of_orders(*o) for o in judged] if both_orders else judged
        wr, bias = win_rate(outcomes, seed=seed), judge_bias(items, outcomes, orders)
        out = {"win_rate": wr.win_rate, "win_rate_ci_low": wr.ci_low, "win_rate_ci_high": wr.ci_high, "win_rate_failed": wr.failed,
               "judge_length_corr": bias.length_corr}
        if both_orders:
            out.update({"judge_flip_rate": bias.flip_rate, "judge_first_position_rate": bias.first_position_rate})
        return out

    return hook

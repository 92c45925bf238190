"""Rollout sampling on the host side: left padding, `rubrax.policy.sample`, decoding.

`RolloutSampler(step, params)` draws the rollouts of RL step k: the step's P prompts
(`PromptSet.indices`), left-padded to a fixed width (or, with `prompt_bucket`, to the
batch's longest prompt rounded up to that multiple), G samples each with key
fold_in(fold_in(root, k), SAMPLE_STREAM). `EvalSampler` samples every held-out prompt
with keys that do not change between evaluations.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rubrax.rl.prompts import PromptSet
from rubrax.rl.state import SAMPLE_STREAM, stream_key


def left_pad(token_lists: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, width] int32 tokens and mask, each row right-aligned (left padding)."""
    tokens = np.full((len(token_lists), width), pad_id, np.int32)
    mask = np.zeros((len(token_lists), width), np.int32)
    for i, ids in enumerate(token_lists):
        if len(ids) > width:
            raise ValueError(f"prompt {i} has {len(ids)} tokens > width {width}")
        tokens[i, width - len(ids) :] = ids
        mask[i, width - len(ids) :] = 1
    return tokens, mask


# --------------------------------------------------------------------------- rollouts


@dataclasses.dataclass
class Rollouts:
    """One step's samples on the host (numpy), before rewards."""

    step: int
    indices: np.ndarray  # [P] record indices
    prompt_tokens: np.ndarray  # [P, W]
    prompt_mask: np.ndarray
    tokens: np.ndarray  # [P*G, L]
    logprobs: np.ndarray
    mask: np.ndarray
    completions: list[str]
    sampling_logprobs: np.ndarray | None = None  # log q of the distribution sampled (policy.SampleOutput)

    def behaviour_logprobs(self, importance_correction: str) -> np.ndarray:
        """What the update's batch carries: the model's logprobs, or, for an importance
        correction, those of the tempered / truncated distribution actually sampled."""
        if importance_correction == "none":
            return self.logprobs
        if self.sampling_logprobs is None:
            raise ValueError(f"rollouts of step {self.step} carry no sampling_logprobs (needed by importance_correction)")
        return self.sampling_logprobs

    def to_npz(self, path: str) -> None:
        tmp = path + ".tmp.npz"
        extra = {} if self.sampling_logprobs is None else {"sampling_logprobs": self.sampling_logprobs}
        np.savez(tmp, step=self.step, indices=self.indices, prompt_tokens=self.prompt_tokens, prompt_mask=self.prompt_mask,
                 tokens=self.tokens, logprobs=self.logprobs, mask=self.mask, completions=np.asarray(self.completions, dtype=object),
                 **extra)
        os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name

    @classmethod
    def from_npz(cls, path: str) -> Rollouts:
        with np.load(path, allow_pickle=True) as z:
            return cls(int(z["step"]), z["indices"], z["prompt_tokens"], z["prompt_mask"], z["tokens"], z["logprobs"],
                       z["mask"], [str(c) for c in z["completions"]],
                       z["sampling_logprobs"] if "sampling_logprobs" in z.files else None)


def decode_completion(tokenizer: Any, ids: np.ndarray, mask: np.ndarray, stop_ids: Sequence[int]) -> str:
    """Text of one sampled completion: the masked tokens, a final stop token dropped."""
    ids = [int(t) for t, m in zip(ids, mask) if m]
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids)



class RolloutSampler:
    """Draws the rollouts of a step: data order, padding, rubrax.policy.sample, decoding."""

    def __init__(self, prompts: PromptSet, tokenizer, model_config, sample_cfg, root_key, *, prompts_per_step: int,
                 max_prompt_tokens: int, prompt_bucket: int | None = None, seed: int = 0):
        self.prompts, self.tokenizer, self.model_config = prompts, tokenizer, model_config
        self.sample_cfg, self.root_key = sample_cfg, root_key
        self.prompts_per_step, self.max_prompt_tokens = prompts_per_step, max_prompt_tokens
        self.prompt_bucket, self.seed = prompt_bucket, seed
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (model_config.pad_token_id or 0)
        stops = sample_cfg.stop_token_ids
        self.stop_ids = tuple(model_config.eos_token_ids if stops is None else stops)

    def __call__(self, step: int, params) -> Rollouts:
        idx = self.prompts.indices(step, self.prompts_per_step, self.seed)
        rows = [self.prompts.tokens[i] for i in idx]
        width = self.max_prompt_tokens
        if self.prompt_bucket:
            longest = max(len(r) for r in rows)
            width = min(width, -(-longest // self.prompt_bucket) * self.prompt_bucket)
        ptoks, pmask = left_pad(rows, width, self.pad_id)
        return self.draw(step, idx, ptoks, pmask, stream_key(self.root_key, step, SAMPLE_STREAM), params)

    def draw(self, step: int, idx: np.ndarray, ptoks: np.ndarray, pmask: np.ndarray, key, params) -> Rollouts:
        """Samples the padded prompts `ptoks` (records `idx`) with `key`; decodes on the host."""
        from rubrax import policy

        out = jax.device_get(policy.sample(params, ptoks, pmask, key, self.sample_cfg, config=self.model_config))
        tokens, logprobs, mask, qlogp = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask, out.sampling_logprobs))
        texts = [decode_completion(self.tokenizer, t, m, self.stop_ids) for t, m in zip(tokens, mask)]
        return Rollouts(step, idx, ptoks, pmask, tokens, logprobs.astype(np.float32), mask.astype(np.int32), texts,
                        qlogp.astype(np.float32))


class EvalSampler:
    """Completions of every held-out prompt (in batches), for eval hooks."""

    def __init__(self, prompts: PromptSet, tokenizer, model_config, sample_cfg, max_prompt_tokens: int, seed: int, batch_size: int):
        self.sampler = RolloutSampler(prompts, tokenizer, model_config, sample_cfg, np.asarray(jax.random.PRNGKey(seed)),
                                      prompts_per_step=1, max_prompt_tokens=max_prompt_tokens, seed=seed)
        self.prompts, self.batch_size, self.max_prompt_tokens = prompts, batch_size, max_prompt_tokens

    def __call__(self, step: int, params) -> list[Rollouts]:
        s, out = self.sampler, []
        for start in range(0, len(self.prompts), self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, len(self.prompts)))
            ptoks, pmask = left_pad([self.prompts.tokens[i] for i in idx], self.max_prompt_tokens, s.pad_id)
            key = stream_key(s.root_key, start, SAMPLE_STREAM)  # same keys at every evaluation
            out.append(s.draw(step, idx, ptoks, pmask, key, params))
        return out

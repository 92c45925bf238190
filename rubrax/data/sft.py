"""SFT data: {prompt, response} records -> chat-templated token arrays with a loss mask.

A sequence is the prompt rendered with the tokenizer's chat template (one user turn,
generation prompt appended), then the response tokens and the end-of-sequence token:

    tokens  = chat([user: prompt]) + encode(response) + [eos]
    loss_mask = 0 on the prompt part, 1 on the response part (incl. eos)

This is exactly how the policy sees a prompt and emits a completion at sampling time,
so the same encoding serves SFT, the Bradley-Terry reward model and `BTReward`.
Too long sequences keep the response first: the prompt is cut from the left down to
`max_length // 2` tokens at most, then the response is cut on the right.

Host side only: no jax.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.data.records import RecordError, iter_source, source_name, text_field


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


def parse_sft(rec: Mapping[str, Any], source: str = "<record>", line: int = 0) -> SFTExample:
    return SFTExample(text_field(rec, "prompt", source, line), text_field(rec, "response", source, line))


def read_sft(data: str | os.PathLike | Iterable[Mapping[str, Any]], source: str | None = None) -> list[SFTExample]:
    """Reads {prompt, response} records from a JSONL path, a list of dicts or a `datasets.Dataset`.

    Raises RecordError naming file/line (or row) and field on a missing or empty field.
    """
    out = [parse_sft(rec, src, line) for src, line, rec in iter_source(data, source)]
    if not out:
        raise RecordError(source_name(data, source), None, None, "no records")
    return out


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The chat-templated prompt (one user turn plus the assistant generation prompt)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))


def encode_prompt_response(
    tokenizer: Any, prompt: str, response: str, *, max_length: int, add_eos: bool = True
) -> tuple[list[int], int, bool]:
    """Returns (ids, number of prompt tokens kept, truncated?) for one prompt/response."""
    p = prompt_ids(tokenizer, prompt)
    r = list(tokenizer.encode(response))
    if add_eos and tokenizer.eos_token_id is not None:
        r.append(int(tokenizer.eos_token_id))
    truncated = len(p) + len(r) > max_length
    if truncated:
        keep_p = min(len(p), max(max_length - len(r), max_length // 2))
        p = p[len(p) - keep_p :]
        r = r[: max_length - keep_p]
    return p + r, len(p), truncated


def pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return 0 if pid is None else int(pid)


def padded_length(lengths: Sequence[int], max_length: int, multiple: int = 8) -> int:
    """Longest sequence rounded up to `multiple` (fewer distinct shapes to compile), capped."""
    longest = max(lengths) if lengths else 1
    return min(max_length, -(-longest // multiple) * multiple)


def encode_sft(
    tokenizer: Any, examples: Sequence[SFTExample], *, max_length: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Token arrays for the SFT trainer (right padding):

        tokens_NxT int32, mask_NxT int32 (1 = real token), loss_mask_NxT float32 (1 = response)
    """
    seqs = [encode_prompt_response(tokenizer, e.prompt, e.response, max_length=max_length) for e in examples]
    t = pad_to or padded_length([len(s[0]) for s in seqs], max_length)
    tokens = np.full((len(seqs), t), pad_id(tokenizer), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    loss_mask = np.zeros((len(seqs), t), np.float32)
    for i, (ids, n_prompt, _) in enumerate(seqs):
        ids = ids[:t]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        loss_mask[i, n_prompt : len(ids)] = 1.0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}

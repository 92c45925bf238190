"""Preference pairs: readers, writers and token arrays (the pair-set builders that label
pairs with a judge are a workflow: rubrax.train.pair_sets).

Record shapes (JSONL lines or `datasets` rows):
    {prompt, chosen, rejected}                      chosen is preferred
    {prompt, response_a, response_b, label}         label 0: response_a preferred,
                                                    label 1: response_b preferred
Both may carry `source` (e.g. "on_policy"). Errors name the file, line (or row) and
field: missing field, empty text, label not in {0, 1}.

Token arrays (`encode_pairs`): tokens_Nx2xT, mask_Nx2xT with index 0 = chosen,
1 = rejected, each row `chat(prompt) + response + eos` (rubrax.data.sft encoding).

Host side only: no jax.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.data.records import RecordError, iter_source, source_name, text_field, write_jsonl
from rubrax.data.sft import encode_prompt_response, pad_id, padded_length



@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: str = ""

    def to_record(self) -> dict[str, str]:
        rec = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.source:
            rec["source"] = self.source
        return rec


def parse_label(rec: Mapping[str, Any], source: str, line: int) -> int:
    if "label" not in rec or rec["label"] is None:
        raise RecordError(source, line, "label", "missing")
    value = rec["label"]
    # bool is an int in Python; True/False are not labels.
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise RecordError(source, line, "label", f"must be 0 (response_a preferred) or 1 (response_b preferred), got {value!r}")
    return int(value)


def parse_pair(rec: Mapping[str, Any], source: str = "<record>", line: int = 0) -> PreferencePair:
    prompt = text_field(rec, "prompt", source, line)
    src = rec.get("source") or ""
    if not isinstance(src, str):
        raise RecordError(source, line, "source", f"must be a string, got {type(src).__name__}")
    if "response_a" in rec or "response_b" in rec or "label" in rec:
        a = text_field(rec, "response_a", source, line)
        b = text_field(rec, "response_b", source, line)
        label = parse_label(rec, source, line)
        chosen, rejected = (a, b) if label == 0 else (b, a)
    else:
        chosen = text_field(rec, "chosen", source, line)
        rejected = text_field(rec, "rejected", source, line)
    return PreferencePair(prompt, chosen, rejected, src)


def read_pairs(data: str | os.PathLike | Iterable[Mapping[str, Any]], source: str | None = None) -> list[PreferencePair]:
    """Reads pairs from a JSONL path, a list of dicts or a `datasets.Dataset` (either shape)."""
    out = [parse_pair(rec, src, line) for src, line, rec in iter_source(data, source)]
    if not out:
        raise RecordError(source_name(data, source), None, None, "no records")
    return out


def write_pairs(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> None:
    """Writes {prompt, chosen, rejected, source} lines atomically."""
    write_jsonl(path, (p.to_record() for p in pairs))


def encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """tokens_Nx2xT int32 and mask_Nx2xT int32 (right padding); [:, 0] chosen, [:, 1] rejected."""
    seqs = [
        [encode_prompt_response(tokenizer, p.prompt, r, max_length=max_length)[0] for r in (p.chosen, p.rejected)]
        for p in pairs
    ]
    t = pad_to or padded_length([len(s) for pair in seqs for s in pair], max_length)
    tokens = np.full((len(seqs), 2, t), pad_id(tokenizer), np.int32)
    mask = np.zeros((len(seqs), 2, t), np.int32)
    for i, pair in enumerate(seqs):
        for j, ids in enumerate(pair):
            ids = ids[-t:] if len(ids) > t else ids
            tokens[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = 1
    return {"tokens": tokens, "mask": mask}


# --------------------------------------------------------------------------- building pair sets

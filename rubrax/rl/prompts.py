"""Prompt records for RL: `load_prompts` -> `PromptSet`, and the data order.

Records are tokenised once at start-up (chat template by default). The records of step k
are positions [k*P, (k+1)*P) of a stream of per-epoch permutations (epoch e is
`default_rng([seed, e])`, rubrax.train.trainer.epoch_permutation, the supervised
trainer's data order too), so they depend only on k and the seed: a resumed run sees the
same prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rubrax.train.trainer import epoch_permutation

log = logging.getLogger("rubrax.rl")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenised prompt records. texts: the prompt string handed to the reward function;
    tokens: token ids per prompt; columns: the other record fields, by name."""

    texts: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]
    columns: Mapping[str, tuple[Any, ...]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def indices(self, step: int, per_step: int, seed: int) -> np.ndarray:
        """Record indices of step `step`: a stream of per-epoch permutations."""
        n = len(self)
        out = []
        for pos in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(pos, n)
            out.append(epoch_permutation(seed, epoch, n)[i])
        return np.asarray(out)


def _prompt_text(value: Any, source: str, line: int, field: str) -> str:
    from rubrax.data.records import RecordError

    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "content" in m for m in value):
        return str(value[-1]["content"])
    raise RecordError(source, line, field, "must be a non-empty string or a list of chat messages")


def load_prompts(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    chat_template: bool = True,
    prompt_field: str = "prompt",
) -> PromptSet:
    """Reads prompt records (JSONL path, list of dicts or a `datasets.Dataset`).

    Each record needs `prompt_field` (a string or a list of {"role", "content"}
    messages); other fields become reward columns. Errors name file, line and field.
    """
    from rubrax.data.records import RecordError, iter_source

    texts, tokens, rows, skipped = [], [], [], 0
    for source, line, rec in iter_source(data):
        if prompt_field not in rec:
            raise RecordError(source, line, prompt_field, "missing")
        value = rec[prompt_field]
        text = _prompt_text(value, source, line, prompt_field)
        if chat_template and hasattr(tokenizer, "apply_chat_template"):
            messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            ids = list(tokenizer.encode(text))
        if not ids or len(ids) > max_prompt_tokens:
            skipped += 1
            if skipped == 1:
                log.warning("%s:%s: prompt of %d tokens skipped (max_prompt_tokens=%d)", source, line, len(ids), max_prompt_tokens)
            continue
        texts.append(text)
        tokens.append(tuple(int(t) for t in ids))
        rows.append({k: v for k, v in rec.items() if k != prompt_field})
    if not texts:
        raise ValueError(f"no usable prompts in {data!r} ({skipped} longer than max_prompt_tokens={max_prompt_tokens})")
    names = sorted({k for r in rows for k in r})
    columns = {k: tuple(r.get(k) for r in rows) for k in names}
    return PromptSet(tuple(texts), tuple(tokens), columns, skipped)

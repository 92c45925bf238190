"""Host-side tokenizer wrapper with the interface the rest of rubrax codes against:
encode(text), decode(ids), apply_chat_template(messages, add_generation_prompt=True),
pad_token_id, eos_token_id, vocab_size.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence


class HFTokenizer:
    """transformers.AutoTokenizer behind rubrax's small Tokenizer interface.

    encode() adds no special tokens (chat prompts get theirs from the template);
    pad_token_id falls back to eos_token_id when the tokenizer defines no pad token.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else pad
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> list[int]:
        ids = self.hf.apply_chat_template(list(messages), tokenize=True,
                                          add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
        return list(ids)


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load the tokenizer files of a local HF folder (never the hub)."""
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

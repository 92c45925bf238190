"""Tokenizers with the interface the rest of rubrax codes against: encode(text),
decode(ids), apply_chat_template(messages, add_generation_prompt=True), pad_token_id,
eos_token_id, vocab_size. Host side (no jax).

    HFTokenizer     transformers.AutoTokenizer of a local HF folder (real models)
    WordTokenizer   one token per whitespace-separated word over a fixed word list (the
                    toy task, the tail world, tiny CPU models in tests and presets)

The word tokenizer's chat template is the simplest one that keeps roles apart:

    user turn       <user> w1 w2 ...
    assistant turn  <assistant> w1 w2 ... <eos>
    generation      ... <assistant>          (add_generation_prompt=True)

with one <bos> at the start of the conversation. Unknown words map to <unk>.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>", "<unk>")


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


class WordTokenizer:
    """encode / decode / apply_chat_template over a fixed word list.

    vocab_size is rounded up to a multiple of `pad_to_multiple` (the extra ids are
    never produced by encode) so that model shapes stay friendly.
    """

    def __init__(self, words: Iterable[str], *, pad_to_multiple: int = 8):
        vocab = list(SPECIAL_TOKENS)
        for w in words:
            if not w or any(ch.isspace() for ch in w):
                raise ValueError(f"WordTokenizer: word {w!r} is empty or contains whitespace")
            if w in vocab:
                raise ValueError(f"WordTokenizer: duplicate word {w!r}")
            vocab.append(w)
        self.id_to_word: tuple[str, ...] = tuple(vocab)
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(vocab)}
        self.pad_token_id = self.word_to_id["<pad>"]
        self.bos_token_id = self.word_to_id["<bos>"]
        self.eos_token_id = self.word_to_id["<eos>"]
        self.unk_token_id = self.word_to_id["<unk>"]
        self.user_token_id = self.word_to_id["<user>"]
        self.assistant_token_id = self.word_to_id["<assistant>"]
        m = max(1, pad_to_multiple)
        self.vocab_size = -(-len(vocab) // m) * m
        self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.word_to_id.get(w, self.unk_token_id) for w in text.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and (i in self.special_ids or i >= len(self.id_to_word)):
                continue
            out.append(self.id_to_word[i] if i < len(self.id_to_word) else "<unk>")
        return " ".join(out)

    def decode_completion(self, ids: Sequence[int]) -> str:
        """The text of a sampled completion: words up to the first <eos>/<pad>, specials dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i in (self.eos_token_id, self.pad_token_id):
                break
            if i not in self.special_ids and i < len(self.id_to_word):
                out.append(self.id_to_word[i])
        return " ".join(out)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: object,
    ) -> list[int] | str:
        ids = [self.bos_token_id]
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"apply_chat_template: message {i} has role {role!r}; expected user/assistant/system")
            if role == "assistant":
                ids += [self.assistant_token_id, *self.encode(m["content"]), self.eos_token_id]
            else:  # a system turn is folded into a user turn: the world has no system role
                ids += [self.user_token_id, *self.encode(m["content"])]
        if add_generation_prompt:
            ids.append(self.assistant_token_id)
        return ids if tokenize else self.decode(ids)

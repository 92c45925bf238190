"""A tiny random-init Llama HF folder with SmolLM2's real tokenizer and chat template:
fast enough for CPU RL steps in tests, real enough for transformers to load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_tiny_hf(out: str | os.PathLike, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    import jax

    from rubrax.models import ModelConfig, init_params, save_pretrained, smollm2_checkpoint

    src = smollm2_checkpoint()
    base = json.loads((src / "config.json").read_text())
    config = ModelConfig.tiny(
        vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"], max_position_embeddings=512,
    )
    out = Path(out)
    save_pretrained(init_params(config, jax.random.key(seed)), config, out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out

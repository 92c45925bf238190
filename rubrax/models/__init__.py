"""Llama-family causal LMs in Flax, Hugging Face checkpoints and tokenizers.

    config = ModelConfig.tiny()                      # or load_pretrained(path)
    params = init_params(config, jax.random.key(0))
    logits_BxTxV = forward(params, tokens_BxT, config=config, mask_BxT=mask_BxT)
"""

from rubrax.models.tokenizer import HFTokenizer, load_tokenizer
from rubrax.models.checkpoint import load_pretrained, save_pretrained
from rubrax.models.config import ModelConfig
from rubrax.models.gguf import smollm2_checkpoint
from rubrax.models.llama import (
    forward,
    hidden_states,
    init_cache,
    init_params,
    lm_logits,
    unstack_layers,
)

__all__ = [
    "HFTokenizer",
    "load_tokenizer",
    "smollm2_checkpoint",
    "ModelConfig",
    "forward",
    "hidden_states",
    "init_cache",
    "init_params",
    "lm_logits",
    "unstack_layers",
    "load_pretrained",
    "save_pretrained",
]

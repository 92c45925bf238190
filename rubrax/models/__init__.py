"""Llama-family causal LMs in Flax, Hugging Face checkpoints and tokenizers.

    config = ModelConfig.tiny()                      # or load_pretrained(path)
    params = init_params(config, jax.random.key(0))
    logits_BxTxV = forward(params, tokens_BxT, config=config, mask_BxT=mask_BxT)

Layer layouts: params["layers"] is stacked ([L, ...] leaves, run by a scan: one compiled
layer body, best on GPU/TPU) or, after `unstack_layers(params)`, a tuple of L per-layer
dicts (run by an unrolled loop: on CPU the backward pass is ~1.3x faster and decoding
reads each layer in place). Every function here and in rubrax.policy accepts both, with
the same values; `stack_layers` converts back, `save_pretrained` takes either.
"""

from rubrax.models.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from rubrax.models.checkpoint import load_pretrained, save_pretrained
from rubrax.models.config import ModelConfig
from rubrax.models.gguf import smollm2_checkpoint
from rubrax.models.llama import (
    forward,
    hidden_states,
    init_cache,
    init_params,
    is_unstacked,
    lm_logits,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "HFTokenizer",
    "WordTokenizer",
    "load_tokenizer",
    "smollm2_checkpoint",
    "ModelConfig",
    "forward",
    "hidden_states",
    "init_cache",
    "init_params",
    "lm_logits",
    "is_unstacked",
    "stack_layers",
    "unstack_layers",
    "load_pretrained",
    "save_pretrained",
]

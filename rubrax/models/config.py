"""Model configuration for the Llama-family decoders (Llama 3, SmolLM2, Qwen2/2.5, Qwen3).

Field names follow Hugging Face's config.json so that a config round-trips through
`from_hf_dict` / `to_hf_dict`. The config is frozen and hashable: it is passed to jitted
functions as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_DTYPES = ("float32", "bfloat16", "float16")
# Mirrors of rubrax.models.attention.IMPLS and llama.REMAT_POLICIES (no jax import here).
ATTENTION_IMPLS = ("auto", "einsum", "blockwise", "cudnn", "xla", "tpu_flash")
REMAT_POLICIES = ("auto", "none", "full", "dots")
_ROPE_TYPES = ("default", "linear", "llama3")
# model_type -> HF architecture class name written to config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _freeze_rope_scaling(rope_scaling: Mapping[str, Any] | None):
    if rope_scaling is None:
        return None
    return tuple(sorted((str(k), v) for k, v in dict(rope_scaling).items()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and dtype settings of a Llama-family causal LM.

    Differences between the supported families are flags, not subclasses:
    - Llama 3 / SmolLM2: `model_type="llama"`, optional `rope_scaling` of type "llama3".
    - Qwen2/2.5: `model_type="qwen2"`, `attention_bias=True` (bias on q/k/v, not on o).
    - Qwen3: `model_type="qwen3"`, `qk_norm=True` (RMSNorm over head_dim on q and k
      before RoPE).
    `rope_scaling` is stored as a sorted tuple of (key, value) pairs so the config stays
    hashable; pass a dict and it is frozen in __post_init__. `dtype` is the compute dtype
    (activations, matmuls, KV cache), `param_dtype` the storage dtype of the weights (and so
    of the gradients and Adam moments: "float32" master weights with "bfloat16" compute is
    the accelerator recipe); logits, log-probabilities and losses are always float32.

    Execution settings (not part of config.json; they change memory and speed, never the
    function computed, within float tolerance):
    - `attention`: "auto" | "einsum" | "blockwise" | "cudnn" | "xla" | "tpu_flash"
      (rubrax.models.attention; "auto" picks per platform and length there).
    - `attention_block`: query/key block of the blockwise kernel.
    - `remat`: "auto" | "none" | "full" | "dots": what each decoder layer keeps for the
      backward pass (rubrax.models.llama.resolve_remat; "auto" = none on CPU, full on
      GPU/TPU).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama with attention_bias=True)
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "auto"

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; "
                f"expected one of {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    "hidden_size must be divisible by num_attention_heads when head_dim is unset"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not isinstance(self.attention_block, int) or self.attention_block < 1:
            raise ValueError(f"attention_block must be a positive int, got {self.attention_block!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze_rope_scaling(self.rope_scaling))
        rope_type = self.rope_type
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={rope_type!r} is not supported; expected one of "
                f"{_ROPE_TYPES}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling_dict or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A small random-init config for tests and the synthetic testbed."""
        kwargs = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_QWEN3 = dict(model_type="qwen3", qk_norm=True, head_dim=128, vocab_size=151936, rope_theta=1e6,
              rms_norm_eps=1e-6, max_position_embeddings=40960, num_key_value_heads=8,
              bos_token_id=None, eos_token_id=151643, pad_token_id=151643)
# Architectures by name, for planning and benchmarking without a checkpoint (random or no
# weights): the config.json fields of the public models.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    # the paper's Bradley-Terry baseline backbone (Llama-3.1-8B-Instruct)
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False, max_position_embeddings=131072,
                        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
                        bos_token_id=128000, eos_token_id=128009, pad_token_id=128009),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def shape_config(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a named architecture (`SHAPES`), e.g. shape_config("qwen3-8b",
    dtype="bfloat16")."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; expected one of {sorted(SHAPES)}")
    return ModelConfig(**{**SHAPES[name], **overrides})

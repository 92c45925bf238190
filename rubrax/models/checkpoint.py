"""Hugging Face checkpoint folders <-> rubrax params, without torch.

A folder is config.json plus model.safetensors or sharded model-0000i-of-0000n.safetensors
with model.safetensors.index.json. Tensor names and [out, in] weight layout are those of
transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM, so a folder written
by `save_pretrained` loads in transformers (PyTorch) and vLLM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from rubrax.hostmem import release_host_memory
from rubrax.models.config import ARCHITECTURES, ModelConfig

_ARCH_TO_TYPE = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
# rubrax layer param path -> HF tensor name inside model.layers.{i}.
_LAYER_KERNELS = {
    ("self_attn", "q_proj"): "self_attn.q_proj",
    ("self_attn", "k_proj"): "self_attn.k_proj",
    ("self_attn", "v_proj"): "self_attn.v_proj",
    ("self_attn", "o_proj"): "self_attn.o_proj",
    ("mlp", "gate_proj"): "mlp.gate_proj",
    ("mlp", "up_proj"): "mlp.up_proj",
    ("mlp", "down_proj"): "mlp.down_proj",
}
_LAYER_NORMS = {
    ("input_layernorm",): "input_layernorm",
    ("post_attention_layernorm",): "post_attention_layernorm",
    ("self_attn", "q_norm"): "self_attn.q_norm",
    ("self_attn", "k_norm"): "self_attn.k_norm",
}
_DEFAULT_SHARD_BYTES = 2 * 1024**3


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json",
                   dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; unsupported features raise ValueError
    naming the offending field."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in archs:
        if arch not in _ARCH_TO_TYPE:
            raise ValueError(f"{source}: architectures={archs!r} is not supported; expected "
                             f"one of {sorted(_ARCH_TO_TYPE)}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; expected one "
                         f"of {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    if hf.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=True is not supported")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{source}: use_sliding_window=True is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling")
    if legacy_scaling:
        rope.update(legacy_scaling)
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    bias = bool(hf.get("attention_bias", False))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # HF default
            attention_bias=True if model_type == "qwen2" else bias,
            attention_out_bias=False if model_type == "qwen2" else bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json contents; writes both rope_theta/rope_scaling (transformers 4, vLLM) and
    rope_parameters (transformers 5)."""
    scaling = config.rope_scaling_dict
    hf = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}),
                            "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                         else config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "use_cache": True,
    }
    if config.model_type == "qwen2":
        if not config.attention_bias or config.attention_out_bias:
            raise ValueError("qwen2 requires attention_bias=True and attention_out_bias=False")
        hf["use_sliding_window"] = False
    else:
        if config.attention_bias != config.attention_out_bias:
            raise ValueError(f"{config.model_type} needs attention_bias == attention_out_bias")
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    if config.model_type == "qwen3":
        if not config.qk_norm:
            raise ValueError("qwen3 requires qk_norm=True")
        hf["use_sliding_window"] = False
    elif config.qk_norm:
        raise ValueError("qk_norm=True is only exported as model_type='qwen3'")
    return hf


def expected_tensors(config: ModelConfig) -> list[str]:
    """HF tensor names a checkpoint of this config must contain."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        for path, hf in _layer_entries(config):
            names.append(f"model.layers.{i}.{hf}")
    return names


def _layer_entries(config: ModelConfig):
    """(rubrax path inside params['layers'], HF suffix) for every per-layer tensor."""
    for path, hf in _LAYER_KERNELS.items():
        yield path + ("kernel",), hf + ".weight"
        if path[1] in ("q_proj", "k_proj", "v_proj") and config.attention_bias:
            yield path + ("bias",), hf + ".bias"
        if path[1] == "o_proj" and config.attention_out_bias:
            yield path + ("bias",), hf + ".bias"
    for path, hf in _LAYER_NORMS.items():
        if path[-1] in ("q_norm", "k_norm") and not config.qk_norm:
            continue
        yield path + ("scale",), hf + ".weight"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    return files


def load_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as numpy arrays (bf16 via ml_dtypes)."""
    lazy = LazyTensors(path)
    return {name: lazy[name] for name in lazy}


class LazyTensors(Mapping):
    """The tensors of a (sharded) safetensors folder, read one at a time on access.

    `load_pretrained` builds the params from this, so the host never holds the whole
    checkpoint as numpy arrays next to the params (peak host memory ~ params + one
    stacked layer tensor, instead of ~3x the checkpoint)."""

    def __init__(self, path: str | os.PathLike):
        self._where: dict[str, Path] = {}
        for file in _safetensor_files(Path(path)):
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    self._where[name] = file

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(self._where[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, *,
                           source: str = "checkpoint") -> dict:
    """Map HF tensor names to the rubrax params PyTree (transposing kernels, stacking layers).

    Missing tensors raise KeyError listing (up to 10 of) their names."""
    missing = [n for n in expected_tensors(config) if n not in tensors]
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"{source}: missing tensors {missing[:10]}{more}")
    pdt = jnp.dtype(config.param_dtype)
    params: dict = {}
    params["embed_tokens"] = {"embedding": jnp.asarray(tensors["model.embed_tokens.weight"], pdt)}
    params["norm"] = {"scale": jnp.asarray(tensors["model.norm.weight"], pdt)}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": jnp.asarray(tensors["lm_head.weight"].T, pdt)}
    for path, hf in _layer_entries(config):
        # One parameter at a time, written straight into its stacked buffer, so only one
        # stacked host tensor exists besides the params (tensors may be a LazyTensors).
        stacked = None
        for i in range(config.num_hidden_layers):
            value = np.asarray(tensors[f"model.layers.{i}.{hf}"])
            if path[-1] == "kernel":
                value = value.T  # HF [out, in] -> [in, out]
            if stacked is None:
                stacked = np.empty((config.num_hidden_layers,) + value.shape, value.dtype)
            stacked[i] = value
        _set(params.setdefault("layers", {}), path, jnp.asarray(stacked, pdt))
    return params


def params_to_hf_tensors(params: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse of params_from_hf_tensors (contiguous numpy arrays, params' dtype).
    Accepts either layer layout (stacked or `unstack_layers`)."""
    from rubrax.models.llama import stack_layers

    params = stack_layers(params)
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    for path, hf in _layer_entries(config):
        stacked = np.asarray(_get(params["layers"], path))
        for i in range(config.num_hidden_layers):
            value = stacked[i].T if path[-1] == "kernel" else stacked[i]
            out[f"model.layers.{i}.{hf}"] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32") -> tuple[dict, ModelConfig]:
    """Read config.json and (sharded) safetensors from an HF folder -> (params, config)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found")
    config = config_from_hf(json.loads(config_file.read_text()), source=str(config_file),
                            dtype=dtype, param_dtype=param_dtype)
    params = params_from_hf_tensors(LazyTensors(path), config, source=str(path))
    release_host_memory()  # the file tensors and stacking copies are garbage now
    return params, config


def save_pretrained(params: Mapping, config: ModelConfig, path: str | os.PathLike, *,
                    max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf_tensors(params, config)
    torch_dtype = str(next(iter(tensors.values())).dtype)
    (path / "config.json").write_text(
        json.dumps(config_to_hf(config, torch_dtype=torch_dtype), indent=2) + "\n")
    shards = _split_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors without format=pt
    if len(shards) == 1:
        _save(shards[0], path / "model.safetensors", metadata)
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, path / name, metadata)
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def _split_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def _save(tensors: Mapping[str, np.ndarray], file: Path, metadata: dict) -> None:
    # Write to a temporary name first so an interrupted save never leaves a torn file.
    tmp = file.with_suffix(".tmp")
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, file)

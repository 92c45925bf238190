"""Hugging Face checkpoint folders <-> rubrax params, without torch.

A folder is config.json plus model.safetensors or sharded model-0000i-of-0000n.safetensors
with model.safetensors.index.json. Tensor names and [out, in] weight layout are those of
transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM, so a folder written
by `save_pretrained` loads in transformers (PyTorch) and vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
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


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`


def _read_header(file: Path) -> dict[str, _Entry]:
    """The tensor table of one safetensors file (8-byte little-endian header size, JSON
    header, then the raw little-endian data)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        entry = _Entry(file, np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + size + begin)
        if end - begin != entry.dtype.itemsize * math.prod(entry.shape):
            raise ValueError(f"{file}: tensor {name!r}: data_offsets {info['data_offsets']} do not "
                             f"match shape {entry.shape} x {info['dtype']}")
        entries[name] = entry
    return entries


class LazyTensors(Mapping):
    """The tensors of a (sharded) safetensors folder, read on access.

    Headers are parsed once; `read(name, index)` reads from disk only the rows of the
    tensor's first axis that `index` selects (one `readinto` of a contiguous byte range,
    no memory map, so the page cache never counts as this process's memory), then slices
    the other axes. `load_pretrained` builds each device shard from such reads, so neither
    the whole checkpoint nor (when sharded along the first HF axis) a whole tensor is ever
    on the host at once."""

    def __init__(self, path: str | os.PathLike):
        self._entries: dict[str, _Entry] = {}
        for file in _safetensor_files(Path(path)):
            self._entries.update(_read_header(file))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """tensor[index] for a tuple of slices (numpy, in the file's dtype)."""
        e = self._entries[name]
        if not e.shape:
            return self._read_rows(e, name, 0, 1).reshape(())
        index = tuple(index) + (slice(None),) * (len(e.shape) - len(index))
        lo, hi, step = index[0].indices(e.shape[0])
        rows = self._read_rows(e, name, lo, max(hi, lo))
        return rows[(slice(None, None, step),) + index[1:]]

    @staticmethod
    def _read_rows(e: _Entry, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the tensor's first axis: one contiguous byte range."""
        buf = np.empty((hi - lo,) + e.shape[1:], e.dtype)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.offset + lo * e.dtype.itemsize * math.prod(e.shape[1:]))
            done = 0
            while done < view.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{e.file}: tensor {name!r} is truncated")
                done += n
        return buf

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _tensor_shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(np.shape(tensors[name]))


def _read_slice(tensors: Mapping, name: str, index: tuple) -> np.ndarray:
    if isinstance(tensors, LazyTensors):
        return tensors.read(name, index)
    return np.asarray(tensors[name])[index]


def _leaf_plan(config: ModelConfig):
    """(rubrax path, HF name(s), transposed?) for every param leaf; a list of L names for
    a stacked [L, ...] layer leaf."""
    yield ("embed_tokens", "embedding"), "model.embed_tokens.weight", False
    yield ("norm", "scale"), "model.norm.weight", False
    if not config.tie_word_embeddings:
        yield ("lm_head", "kernel"), "lm_head.weight", True
    for path, hf in _layer_entries(config):
        names = [f"model.layers.{i}.{hf}" for i in range(config.num_hidden_layers)]
        yield ("layers",) + path, names, path[-1] == "kernel"


def param_shapes(config: ModelConfig) -> dict:
    """The params PyTree as jax.ShapeDtypeStructs (param dtype), without allocating it."""
    from rubrax.models.llama import init_params

    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def _resolve_shardings(shardings, abstract):
    """None -> every leaf on the default device; one Sharding -> all leaves; a callable
    -> called with the abstract params; else a PyTree of Shardings like the params."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        shardings = shardings(abstract)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, abstract)
    return shardings


def _leaf_callback(tensors, names, transposed: bool, dtype):
    """index of the rubrax leaf -> that block as numpy in `dtype`, read slice by slice
    (per layer for stacked leaves); repeated indices (replicated shards) read once."""
    stacked = isinstance(names, list)
    memo: dict = {}

    def one(name, index):
        if transposed:  # rubrax [in, out] is HF [out, in]
            return _read_slice(tensors, name, tuple(index[::-1])).T.astype(dtype)
        return _read_slice(tensors, name, tuple(index)).astype(dtype, copy=False)

    def block(index):
        if not stacked:
            return np.ascontiguousarray(one(names, index))
        layers = range(len(names))[index[0]]
        first = one(names[layers[0]], index[1:])
        out = np.empty((len(layers),) + first.shape, dtype)
        out[0] = first
        del first
        for j, i in enumerate(layers[1:], 1):  # one layer's slice alive at a time, not all of them
            out[j] = one(names[i], index[1:])
        return out

    def callback(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in memo:
            memo[key] = block(index)
        return memo[key]

    return callback


def _check_shapes(tensors, config: ModelConfig, abstract, source: str) -> None:
    for path, names, transposed in _leaf_plan(config):
        want = _get(abstract, path).shape
        want = want[1:] if isinstance(names, list) else want
        want = tuple(want[::-1]) if transposed else tuple(want)
        for name in names if isinstance(names, list) else [names]:
            got = _tensor_shape(tensors, name)
            if got != want:
                raise ValueError(f"{source}: tensor {name!r} has shape {list(got)}, expected "
                                 f"{list(want)} for this config.json")


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, *,
                           source: str = "checkpoint", shardings=None) -> dict:
    """Map HF tensor names to the rubrax params PyTree (transposing kernels, stacking
    layers, converting to config.param_dtype).

    Every leaf is built by `jax.make_array_from_callback`: each device shard is read from
    `tensors` on its own (for a `LazyTensors`, only its bytes), so a sharded leaf never
    exists whole on one device or on the host. `shardings` (see `load_pretrained`) places
    the leaves; None puts them on the default device. Missing tensors raise KeyError listing
    (up to 10 of) their names; a tensor of the wrong shape raises ValueError naming it."""
    missing = [n for n in expected_tensors(config) if n not in tensors]
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"{source}: missing tensors {missing[:10]}{more}")
    abstract = param_shapes(config)
    _check_shapes(tensors, config, abstract, source)
    placement = _resolve_shardings(shardings, abstract)
    pdt = np.dtype(jnp.dtype(config.param_dtype))
    params: dict = {}
    for path, names, transposed in _leaf_plan(config):
        shape = _get(abstract, path).shape
        callback = _leaf_callback(tensors, names, transposed, pdt)
        _set(params, path, jax.make_array_from_callback(shape, _get(placement, path), callback,
                                                        dtype=pdt))
        del callback  # its memo holds the host blocks of replicated shards
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
                    param_dtype: str = "float32", shardings=None) -> tuple[dict, ModelConfig]:
    """Read config.json and (sharded) safetensors from an HF folder -> (params, config).

    dtype / param_dtype: compute and stored dtypes (e.g. param_dtype="bfloat16" converts
    each slice as it is read). shardings places the params as they load, each device shard
    read from the files straight into its device (never a full tensor on one device, never
    the whole model on the host; multi-host: each process reads only its own shards):
      None                 every leaf on the default device (the whole model there);
      a Sharding           every leaf, e.g. NamedSharding(mesh, PartitionSpec()) (replicated);
      a callable           called with the abstract params (jax.ShapeDtypeStruct PyTree),
                           e.g. `lambda p: rubrax.sharding.param_sharding(p, mesh, fsdp=True)`;
      a PyTree of Shardings shaped like the params.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found")
    config = config_from_hf(json.loads(config_file.read_text()), source=str(config_file),
                            dtype=dtype, param_dtype=param_dtype)
    params = params_from_hf_tensors(LazyTensors(path), config, source=str(path),
                                    shardings=shardings)
    release_host_memory()  # the per-leaf read buffers are garbage now
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

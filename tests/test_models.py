"""Llama-family decoder: parity with transformers' PyTorch models, checkpoints, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.models import ModelConfig, forward, hidden_states, init_params, load_pretrained, save_pretrained
from rubrax.models.checkpoint import load_hf_tensors, params_from_hf_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = {
    # Llama 3 with its rope_scaling and untied head, plus attention bias on q/k/v/o.
    "llama3": ModelConfig.tiny(
        tie_word_embeddings=False, rope_theta=500000.0, attention_bias=True,
        attention_out_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # SmolLM2: llama, tied embeddings, rope_theta 1e5, 3:1 GQA.
    "smollm2": ModelConfig.tiny(rope_theta=100000.0, num_attention_heads=6,
                                num_key_value_heads=2, hidden_size=96, rms_norm_eps=1e-5),
    "qwen2": ModelConfig.tiny(model_type="qwen2", attention_bias=True, rope_theta=1e6,
                              tie_word_embeddings=False),
    # Qwen3: per-head q/k RMSNorm and head_dim != hidden/heads.
    "qwen3": ModelConfig.tiny(model_type="qwen3", qk_norm=True, head_dim=32, rope_theta=1e6),
}


def random_params(config, seed):
    """Random weights everywhere (norm scales near 1, nonzero biases), so all are tested."""
    params = init_params(config, jax.random.key(seed))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))

    def perturb(path, x, key):
        noise = jax.random.normal(key, x.shape, x.dtype)
        name = path[-1].key
        return {"scale": 1.0 + 0.1 * noise, "kernel": 0.2 * noise}.get(name, 0.1 * noise)

    return jax.tree.unflatten(treedef, [perturb(p, x, k) for (p, x), k in zip(flat, keys)])


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def hf_logits(model, tokens, mask=None, positions=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    config = FAMILIES[family]
    params = random_params(config, seed=len(family))
    save_pretrained(params, config, tmp_path)
    hf = load_hf(tmp_path)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    # Row 0 is left-padded by 5 (HF gets the same positions explicitly), row 1 is not.
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(forward(params, jnp.asarray(tokens), config=config,
                              mask_BxT=jnp.asarray(mask)))
    theirs = hf_logits(hf, tokens, mask, positions)
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero logits
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # HF's default positions (arange) on the unpadded row agree as well.
    np.testing.assert_allclose(ours[1], hf_logits(hf, tokens[1:])[0], atol=1e-4, rtol=1e-4)


def test_hf_written_checkpoint_loads(tmp_path):
    """transformers writes a checkpoint (sharded), rubrax loads it and matches its logits."""
    hf_config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    params, config = load_pretrained(tmp_path)
    assert config.model_type == "qwen3" and config.qk_norm and not config.tie_word_embeddings
    tokens = np.random.default_rng(1).integers(0, 128, (2, 16))
    ours = np.asarray(forward(params, jnp.asarray(tokens), config=config))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=1e-4)

    # Round trip: rubrax load -> save_pretrained (sharded) -> transformers load, same logits.
    out = tmp_path / "resaved"
    save_pretrained(params, config, out, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(hf_logits(load_hf(out), tokens), ours, atol=1e-4, rtol=1e-4)
    params2, config2 = load_pretrained(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bf16_compute_close_to_fp32():
    config = ModelConfig.tiny()
    params = random_params(config, 3)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 12)))
    ref = forward(params, tokens, config=config)
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(params16, tokens, config=bf16)
    assert out.dtype == jnp.float32
    assert hidden_states(params16, tokens, config=bf16).dtype == jnp.bfloat16
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_unsupported_architecture_names_field(tmp_path):
    config = ModelConfig.tiny()
    save_pretrained(init_params(config, jax.random.key(0)), config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="architectures.*MistralForCausalLM"):
        load_pretrained(tmp_path)
    hf["architectures"] = ["LlamaForCausalLM"]
    hf["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="hidden_act"):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    config = ModelConfig.tiny()
    save_pretrained(init_params(config, jax.random.key(0)), config, tmp_path)
    tensors = load_hf_tensors(tmp_path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        params_from_hf_tensors(tensors, config)


def test_config_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.tiny(model_type="gpt2")
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    assert hash(FAMILIES["llama3"]) == hash(FAMILIES["llama3"].replace())


# Abbreviated config.json files as published on the hub (fields that matter here).
HUB_CONFIGS = {
    "Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
        "rope_theta": 100000, "rope_scaling": None, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2},
    "Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": 21, "max_position_embeddings": 32768,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645},
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None,
        "attention_bias": False, "tie_word_embeddings": True, "use_sliding_window": False,
        "max_position_embeddings": 40960, "hidden_act": "silu", "bos_token_id": 151643,
        "eos_token_id": 151645},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs_parse_and_round_trip(name):
    from rubrax.models.checkpoint import config_from_hf, config_to_hf

    hf = HUB_CONFIGS[name]
    config = config_from_hf(hf)
    assert config.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    assert config.attention_bias == (hf["model_type"] == "qwen2")
    assert config.qk_norm == (hf["model_type"] == "qwen3")
    assert config.tie_word_embeddings
    written = config_to_hf(config)
    assert config_from_hf(written) == config
    # transformers reads what we write into the same config as the original.
    ref = transformers.AutoConfig.for_model(**hf)
    ours = transformers.AutoConfig.for_model(**written)
    for field in ("hidden_size", "num_key_value_heads", "head_dim", "rope_parameters",
                  "tie_word_embeddings", "rms_norm_eps", "eos_token_id"):
        if getattr(ref, field, None) is not None:  # Qwen2 derives head_dim itself
            assert getattr(ours, field) == getattr(ref, field), field


def test_unstacked_layout_matches_stacked_values_gradients_and_checkpoint(tmp_path):
    """Per-layer (unrolled) params give the same logits and gradients as the stacked scan
    for a Qwen3 config with q/k norm and attention biases, and save_pretrained writes the same files."""
    from rubrax.models import is_unstacked, stack_layers, unstack_layers

    config = ModelConfig.tiny(model_type="qwen3", qk_norm=True, attention_bias=True, attention_out_bias=True)
    params = init_params(config, jax.random.key(3))
    split = unstack_layers(params)
    assert is_unstacked(split) and not is_unstacked(params) and len(split["layers"]) == config.num_hidden_layers
    tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, config.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], jnp.int32)
    np.testing.assert_allclose(forward(split, tokens, config=config, mask_BxT=mask),
                               forward(params, tokens, config=config, mask_BxT=mask), atol=1e-5)
    loss = lambda p: jnp.sum(jnp.sin(forward(p, tokens, config=config, mask_BxT=mask)))  # noqa: E731
    g_split, g_stacked = jax.grad(loss)(split), jax.grad(loss)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), stack_layers(g_split), g_stacked)
    save_pretrained(split, config, tmp_path / "a")
    save_pretrained(params, config, tmp_path / "b")
    back, _ = load_pretrained(tmp_path / "a")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


def test_unstack_on_cpu_aliases_and_survives_donation_of_the_original():
    from rubrax.models import unstack_layers

    config = ModelConfig.tiny()
    params = jax.device_put(init_params(config, jax.random.key(5)), jax.devices()[0])
    split = unstack_layers(params)
    stacked = params["layers"]["mlp"]["up_proj"]["kernel"]
    layer1 = split["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert layer1.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + layer1.nbytes  # no copy
    expected = np.array(stacked[1])
    jax.block_until_ready(jax.jit(lambda p: jax.tree.map(lambda x: x * 0 - 1, p), donate_argnums=0)(params))
    np.testing.assert_array_equal(np.asarray(layer1), expected)


def test_sharded_load_reads_each_shard_straight_into_its_device(tmp_path, monkeypatch):
    """load_pretrained(shardings=FSDP over 8 devices): every leaf equals the unsharded
    load, each device holds only its shard (1/8 of a split leaf), the row-split embedding
    is read from disk once in total, 1/8 per read; bf16 conversion happens per slice; a
    single Sharding (replicated) also works."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from rubrax.models.checkpoint import LazyTensors
    from rubrax.sharding import param_sharding

    config = FAMILIES["llama3"]
    save_pretrained(random_params(config, 5), config, tmp_path, max_shard_bytes=60_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    full, _ = load_pretrained(tmp_path)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    reads: dict = {}
    original = LazyTensors._read_rows

    def counting(e, name, lo, hi):
        out = original(e, name, lo, hi)
        reads.setdefault(name, []).append(out.nbytes)
        return out

    monkeypatch.setattr(LazyTensors, "_read_rows", staticmethod(counting))
    fsdp = lambda abstract: param_sharding(abstract, mesh, fsdp=True)
    sharded, _ = load_pretrained(tmp_path, shardings=fsdp)
    want = param_sharding(full, mesh, fsdp=True)
    split = 0
    for x, ref, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(full), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
        assert x.sharding == sharding and len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            assert shard.data.shape == sharding.shard_shape(x.shape)
        if not sharding.is_fully_replicated:
            split += 1
            assert all(s.data.size * 8 == x.size for s in x.addressable_shards)
    assert split == len(jax.tree.leaves(full))  # every tiny leaf has an axis divisible by 8
    embed = reads["model.embed_tokens.weight"]
    assert len(embed) == 8 and sum(embed) == config.vocab_size * config.hidden_size * 4

    bf16, _ = load_pretrained(tmp_path, param_dtype="bfloat16", shardings=fsdp)
    for x, ref in zip(jax.tree.leaves(bf16), jax.tree.leaves(full)):
        assert x.dtype == jnp.bfloat16 and not x.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref.astype(jnp.bfloat16)))
    replicated, _ = load_pretrained(tmp_path, shardings=NamedSharding(mesh, PartitionSpec()))
    for x, ref in zip(jax.tree.leaves(replicated), jax.tree.leaves(full)):
        assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))


def test_wrong_tensor_shape_is_named(tmp_path):
    config = ModelConfig.tiny()
    save_pretrained(init_params(config, jax.random.key(0)), config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_pretrained(tmp_path)

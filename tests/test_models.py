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


def hf_logits(path, tokens, mask=None, positions=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
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
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ours = np.asarray(forward(params, jnp.asarray(tokens), config=config))
    theirs = hf_logits(tmp_path, tokens)
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    # Left padding: real tokens see the same logits in both implementations.
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(forward(params, jnp.asarray(tokens), config=config,
                              mask_BxT=jnp.asarray(mask)))
    theirs = hf_logits(tmp_path, tokens, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


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
    np.testing.assert_allclose(ours, hf_logits(tmp_path, tokens), atol=1e-4, rtol=1e-4)

    # Round trip: rubrax load -> save_pretrained (sharded) -> transformers load, same logits.
    out = tmp_path / "resaved"
    save_pretrained(params, config, out, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(hf_logits(out, tokens), ours, atol=1e-4, rtol=1e-4)
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

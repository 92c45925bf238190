"""Real SmolLM2-135M-Instruct converted offline from the bundled GGUF: the conversion against
transformers' GGUF reader, logits and greedy completion against transformers' PyTorch Llama,
and the tokenizer against transformers' GGUF tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.models import forward, load_pretrained, load_tokenizer, smollm2_checkpoint
from rubrax.models.gguf import smollm2_gguf_path
from rubrax.policy import SampleConfig, sample

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def converted():
    path = smollm2_checkpoint()
    params, config = load_pretrained(path)
    return path, params, config


@pytest.fixture(scope="module")
def hf_model(converted):
    """transformers' PyTorch Llama reading the converted folder."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        converted[0], dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def test_conversion_matches_transformers_gguf_reader(converted):
    """Dequantization and Q/K un-permutation agree with transformers' own GGUF reader."""
    import gguf
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    ours = load_file(converted[0] / "model.safetensors")
    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
             "blk.29.attn_k.weight": "model.layers.29.self_attn.k_proj.weight",
             "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
             "output_norm.weight": "model.norm.weight"}
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in names.items():
        t = tensors[gguf_name]
        expected = processor.process(gguf.quants.dequantize(t.data, t.tensor_type), gguf_name)
        np.testing.assert_array_equal(ours[hf_name], expected.weights, err_msg=gguf_name)
    assert set(ours) == {n for n in ours if n.startswith("model.")}  # tied: no lm_head


def test_checkpoint_is_converted_once(converted):
    weights = converted[0] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2_checkpoint() == converted[0]
    assert weights.stat().st_mtime_ns == before


def test_config_and_tokenizer(converted):
    path, _, config = converted
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    ours = load_tokenizer(path)
    gguf = smollm2_gguf_path()
    theirs = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in ["Hello world 12345, what's up?", "naïve café: 3.14159 ≈ π\n\tend"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    assert [ours.encode(d) for d in "2026"] == [[ours.encode("2026")[i]] for i in range(4)]
    ids = ours.apply_chat_template(MESSAGES)
    assert ours.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert ours.eos_token_id == 2 and ours.decode([2], skip_special_tokens=False) == "<|im_end|>"


def test_logits_and_greedy_completion_match_transformers(converted, hf_model):
    path, params, config = converted
    tok = load_tokenizer(path)
    prompt = tok.apply_chat_template(MESSAGES)
    ours = np.asarray(forward(params, jnp.asarray([prompt]), config=config))
    with torch.no_grad():
        theirs = hf_model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    n_new = 12
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf_completion = hf_out[0, len(prompt):].tolist()
    cfg = SampleConfig(max_new_tokens=n_new, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    out = sample(params, np.asarray([prompt]), np.ones((1, len(prompt))), jax.random.key(0), cfg,
                 config=config)
    completion = [int(t) for t, m in zip(out.tokens[0], out.mask[0]) if m]
    assert completion == hf_completion
    assert "Paris" in tok.decode(completion)


def test_load_pretrained_streams_tensors_peak_host_memory(converted):
    """load_pretrained builds the params one tensor at a time: the process's peak RSS
    grows by little more than the params themselves (it used to hold the file tensors and
    a stacked copy too, ~2.5x). Fresh subprocess, so the peak is the load's own."""
    import subprocess
    import sys
    import textwrap

    prog = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        jnp.zeros(1).block_until_ready()
        def hwm():
            status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
            return int(status["VmHWM"].split()[0]) / 1024
        base = hwm()
        from rubrax.models import load_pretrained
        params, config = load_pretrained({str(converted[0])!r})
        size = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
        print(base, hwm(), size)
    """)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout
    base, peak, size = map(float, out.split())
    assert size > 500  # SmolLM2-135M in float32
    assert peak - base < 1.4 * size, (base, peak, size)


_SHARDED_LOAD = """
import os, sys
pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=pid)
jnp.zeros(1).block_until_ready()
def hwm():
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return int(status["VmHWM"].split()[0]) / 2**10
base = hwm()
from jax.sharding import Mesh
from rubrax.models import load_pretrained
from rubrax.sharding import param_sharding
mesh = Mesh(np.asarray(jax.devices()), ("data",))
params, _ = load_pretrained(path, shardings=lambda p: param_sharding(p, mesh, fsdp=True))
size = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
local = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards) / 2**20
first = float(np.asarray(params["embed_tokens"]["embedding"].addressable_shards[0].data)[0, 0])
print(base, hwm(), size, local, first)
"""


def test_sharded_load_on_two_processes_holds_half_the_model_per_host(converted):
    """Two processes (4 CPU devices each) load SmolLM2 FSDP-sharded over all 8 devices:
    each reads only its own shards, so its peak RSS grows by about half the model (never
    the whole model, as an unsharded load must), and its shards hold the right values."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", _SHARDED_LOAD, str(pid), port, str(converted[0])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    embed = np.asarray(converted[1]["embed_tokens"]["embedding"])
    firsts = []
    for out, _ in outs:
        base, peak, size, local, first = map(float, out.split())
        assert size > 500  # SmolLM2-135M in float32
        assert abs(local - size / 2) < 0.02 * size, (local, size)
        assert peak - base < 0.75 * size, (base, peak, size)
        firsts.append(first)
    rows = embed.shape[0] // 8  # process 1's first device holds rows [4 * rows, 5 * rows)
    assert firsts == [embed[0, 0], embed[4 * rows, 0]]

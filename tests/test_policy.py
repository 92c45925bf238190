"""Policy log-probabilities and the KV-cached sampler on tiny random models."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.models import ModelConfig, forward, init_params
from rubrax.models import llama
from rubrax.policy import SampleConfig, _sample_rows, categorical_from_uniform, logprobs, sample

CONFIG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def params():
    # Larger-than-init weights so the distribution is far from uniform and argmax is stable.
    p = init_params(CONFIG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, p)


def left_padded(rows, width):
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return tokens, mask


def test_logprobs_are_gathered_log_softmax(params):
    tokens, mask = left_padded([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], 6)
    logp = np.asarray(logprobs(params, tokens, mask, config=CONFIG))
    full = np.asarray(jax.nn.log_softmax(forward(params, jnp.asarray(tokens), config=CONFIG,
                                                 mask_BxT=jnp.asarray(mask))))
    for b, t in [(0, 3), (0, 5), (1, 1), (1, 5)]:
        assert logp[b, t] == pytest.approx(full[b, t - 1, tokens[b, t]], abs=1e-5)
    # Zero on padding and on each row's first real token; padding leaves the rest unchanged.
    np.testing.assert_array_equal(logp[0, :3], 0.0)
    assert logp[1, 0] == 0.0
    alone = np.asarray(logprobs(params, tokens[:1, 2:], mask[:1, 2:], config=CONFIG))
    np.testing.assert_allclose(alone[0], logp[0, 2:], atol=1e-5)


def test_chunked_logprobs_match_and_differentiate(params):
    tokens, mask = left_padded([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], 7)

    def loss(p, chunk):
        return jnp.sum(logprobs(p, tokens, mask, config=CONFIG, chunk_size=chunk))

    full, g_full = jax.value_and_grad(loss)(params, None)
    chunked, g_chunked = jax.value_and_grad(loss)(params, 4)  # 6 targets -> 2 chunks, padded
    assert float(chunked) == pytest.approx(float(full), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_chunked, g_full)


def test_kv_cache_decoding_equals_full_recomputation(params):
    tokens, mask = left_padded([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]], 10)
    full = forward(params, jnp.asarray(tokens), config=CONFIG, mask_BxT=jnp.asarray(mask))
    prefix = 6
    kv_mask = jnp.asarray(mask)
    positions = llama.default_positions(kv_mask)
    cache = llama.init_cache(CONFIG, 2, 10)

    @jax.jit
    def step(tokens, positions, cache, index):
        h, cache = llama.forward_with_cache(params, tokens, positions, kv_mask, cache, index,
                                            config=CONFIG)
        return llama.lm_logits(params, h, config=CONFIG), cache

    logits, cache = step(jnp.asarray(tokens[:, :prefix]), positions[:, :prefix], cache, 0)
    steps = [logits]
    for t in range(prefix, 10):
        logits, cache = step(jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], cache, t)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)


GREEDY = SampleConfig(max_new_tokens=6, temperature=0.0, n=2, stop_token_ids=(), prompt_bucket=8)
PROMPTS = left_padded([[5, 6, 7], [9, 10, 11, 12, 13]], 5)


@pytest.fixture(scope="module")
def greedy_out(params):
    return sample(params, *PROMPTS, jax.random.key(0), GREEDY, config=CONFIG)


def test_greedy_is_argmax_deterministic_and_consistent(params, greedy_out):
    tokens, mask = PROMPTS
    cfg, out = GREEDY, greedy_out
    again = sample(params, tokens, mask, jax.random.key(123), cfg, config=CONFIG)
    np.testing.assert_array_equal(out.tokens, again.tokens)
    np.testing.assert_array_equal(out.tokens[0], out.tokens[1])  # prompt-major rows
    np.testing.assert_array_equal(out.mask, 1)
    # Full recomputation over prompt + completion: every generated token is the argmax
    # and the sampler's logprobs equal `logprobs` of the sampled tokens.
    seq = np.concatenate([np.repeat(tokens, 2, 0), np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([np.repeat(mask, 2, 0), np.asarray(out.mask)], axis=1)
    logits = np.asarray(forward(params, jnp.asarray(seq), config=CONFIG,
                                mask_BxT=jnp.asarray(seq_mask)))
    np.testing.assert_array_equal(logits[:, 4:-1].argmax(-1), np.asarray(out.tokens))
    logp = np.asarray(logprobs(params, seq, seq_mask, config=CONFIG))[:, 5:]
    np.testing.assert_allclose(np.asarray(out.logprobs), logp, atol=1e-5)


def test_sampled_logprobs_are_untruncated_model_logprobs(params):
    tokens, mask = left_padded([[5, 6, 7], [9, 10, 11, 12, 13]], 5)
    cfg = SampleConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, n=3,
                       stop_token_ids=(), prompt_bucket=8)
    out = sample(params, tokens, mask, jax.random.key(1), cfg, config=CONFIG)
    assert out.tokens.shape == (6, 8)
    seq = np.concatenate([np.repeat(tokens, 3, 0), np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([np.repeat(mask, 3, 0), np.asarray(out.mask)], axis=1)
    logp = np.asarray(logprobs(params, seq, seq_mask, config=CONFIG))[:, 5:]
    np.testing.assert_allclose(np.asarray(out.logprobs), logp, atol=1e-5)
    assert len({tuple(r) for r in np.asarray(out.tokens)}) > 1  # samples differ


def _numpy_sampling_logprobs(logits_V, temperature, top_k, top_p):
    """The sampled distribution written out in float64: tempered softmax, keep the top_k
    most likely tokens, then the smallest prefix of the sorted rest with mass >= top_p."""
    z = logits_V.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[:top_k]] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    mass_before = np.cumsum(q[order]) - q[order]
    keep[order[mass_before >= top_p]] = False
    q = np.where(keep, q, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(q / q.sum())


def test_sampling_logprobs_are_those_of_the_truncated_distribution(params):
    """Behaviour logprobs for importance sampling: log q of the tempered, top-k / top-p
    renormalised distribution, by an independent float64 construction; the empirical
    frequencies of 4000 first tokens follow exp(log q); the untruncated logprobs would bias
    pi / q low by the mass the filter removed."""
    tokens, mask = left_padded([[5, 6, 7]], 3)
    cfg = SampleConfig(max_new_tokens=2, temperature=0.7, top_k=6, top_p=0.8, n=4000,
                       stop_token_ids=(), prompt_bucket=4)
    out = jax.device_get(sample(params, tokens, mask, jax.random.key(3), cfg, config=CONFIG))
    seq = np.concatenate([np.repeat(tokens, cfg.n, 0), out.tokens], axis=1)
    logits = np.asarray(forward(params, jnp.asarray(seq[:64]), config=CONFIG))
    for row in range(64):
        for t in range(2):
            ref = _numpy_sampling_logprobs(logits[row, 2 + t], 0.7, 6, 0.8)
            assert out.sampling_logprobs[row, t] == pytest.approx(ref[out.tokens[row, t]], abs=1e-4)
    q = np.exp(_numpy_sampling_logprobs(logits[0, 2], 0.7, 6, 0.8))
    kept = np.flatnonzero(q > 0)
    assert 1 < len(kept) <= 6
    freq = np.bincount(out.tokens[:, 0], minlength=len(q)) / cfg.n
    assert set(np.flatnonzero(freq)) <= set(kept)  # never a filtered token
    np.testing.assert_allclose(freq[kept], q[kept], atol=0.03)
    p_model = np.exp(out.logprobs[:, 0])
    first = {tok: i for i, tok in enumerate(out.tokens[:, 0])}
    mass_model = sum(p_model[i] for i in first.values())
    mass_q = sum(np.exp(out.sampling_logprobs[i, 0]) for i in first.values())
    assert mass_q == pytest.approx(1.0, abs=1e-4) and mass_model < 0.97


def test_sampling_logprobs_equal_logprobs_without_filters_and_zero_when_greedy(params, greedy_out):
    tokens, mask = PROMPTS
    cfg = SampleConfig(max_new_tokens=5, n=2, stop_token_ids=(), prompt_bucket=8)
    out = sample(params, tokens, mask, jax.random.key(2), cfg, config=CONFIG)
    np.testing.assert_array_equal(np.asarray(out.sampling_logprobs), np.asarray(out.logprobs))
    np.testing.assert_array_equal(np.asarray(greedy_out.sampling_logprobs), 0.0)


def test_padding_and_batching_do_not_change_samples(params):
    cfg = SampleConfig(max_new_tokens=8, temperature=1.0, n=2, stop_token_ids=(),
                       prompt_bucket=4, batch_bucket=4)
    alone = sample(params, *left_padded([[5, 6, 7]], 3), jax.random.key(2), cfg, config=CONFIG)
    # Same prompt as row 0, left-padded to width 9 next to a longer prompt; rows padded to 8.
    batch = sample(params, *left_padded([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4]], 9),
                   jax.random.key(2), cfg, config=CONFIG)
    assert batch.tokens.shape == (6, 8)
    np.testing.assert_array_equal(batch.tokens[:2], alone.tokens)
    np.testing.assert_allclose(batch.logprobs[:2], alone.logprobs, atol=1e-5)


def test_stop_tokens_end_sequences(params, greedy_out):
    free = np.asarray(greedy_out.tokens)[::2]  # one row per prompt, no stop tokens
    stop = int(free[0, 2])
    first = [int(np.flatnonzero(row == stop)[0]) if stop in row else None for row in free]
    cfg = SampleConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(stop,),
                       pad_token_id=255, prompt_bucket=8)
    out = sample(params, *PROMPTS, jax.random.key(0), cfg, config=CONFIG)
    for row, f in enumerate(first):
        end = 6 if f is None else f + 1
        np.testing.assert_array_equal(out.tokens[row, :end], free[row, :end])
        np.testing.assert_array_equal(out.mask[row], np.arange(6) < end)
        np.testing.assert_array_equal(out.tokens[row, end:], 255)
        np.testing.assert_array_equal(out.logprobs[row, end:], 0.0)
    assert first[0] is not None and first[0] <= 2


def constant_distribution_model(probs):
    """An untied model whose next-token distribution is `probs` after every context."""
    V = len(probs)
    config = ModelConfig.tiny(vocab_size=V, tie_word_embeddings=False, eos_token_id=None,
                              num_hidden_layers=1)
    params = jax.tree.map(jnp.zeros_like, init_params(config, jax.random.key(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if path[-1].key in ("scale", "embedding") else x, params)
    # Final norm of an all-ones hidden state is all ones, so logits = column sums / D * D.
    log_p = np.log(np.asarray(probs, np.float32))
    params["lm_head"]["kernel"] = jnp.tile(jnp.asarray(log_p)[None] / config.hidden_size,
                                           (config.hidden_size, 1))
    return params, config


def test_top_k_and_top_p_never_emit_excluded_tokens():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    params, config = constant_distribution_model(probs)
    tokens, mask = left_padded([[1, 2]], 2)
    logits = forward(params, jnp.asarray(tokens), config=config)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits[0, -1])), probs, atol=1e-5)
    # top_k=3 keeps {0,1,2}; top_p=0.6 keeps {0,1} (mass before token 1 is 0.4 < 0.6,
    # before token 2 it is 0.65).
    for top_k, top_p, kept in [(3, 1.0, 3), (0, 0.6, 2)]:
        cfg = SampleConfig(max_new_tokens=64, temperature=1.0, top_k=top_k, top_p=top_p,
                           n=32, stop_token_ids=())
        out = np.asarray(sample(params, tokens, mask, jax.random.key(top_k), cfg,
                                config=config).tokens)
        counts = np.bincount(out.ravel(), minlength=len(probs))
        assert counts[kept:].sum() == 0, (top_k, top_p, counts)
        expected = probs[:kept] / probs[:kept].sum() * out.size
        assert np.all(np.abs(counts[:kept] - expected) < 5 * np.sqrt(expected)), counts


def test_inverse_cdf_draw_follows_the_distribution_and_skips_zero_mass():
    # 1000 tokens over 4 blocks of 256 (the last one partial); every third token has
    # logit -inf, as top-k / top-p would leave them.
    V = 1000
    logits = np.asarray(jax.random.normal(jax.random.key(1), (V,))) * 2
    logits[::3] = -np.inf
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    # Stratified u: the empirical law must match the CDF to within one stratum.
    n = 60000
    u = (np.arange(n) + 0.5) / n
    draw = jax.jit(categorical_from_uniform)
    got = np.asarray(draw(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V)), jnp.asarray(u, jnp.float32)))
    counts = np.bincount(got, minlength=V)
    assert counts[::3].sum() == 0
    assert np.abs(counts / n - probs).max() < 2.0 / n
    # The draw is monotone in u (it inverts the CDF).
    assert np.all(np.diff(got) >= 0)
    # Edges: u = 0 gives the first positive-mass token, u just below 1 the last one.
    edge = np.asarray(draw(jnp.asarray(np.stack([logits] * 3), jnp.float32), jnp.asarray([0.0, 1 - 2**-24, 1.0], jnp.float32)))
    positive = np.flatnonzero(probs > 0)
    assert edge.tolist() == [positive[0], positive[-1], positive[-1]]


def test_one_compilation_per_bucket(params):
    cfg = SampleConfig(max_new_tokens=4, temperature=0.0, stop_token_ids=(), prompt_bucket=16,
                       batch_bucket=4)
    before = _sample_rows._cache_size()
    for rows in ([[1, 2, 3]], [[4, 5, 6, 7, 8, 9, 10]], [[1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11]]):
        sample(params, *left_padded(rows, 12), jax.random.key(0), cfg, config=CONFIG)
    assert _sample_rows._cache_size() - before == 1


def test_bad_prompts_raise_clear_errors(params):
    cfg = SampleConfig(max_new_tokens=8, max_length=10)
    with pytest.raises(ValueError, match=r"prompt of 5 tokens \+ max_new_tokens=8 exceeds"):
        sample(params, *left_padded([[1, 2, 3, 4, 5]], 5), jax.random.key(0), cfg,
               config=CONFIG)
    right_padded = (np.array([[1, 2, 0]]), np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="left-padded"):
        sample(params, *right_padded, jax.random.key(0), SampleConfig(max_new_tokens=2),
               config=CONFIG)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(max_new_tokens=2, top_p=0.0)


def test_unstacked_layers_sample_the_same_as_stacked(params):
    # llama.unstack_layers gives per-layer buffers decoded by an unrolled loop (faster on CPU);
    # it must be the same model as the scan over stacked layers (the accelerator default,
    # pinned here: on CPU "auto" would unroll both sides): same tokens, same logprobs.
    tokens, mask = left_padded([[5, 6, 7], [9, 10, 11, 12, 13]], 5)
    cfg = SampleConfig(max_new_tokens=8, temperature=1.0, n=2, stop_token_ids=(), prompt_bucket=8)
    stacked = sample(params, tokens, mask, jax.random.key(3), dataclasses.replace(cfg, layer_loop="scan"), config=CONFIG)
    unstacked = sample(llama.unstack_layers(params), tokens, mask, jax.random.key(3), cfg,
                       config=CONFIG)
    assert len(llama.unstack_layers(params)["layers"]) == CONFIG.num_hidden_layers
    np.testing.assert_array_equal(unstacked.tokens, stacked.tokens)
    np.testing.assert_allclose(unstacked.logprobs, stacked.logprobs, atol=1e-5)
    np.testing.assert_array_equal(unstacked.mask, stacked.mask)


@pytest.mark.parametrize("layer_loop,fsdp,axis", [("scan", False, None), ("unrolled", False, None), ("scan", True, None),
                                                  ("unrolled", True, None), ("scan", True, 4)])
def test_sampling_split_over_eight_devices_equals_one_device(params, layer_loop, fsdp, axis):
    """Rows split over an 8-device mesh (5 prompts x n=3 = 15 rows, padded to 16) give the
    same tokens and logprobs as one device, with replicated, FSDP-sharded or hybrid
    (2 x 4 ("data", "fsdp") mesh) params, and the outputs really are split."""
    from rubrax.sharding import make_mesh, param_sharding

    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    mesh = make_mesh(fsdp_axis_size=axis)
    tokens, mask = left_padded([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]], 4)
    cfg = SampleConfig(max_new_tokens=6, n=3, temperature=1.0, stop_token_ids=(), layer_loop=layer_loop)
    one = sample(params, tokens, mask, jax.random.key(7), cfg, config=CONFIG)
    on_mesh = jax.device_put(params, param_sharding(params, mesh, fsdp=fsdp))
    assert fsdp == (not jax.tree.leaves(on_mesh)[0].sharding.is_fully_replicated)
    eight = sample(on_mesh, tokens, mask, jax.random.key(7), cfg, config=CONFIG)  # mesh from params
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
    np.testing.assert_array_equal(np.asarray(one.mask), np.asarray(eight.mask))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(eight.logprobs), atol=1e-5)
    full = _sample_rows(on_mesh, jax.device_put(jnp.ones((16, 4), jnp.int32)), jax.device_put(jnp.ones((16, 4), jnp.int32)),
                        jax.random.key(7), cfg=cfg, config=CONFIG, mesh=mesh)
    assert len(full.tokens.sharding.device_set) == 8 and not full.tokens.sharding.is_fully_replicated


@pytest.mark.parametrize("devices", [1, 8])
def test_prefix_sharing_samples_the_same_as_one_prefill_per_row(params, devices):
    """Each prompt prefilled once and its KV cache copied to its n rows gives the same
    tokens and logprobs as prefilling every row (uneven prompt lengths, n=4, filler rows,
    one device and FSDP over 8)."""
    from jax.sharding import Mesh

    from rubrax.sharding import param_sharding

    tokens, mask = left_padded([[5, 6, 7], [9, 10, 11, 12, 13], [3]], 5)
    cfg = SampleConfig(max_new_tokens=7, temperature=1.0, n=4, stop_token_ids=(), batch_bucket=5)
    if devices > 1:
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        params = jax.device_put(params, param_sharding(params, mesh, fsdp=True))
    shared = sample(params, tokens, mask, jax.random.key(11), cfg, config=CONFIG)
    per_row = sample(params, tokens, mask, jax.random.key(11),
                     dataclasses.replace(cfg, prefix_sharing=False), config=CONFIG)
    assert shared.tokens.shape == (12, 7)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(per_row.tokens))
    np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(per_row.mask))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(per_row.logprobs), atol=1e-5)
    assert len(set(map(tuple, np.asarray(shared.tokens[:4]).tolist()))) > 1  # n distinct draws


def _hlo_computations(text: str) -> dict[str, list[str]]:
    out, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            out[name].append(line)
    return out


def _all_gathers_inside_loops(text: str) -> int:
    """all-gather ops in the bodies of the compiled program's while loops (the decode loop
    and the layer scans), following every computation they call."""
    comps = _hlo_computations(text)
    callees = {n: set(re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", "\n".join(b)))
               for n, b in comps.items()}
    todo = [m for b in comps.values() for line in b if " while(" in line
            for m in re.findall(r"body=%?([\w.\-]+)", line)]
    assert todo, "no while loop found in the sampler's HLO"
    seen = set()
    while todo:
        n = todo.pop()
        if n not in seen and n in comps:
            seen.add(n)
            todo += callees[n]
    return sum(bool(re.search(r"all-gather(-start)?\(", line)) for n in seen for line in comps[n])


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_decode_loop_runs_no_per_token_weight_gather_under_fsdp(params, layer_loop):
    """sample() on FSDP-sharded params decodes with `decode_params`' one gathered copy:
    the compiled decode loop holds no all-gather (with the sharded params passed straight
    in it holds one per weight, which is what this check would catch)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from rubrax.policy import decode_params
    from rubrax.sharding import param_sharding

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    fsdp = jax.device_put(params, param_sharding(params, mesh, fsdp=True))
    gathered = decode_params(fsdp, config=CONFIG, mesh=mesh, layer_loop=layer_loop)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(gathered))
    rows = jax.device_put(jnp.ones((16, 4), jnp.int32), NamedSharding(mesh, PartitionSpec("data")))
    cfg = SampleConfig(max_new_tokens=6, stop_token_ids=(), layer_loop=layer_loop)
    hlo = lambda p: _sample_rows.lower(p, rows, rows, jax.random.key(0), cfg=cfg, config=CONFIG,
                                       mesh=mesh).compile().as_text()
    assert _all_gathers_inside_loops(hlo(fsdp)) >= len(jax.tree.leaves(params["layers"]))
    assert _all_gathers_inside_loops(hlo(gathered)) == 0


def test_decode_params_casts_once_to_the_compute_dtype(params):
    """bf16 compute from float32 masters: decode_params makes one bf16 copy, which samples
    exactly like params stored in bf16; float32 single-device params pass through."""
    bf16 = CONFIG.replace(dtype="bfloat16")
    from rubrax.policy import decode_params

    cast = decode_params(params, config=bf16, layer_loop="scan")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
    assert decode_params(params, config=CONFIG, layer_loop="scan") is params
    tokens, mask = left_padded([[5, 6, 7], [9, 10]], 3)
    cfg = SampleConfig(max_new_tokens=6, n=2, stop_token_ids=())
    from_f32 = sample(params, tokens, mask, jax.random.key(2), cfg, config=bf16)
    stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    from_bf16 = sample(stored, tokens, mask, jax.random.key(2), cfg, config=bf16.replace(param_dtype="bfloat16"))
    np.testing.assert_array_equal(np.asarray(from_f32.tokens), np.asarray(from_bf16.tokens))
    np.testing.assert_array_equal(np.asarray(from_f32.logprobs), np.asarray(from_bf16.logprobs))


def test_lm_head_chunks_are_chosen_per_platform():
    from rubrax.policy import default_chunk_tokens

    assert default_chunk_tokens(151936, "cpu") == 13  # ~8 MiB of float32 logits
    assert default_chunk_tokens(151936, "gpu") == default_chunk_tokens(151936, "tpu") == 441  # ~256 MiB
    assert default_chunk_tokens(49152, "gpu") == 1365 and default_chunk_tokens(256, "gpu") == 4096
    assert default_chunk_tokens(151936) == 13  # this test process runs on CPU

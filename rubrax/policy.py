"""The policy as pure functions: per-token log-probabilities and batched sampling.

    logp_BxT = logprobs(params, tokens_BxT, mask_BxT, config=config, chunk_size=None)
    out = sample(params, prompt_BxP, prompt_mask_BxP, key, SampleConfig(...), config=config)
    # out.tokens / out.logprobs / out.mask: (B * n) x max_new_tokens, prompt-major rows.
    seq = concat([repeat(prompt, n), out.tokens], axis=1)   # what training sees

Sampling log-probabilities: `sample` records log p(token | prefix) of the *unmodified*
model (temperature 1, no top-k / top-p truncation), whatever temperature and filters drew
the token. That is the quantity `logprobs` recomputes, so the sampler's numbers equal
`logprobs(params, seq, mask)` at the completion positions (tested to 1e-5) and the
policy-gradient ratio pi_theta / pi_old starts at exactly 1 on policy. Beside them,
`sampling_logprobs` records log q(token | prefix) under the distribution q the token was
actually drawn from (tempered, top-k / top-p truncated and renormalised): the behaviour
policy an importance-sampling correction needs (`RLConfig.importance_correction`); with
truncation pi / q is biased low by the mass the filter removed, pi / pi is not a ratio at all.

`sample` is a host function (numpy bucketing and validation) around one jitted sampler
`_sample_rows`; `logprobs` is jitted and may be called inside other jitted code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rubrax.models import llama
from rubrax.models.head import LinearHead, Options, chunked_stats, row_shards, vocab_parallel_logits_VxR
from rubrax.models.config import ModelConfig
from rubrax.sharding import fsdp_params, fsdp_spec, jit_keyed_by_fsdp, params_mesh, row_axes


def lm_head_fn(params, config: ModelConfig) -> LinearHead:
    """h_NxD -> float32 logits_NxV of a rubrax.models LM (the head alone, for
    `head_logprobs_and_entropy`): its LM head kernel, or the tied embedding, as a
    `rubrax.models.head.LinearHead` (same values as `llama.lm_logits`)."""
    if config.tie_word_embeddings:
        return LinearHead(params["embed_tokens"]["embedding"], vd=True)
    return LinearHead(params["lm_head"]["kernel"])


def default_chunk_tokens(vocab_size: int, platform: str | None = None) -> int:
    """Positions per LM-head chunk, by platform (default: jax's default backend).

    CPU: one chunk's float32 logits are ~8 MiB, so they stay in cache (measured ~2x faster
    than the unfused head for a 49k vocabulary). GPU/TPU: ~256 MiB of logits (441
    positions for Qwen's 152k vocabulary, up to 4096): each chunk re-reads the whole
    [D, V] head, so small chunks make a long sequence thousands of sequential,
    bandwidth-bound matmuls, while 256 MiB is still small next to the device's memory."""
    platform = platform or jax.default_backend()
    budget, most = ((8 << 20), 1024) if platform == "cpu" else ((256 << 20), 4096)
    return max(8, min(most, budget // (4 * vocab_size)))


def head_logprobs_and_entropy(head_fn, h_BxTxD: jax.Array, tokens_BxT: jax.Array, *,
                              temperature: float = 1.0, chunk_tokens: int | None = None,
                              entropy_grad: bool = True, entropy: bool = True,
                              start: int = 1) -> tuple[jax.Array, jax.Array]:
    """Fused LM head: per-token logp and entropy from final hidden states, in chunks.

    head_fn maps hidden states h_NxD to logits_NxV.

    With z = head_fn(h[:, t-1]) / temperature (float32 logits over V) and lse = logsumexp(z):
        logp[:, t] = z[tokens[:, t]] - lse        H[:, t] = lse - sum_v softmax(z)_v z_v
    both 0 at t = 0 (nothing precedes it), the alignment of `logprobs` and of
    `rubrax.rl.losses.token_logprobs` / `token_entropy`. Only positions t >= start
    (static, >= 1) go through the head; earlier ones are returned as 0. The RL update
    passes start = prompt width, so the head (a fifth of SmolLM2's FLOPs per token)
    never runs on prompt positions, which the loss masks out anyway.

    The B * (T - start) positions run through the head about `chunk_tokens` at a time
    (default `default_chunk_tokens(V)`, per device; chunks of ceil(chunk_tokens / rows per
    device) time steps of every row, so a batch split over devices stays split), so
    neither pass holds [B, T, V] logits: each chunk's logits stay in cache and are
    recomputed in the backward pass (a rubrax model's head, `lm_head_fn`, by the
    hand-written backward of `rubrax.models.head`, per device under a mesh; any other
    head_fn by autodiff under `jax.checkpoint`).
    On CPU this is ~2x faster than the unfused log-softmax for a 49k vocabulary, and it
    is what makes a 150k-vocabulary model trainable on long sequences at all.
    entropy_grad=False stops the entropy's gradient (when it is only a metric), so the
    backward pass skips its terms; entropy=False skips it altogether (returned as zeros).
    """
    B, T, D = h_BxTxD.shape
    start = min(max(int(start), 1), T)
    if start == T:
        return jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), jnp.float32)
    U = T - start
    h_BxUxD, y_BxU = h_BxTxD[:, start - 1:-1], tokens_BxT[:, start:]
    N = B * U

    def stats(h, y):
        z = head_fn(h).astype(jnp.float32) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        chosen = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
        if not entropy:
            return chosen - lse, jnp.zeros_like(lse)
        zs = z if entropy_grad else jax.lax.stop_gradient(z)
        ls = lse if entropy_grad else jax.lax.stop_gradient(lse)
        ent = ls - jnp.sum(jnp.exp(zs - ls[:, None]) * zs, axis=-1)
        return chosen - lse, ent

    c = chunk_tokens or default_chunk_tokens(int(jax.eval_shape(head_fn, h_BxUxD[0, :1]).shape[-1]))
    if N <= c and not isinstance(head_fn, LinearHead):
        logp_BxU, ent_BxU = (x.reshape(B, U) for x in stats(h_BxUxD.reshape(N, D), y_BxU.reshape(N)))
    else:
        # Chunks cut along time, every row in each: a chunk is [B, u] positions, so rows
        # split over devices stay split (a chunk of the flattened B * U positions would
        # span devices and be gathered onto each of them). The budget c is per device:
        # with the rows split over a mesh in context, each device holds B / n of them.
        u = -(-c // max(B // row_shards(B), 1))
        n = -(-U // u)
        h = jnp.pad(h_BxUxD, ((0, 0), (0, n * u - U), (0, 0))).reshape(B, n, u, D).swapaxes(0, 1)
        y = jnp.pad(y_BxU, ((0, 0), (0, n * u - U))).reshape(B, n, u).swapaxes(0, 1)
        if isinstance(head_fn, LinearHead):  # hand-written backward, per-device sums (rubrax.models.head)
            logp_n, ent_n = chunked_stats(head_fn.w, h, y, Options(float(temperature), entropy, entropy_grad, head_fn.vd))
        else:
            chunk = lambda xs: tuple(r.reshape(B, u) for r in stats(xs[0].reshape(B * u, D), xs[1].reshape(B * u)))
            logp_n, ent_n = jax.lax.map(jax.checkpoint(chunk), (h, y))
        logp_BxU, ent_BxU = (x.swapaxes(0, 1).reshape(B, n * u)[:, :U] for x in (logp_n, ent_n))
    unflat = lambda x: jnp.pad(x, ((0, 0), (start, 0)))
    return unflat(logp_BxU), unflat(ent_BxU)


@jit_keyed_by_fsdp(("config", "chunk_size"))
def logprobs(params, tokens_BxT: jax.Array, mask_BxT: jax.Array, *,
             config: ModelConfig, chunk_size: int | None = None) -> jax.Array:
    """Per-token log-probabilities logp[:, t] = log p(tokens[:, t] | tokens[:, :t]), float32.

    logp[:, t] = logit_{t-1}[tokens[t]] - logsumexp(logit_{t-1}) (no log-softmax copy).
    logp is 0 where mask is 0 and at each row's first real token (nothing precedes it;
    with left padding that is not t = 0), so a padded row gives the same values at its
    real tokens as the unpadded row. mask may pad on either side.

    chunk_size: positions per LM-head chunk (default `default_chunk_tokens(V)`, ~8 MiB of
    logits): the head runs through `head_logprobs_and_entropy` under jax.checkpoint, so
    neither the forward nor the backward pass holds the full [B, T, V] logits (faster on
    CPU, and necessary for large vocabularies x long sequences). Same values for any size.
    """
    mask_BxT = mask_BxT.astype(jnp.int32)
    h_BxTxD = llama.hidden_states(params, tokens_BxT, config=config, mask_BxT=mask_BxT)
    logp_BxT, _ = head_logprobs_and_entropy(lm_head_fn(params, config), h_BxTxD, tokens_BxT,
                                            chunk_tokens=chunk_size, entropy=False)
    has_context = (mask_BxT > 0) & (jnp.cumsum(mask_BxT, axis=-1) > 1)
    return jnp.where(has_context, logp_BxT, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Sampling settings (static: each distinct config compiles its own sampler).

    temperature 0 is greedy decoding (argmax, deterministic). top_k = 0 and top_p = 1.0
    disable those filters. stop_token_ids=None uses the model config's eos_token_id; ()
    disables stopping. Shapes are padded to buckets before the jitted call so that varying
    batches reuse compilations: prompt length up to a multiple of prompt_bucket, rows
    (batch * n) up to a multiple of batch_bucket. max_length caps prompt + completion
    (defaults to the model's max_position_embeddings).

    layer_loop: how a decode step runs the layers of stacked params. "scan" (one
    compiled layer body; best on GPU/TPU), "unrolled" (the stacked weights are split into
    per-layer buffers once per call, without a copy for single-device CPU params (numpy
    views handed back to XLA) and by one jitted copy otherwise, and the layers run as an unrolled
    loop: on CPU decoding is bound by memory traffic and a scan copies each layer's slice
    at every token, so this is ~1.3x faster, for a longer compilation), or "auto"
    (unrolled on the CPU backend, scan elsewhere).
    Params already split by `rubrax.models.unstack_layers` always run unrolled.

    prefix_sharing: with n > 1, prefill each prompt once and copy its KV cache (and its
    first-token logits) to its n rows, instead of prefilling n identical rows (same
    samples, tested; n times less prefill work).

    vocab_parallel: sampling from FSDP params with the "scan" layer loop, keep the
    vocabulary-sized matrices (embedding, LM head) split as they are instead of gathering
    them into the decode copy; each step then gathers the rows' hidden states and
    all-to-alls the logits (activation-sized collectives, ~1 MB and R x V x 4 / devices
    bytes per step) and looks tokens up vocabulary-parallel (rubrax.models.head). Saves
    2 x V x D x 2 bytes per device (2.5 GB for Qwen3-8B in bf16); same samples (tested).
    False: the whole decode copy is replicated and the decode loop runs no collective.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    prompt_bucket: int = 16
    batch_bucket: int = 1
    max_length: int | None = None
    layer_loop: str = "auto"
    prefix_sharing: bool = True
    vocab_parallel: bool = True

    def __post_init__(self):
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        from rubrax.validate import check_float, check_int

        check_int("SampleConfig.max_new_tokens", self.max_new_tokens, low=1)
        check_float("SampleConfig.temperature", self.temperature, low=0.0)
        check_int("SampleConfig.top_k", self.top_k, low=0)
        check_float("SampleConfig.top_p", self.top_p, low=0.0, high=1.0, open_low=True)
        for name in ("n", "prompt_bucket", "batch_bucket"):
            check_int(f"SampleConfig.{name}", getattr(self, name), low=1)
        check_int("SampleConfig.pad_token_id", self.pad_token_id, low=0, optional=True)
        check_int("SampleConfig.max_length", self.max_length, low=2, optional=True)
        for t in self.stop_token_ids or ():
            check_int("SampleConfig.stop_token_ids[]", t, low=0)
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise ValueError(f"SampleConfig.layer_loop must be 'auto', 'scan' or 'unrolled', got {self.layer_loop!r}")


class SampleOutput(NamedTuple):
    """Completions, rows prompt-major (row i * n + j is sample j of prompt i).

    tokens_BxL: generated tokens, pad_token_id after a stop token.
    logprobs_BxL: log p(token | prefix) under the model at temperature 1 without top-k/top-p
        truncation (equal to `logprobs` of the full sequence at these tokens); 0 where masked.
    mask_BxL: 1 for generated tokens including the stop token, 0 after it.
    sampling_logprobs_BxL: log q(token | prefix) under the distribution sampled from
        (`filter_logits`: tempered, top-k / top-p truncated, renormalised); equal to
        logprobs at temperature 1 without filters, 0 for greedy decoding (a point mass)
        and where masked.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    sampling_logprobs: jax.Array


def filter_logits(logits_RxV: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
    """Logits of the sampling distribution: divided by temperature, tokens outside the top-k
    and outside the top-p nucleus (smallest set of most likely tokens with mass >= top_p)
    set to -inf."""
    logits = logits_RxV / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_desc = -jnp.sort(-probs, axis=-1)
        mass_before = jnp.cumsum(sorted_desc, axis=-1) - sorted_desc
        # The smallest kept probability: the last sorted token whose preceding mass < top_p.
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits = jnp.where(probs < cutoff, -jnp.inf, logits)
    return logits


def categorical_from_uniform(logits_RxV: jax.Array, u_R: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from softmax(logits), by inverting the CDF at u_R in [0, 1).

    Two-level inverse CDF: the vocabulary is cut into blocks of `block` tokens, the block
    is found from the cumulative block masses, then the token within that block. Costs one
    exp pass over the logits and cumulative sums of length V / block and block, instead of
    V Gumbel draws (with their logs) per row: ~20x faster than `jax.random.categorical`
    on CPU for a 49k vocabulary. Tokens with probability 0 (logit -inf, e.g. removed by
    top-k / top-p) are never returned, whatever the float rounding: only blocks and tokens
    of positive mass qualify, and if rounding puts u past the last boundary the last
    positive-mass block / token is taken.
    """
    R, V = logits_RxV.shape
    nb = -(-V // block)
    logits = logits_RxV.astype(jnp.float32)
    if nb * block > V:
        logits = jnp.pad(logits, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf)
    m_R1 = jnp.max(logits, axis=-1, keepdims=True)
    p_RxNxK = jnp.exp(logits - m_R1).reshape(R, nb, block)
    mass_RxN = p_RxNxK.sum(axis=-1)
    cum_RxN = jnp.cumsum(mass_RxN, axis=-1)
    target_R = u_R * cum_RxN[:, -1]

    def first_above(cum, weight, t):
        hit = (cum > t[:, None]) & (weight > 0)
        last_positive = weight.shape[-1] - 1 - jnp.argmax((weight > 0)[:, ::-1], axis=-1)
        return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last_positive)

    b_R = first_above(cum_RxN, mass_RxN, target_R)
    before_R = jnp.take_along_axis(cum_RxN - mass_RxN, b_R[:, None], axis=1)[:, 0]
    inner_RxK = jnp.take_along_axis(p_RxNxK, b_R[:, None, None], axis=1)[:, 0]
    j_R = first_above(jnp.cumsum(inner_RxK, axis=-1), inner_RxK, target_R - before_R)
    return (b_R * block + j_R).astype(jnp.int32)


def _head_logits_VxR(params, h_RxD, config: ModelConfig) -> jax.Array:
    """float32 decode-step logits, vocabulary-major [V, R]: the weight is the row-major left
    operand (E @ h^T), which streams the LM head ~1.6x faster on CPU than h @ E^T (a 49k x 576
    head at batch 8: 7 vs 11.5 ms). Same values as llama.lm_logits, transposed."""
    dt = llama.jnp_dtype(config.dtype)
    h = h_RxD.astype(dt)
    w = params["embed_tokens"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["kernel"]
    vp = vocab_parallel_logits_VxR(w, h, vd=config.tie_word_embeddings)  # vocabulary-split head (see `sample`)
    if vp is not None:
        return vp
    if config.tie_word_embeddings:
        return jnp.einsum("vd,rd->vr", params["embed_tokens"]["embedding"].astype(dt), h,
                          preferred_element_type=jnp.float32)
    return jnp.einsum("dv,rd->vr", params["lm_head"]["kernel"].astype(dt), h,
                      preferred_element_type=jnp.float32)


def _token_logprobs_VxR(logits_VxR, tok_R):
    chosen = jnp.take_along_axis(logits_VxR, tok_R[None, :], axis=0)[0]
    return chosen - jax.nn.logsumexp(logits_VxR, axis=0)


def _unfiltered(cfg: SampleConfig) -> bool:
    """Sampling from the model's own distribution (q = p): temperature 1, no filters."""
    return cfg.temperature == 1.0 and not cfg.top_k and cfg.top_p >= 1.0


def _choose(logits_VxR, key, step, cfg: SampleConfig):
    """Next token per row (column) and its log q under the sampled distribution (None when
    q = p: the caller reuses log p). Each row's randomness is fold_in(fold_in(key, row),
    step) so it does not depend on the batch composition, prompt padding or bucket sizes."""
    if cfg.temperature == 0.0:
        tok_R = jnp.argmax(logits_VxR, axis=0).astype(jnp.int32)
        return tok_R, jnp.zeros(tok_R.shape, jnp.float32)
    logits_RxV = logits_VxR.T
    filtered = filter_logits(logits_RxV, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p)
    rows = jnp.arange(logits_RxV.shape[0])
    u_R = jax.vmap(lambda r: jax.random.uniform(
        jax.random.fold_in(jax.random.fold_in(key, r), step)))(rows)
    tok_R = categorical_from_uniform(filtered, u_R)
    if _unfiltered(cfg):
        return tok_R, None
    chosen_R = jnp.take_along_axis(filtered, tok_R[:, None], axis=1)[:, 0]
    return tok_R, chosen_R - jax.nn.logsumexp(filtered, axis=-1)


def _prefill(step_fn, params, tokens_XxP, mask_XxP, prompt_of_row_R, *, N: int,
             config: ModelConfig, rows):
    """Prefill X prompt rows into a KV cache of P + N slots; with prompt_of_row_R, copy
    each prompt's cache, kv mask and first-token logits to the rows that continue it.
    Returns (cache, logits_VxR, kv_mask_RxS, next_pos_R)."""
    X, P = tokens_XxP.shape
    mask_XxP = mask_XxP.astype(jnp.int32)
    kv_mask_XxS = jnp.concatenate([mask_XxP, jnp.ones((X, N), jnp.int32)], axis=1)
    cache = rows(llama.init_cache(config, X, P + N), batch_axis=1)
    h, cache = step_fn(params, tokens_XxP, llama.default_positions(mask_XxP), kv_mask_XxS,
                       cache, 0, config=config)
    logits_VxX = _head_logits_VxR(params, h[:, -1], config)
    if prompt_of_row_R is None:
        return cache, logits_VxX, kv_mask_XxS, jnp.sum(mask_XxP, axis=-1)
    take = lambda x, axis: jnp.take(x, prompt_of_row_R, axis=axis)
    cache = rows(jax.tree.map(lambda c: take(c, 1), cache), batch_axis=1)
    logits_VxR = rows(take(logits_VxX, 1), batch_axis=1)
    return cache, logits_VxR, rows(take(kv_mask_XxS, 0)), rows(take(jnp.sum(mask_XxP, axis=-1), 0))


@functools.partial(jax.jit, static_argnames=("cfg", "config", "mesh", "vocab_parallel"))
def _sample_rows(params, tokens_XxP, mask_XxP, key, prompt_of_row_R=None, *, cfg: SampleConfig,
                 config: ModelConfig, mesh=None, vocab_parallel: bool = False) -> SampleOutput:
    """The jitted sampler on bucketed, left-padded prompt rows X (split over all of
    `mesh`'s axes when given: every per-row array, the KV cache included).
    vocab_parallel: params' embedding / LM head are FSDP-split along the vocabulary
    (`decode_params(vocab_split=True)`); lookups and logits then run vocabulary-parallel.

    prompt_of_row_R None: X = R, one prefill per row. Else (prefix sharing) X prompts
    are prefilled once each and row r continues prompt prompt_of_row_R[r]: its KV cache,
    mask and first logits are gathered from that prompt's, once per call."""
    if vocab_parallel:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), fsdp_params(mesh):
            return _sample_rows_body(params, tokens_XxP, mask_XxP, key, prompt_of_row_R, cfg=cfg, config=config,
                                     mesh=mesh)
    return _sample_rows_body(params, tokens_XxP, mask_XxP, key, prompt_of_row_R, cfg=cfg, config=config, mesh=mesh)


def _sample_rows_body(params, tokens_XxP, mask_XxP, key, prompt_of_row_R, *, cfg: SampleConfig,
                      config: ModelConfig, mesh):
    P = tokens_XxP.shape[1]
    rows = functools.partial(_constrain_rows, mesh=mesh)
    N = cfg.max_new_tokens
    stop_ids = jnp.asarray(_stop_ids(cfg, config) or (-1,), jnp.int32)
    pad_id = _pad_id(cfg, config)
    # Per-layer params (a tuple, from llama.unstack_layers) run as an unrolled loop.
    step_fn = (llama.forward_with_cache_unrolled if isinstance(params["layers"], tuple)
               else llama.forward_with_cache)
    cache, logits_VxR, kv_mask_RxS, next_pos_R = _prefill(
        step_fn, params, tokens_XxP, mask_XxP, prompt_of_row_R, N=N, config=config, rows=rows)
    R = kv_mask_RxS.shape[0]

    def emit(state, logits_VxR):
        i, cache, out_tok, out_logp, out_qlogp, done = state
        tok, qlogp = _choose(logits_VxR, key, i, cfg)
        logp = _token_logprobs_VxR(logits_VxR, tok)
        qlogp = logp if qlogp is None else qlogp
        tok = jnp.where(done, pad_id, tok)
        out_tok = out_tok.at[:, i].set(tok)
        out_logp = out_logp.at[:, i].set(jnp.where(done, 0.0, logp))
        out_qlogp = out_qlogp.at[:, i].set(jnp.where(done, 0.0, qlogp))
        out_mask_col = ~done
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        return (i + 1, cache, out_tok, out_logp, out_qlogp, done), out_mask_col

    def body(carry):
        state, out_mask = carry
        i, cache = state[0], state[1]
        prev = state[2][:, i - 1]
        h, cache = step_fn(params, prev[:, None], (next_pos_R + i - 1)[:, None], kv_mask_RxS,
                           cache, P + i - 1, config=config)
        logits = _head_logits_VxR(params, h[:, 0], config)
        state, col = emit((i, cache) + tuple(state[2:]), logits)
        return state, out_mask.at[:, i].set(col)

    def cond(carry):
        state, _ = carry
        return (state[0] < N) & ~jnp.all(state[5])

    init = (0, cache, rows(jnp.full((R, N), pad_id, jnp.int32)), rows(jnp.zeros((R, N), jnp.float32)),
            rows(jnp.zeros((R, N), jnp.float32)), rows(jnp.zeros((R,), bool)))
    state, col0 = emit(init, logits_VxR)
    out_mask = rows(jnp.zeros((R, N), bool).at[:, 0].set(col0))
    state, out_mask = jax.lax.while_loop(cond, body, (state, out_mask))
    return SampleOutput(rows(state[2]), rows(state[3]), rows(out_mask.astype(jnp.int32)), rows(state[4]))


def _constrain_rows(x, *, mesh, batch_axis: int = 0):
    """Pins the row (batch) axis of every array in x to all of the mesh's axes (no-op
    without a mesh): on a 2-D ("data", "fsdp") mesh every device decodes its own rows."""
    if mesh is None:
        return x
    from jax.sharding import NamedSharding, PartitionSpec

    def one(a):
        spec = [None] * a.ndim
        spec[batch_axis] = row_axes(mesh)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(one, x)


_split_layers = jax.jit(llama.unstack_layers)  # one dispatch, one fresh buffer per layer leaf


def _unrolled(layer_loop: str) -> bool:
    if layer_loop == "auto":
        return jax.default_backend() == "cpu"
    return layer_loop == "unrolled"


def _stop_ids(cfg: SampleConfig, config: ModelConfig) -> tuple[int, ...]:
    return config.eos_token_ids if cfg.stop_token_ids is None else cfg.stop_token_ids


def _pad_id(cfg: SampleConfig, config: ModelConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    return config.pad_token_id if config.pad_token_id is not None else 0


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def sample(params, prompt_tokens_BxP, prompt_mask_BxP, key: jax.Array, cfg: SampleConfig, *,
           config: ModelConfig, mesh=None) -> SampleOutput:
    """Sample cfg.n completions of cfg.max_new_tokens tokens per left-padded prompt.

    Host-side wrapper around one jitted sampler: strips all-padding columns, pads the
    prompt length and row count up to their buckets (one compilation per bucket), prefills
    each prompt once into a preallocated KV cache of P + max_new_tokens slots and copies it
    to the prompt's n rows (prompt-major; SampleConfig.prefix_sharing), then decodes in a
    `lax.while_loop` that exits as soon as every row has emitted a stop token. Returns a
    SampleOutput of shape (B * n) x max_new_tokens.

    The weights are prepared once per call by `decode_params`: FSDP-sharded params are
    gathered into one replicated copy in the compute dtype (so no decode step runs a
    collective), and on CPU the layers are split into per-layer buffers decoded by an
    unrolled layer loop (decoding is bound by memory traffic, and a scan over stacked
    weights copies each layer's slice; see SampleConfig.layer_loop). `params` may also be
    `rubrax.models.unstack_layers(params)` or `decode_params`' output. All give the same
    samples (tested).

    Data parallel: with `mesh` (a `jax.sharding.Mesh`, e.g. `rubrax.sharding.make_mesh()`,
    1-D or 2-D), the rows are padded to a multiple of the device count and split over all
    of its axes: each device decodes its own rows with its own KV cache, and `params`
    must already live on that mesh (replicated, or FSDP-sharded, as the RL trainer places
    them). mesh=None takes the mesh of `params` when they are placed on a mesh of more
    than one device (so the RL loop and eval hooks sample data-parallel with the
    trainer's params), else runs on the params' single device. Each row's randomness
    depends only on the key, the row and the step, so the samples equal the
    single-device ones (tested on 8 devices).

    Raises ValueError if the longest prompt plus max_new_tokens exceeds cfg.max_length (or
    config.max_position_embeddings), or if prompts are not left-padded.
    """
    tokens, mask = _fit_prompts(prompt_tokens_BxP, prompt_mask_BxP, cfg, config)
    if mesh is None:
        mesh = params_mesh(params)
    R = tokens.shape[0] * cfg.n
    split = 1 if mesh is None else mesh.size
    R_pad = _round_up(R, cfg.batch_bucket * split // np.gcd(cfg.batch_bucket, split))
    prompt_of_row = None
    if cfg.prefix_sharing and cfg.n > 1:
        # X prompt rows: a function of R_pad alone (no compilation per prompt count),
        # divisible by the mesh so the prefill is split too. Filler rows continue prompt 0.
        X = _round_up(-(-R_pad // cfg.n), split)
        prompt_of_row = np.zeros(R_pad, np.int32)
        prompt_of_row[:R] = np.arange(R) // cfg.n
    else:
        X, tokens, mask = R_pad, np.repeat(tokens, cfg.n, axis=0), np.repeat(mask, cfg.n, axis=0)
    tokens, mask = _fill_rows(tokens, X), _fill_rows(mask, X)
    vocab_split = _vocab_split(params, config, mesh, cfg)
    params = decode_params(params, config=config, mesh=mesh, layer_loop=cfg.layer_loop, vocab_split=vocab_split)
    rows = [x for x in (tokens, mask, prompt_of_row) if x is not None]
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        split_rows = NamedSharding(mesh, PartitionSpec(row_axes(mesh)))
        rows = [jax.device_put(x, split_rows) for x in rows]
        key = jax.device_put(key, NamedSharding(mesh, PartitionSpec()))
    rows = [jnp.asarray(x) for x in rows]
    out = _sample_rows(params, rows[0], rows[1], key, *rows[2:], cfg=cfg, config=config, mesh=mesh,
                       vocab_parallel=vocab_split)
    if jax.process_count() > 1 and not out.tokens.is_fully_addressable:
        # Multi-host: every process gets all rows (as numpy), like a single host would.
        from jax.experimental import multihost_utils

        out = SampleOutput(*multihost_utils.process_allgather(tuple(out), tiled=True))
    return jax.tree.map(lambda x: x[:R], out)


def _fit_prompts(prompt_tokens_BxP, prompt_mask_BxP, cfg: SampleConfig, config: ModelConfig):
    """Validated prompts, left-fitted to their bucketed width P (numpy int32)."""
    tokens = np.asarray(prompt_tokens_BxP, np.int32)
    mask = np.asarray(prompt_mask_BxP, np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"prompt tokens {tokens.shape} and mask {mask.shape} must be equal 2-D")
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} are empty")
    if not (mask[:, -1] == 1).all() or (np.diff(mask, axis=-1) < 0).any():
        raise ValueError("prompts must be left-padded (mask 0...0 1...1 in every row)")
    limit = cfg.max_length or config.max_position_embeddings
    longest = int(lengths.max())
    if longest + cfg.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the "
            f"cache limit of {limit} tokens (SampleConfig.max_length or "
            f"max_position_embeddings); shorten the prompt or lower max_new_tokens")
    P = min(_round_up(longest, cfg.prompt_bucket), max(limit - cfg.max_new_tokens, longest))
    return _left_fit(tokens, mask, P, _pad_id(cfg, config))


def _fill_rows(x_BxP: np.ndarray, rows: int) -> np.ndarray:
    """Pad to `rows` rows with copies of row 0 (their outputs are dropped)."""
    return np.concatenate([x_BxP, np.repeat(x_BxP[:1], rows - x_BxP.shape[0], 0)])


VOCAB_LEAVES = (("embed_tokens", "embedding"), ("lm_head", "kernel"))


def _vocab_split(params, config: ModelConfig, mesh, cfg: SampleConfig) -> bool:
    """Whether `sample` keeps the vocabulary-sized leaves split (SampleConfig.vocab_parallel):
    stacked layers decoded by the scan, on a mesh, and every such leaf FSDP-split along its
    vocabulary dimension over one of the rows' axes."""
    if not cfg.vocab_parallel or mesh is None or _unrolled(cfg.layer_loop) or llama.is_unstacked(params):
        return False
    found = False
    for (mod, name), vocab_dim in zip(VOCAB_LEAVES, (0, 1)):
        x = params.get(mod, {}).get(name)
        if x is None:
            continue
        spec = fsdp_spec(x.shape, mesh)
        sharding = getattr(x, "sharding", None)
        if spec[vocab_dim] is None or not isinstance(sharding, jax.sharding.NamedSharding) or sharding.spec != spec:
            return False
        found = True
    return found


def decode_params(params, *, config: ModelConfig, mesh=None, layer_loop: str = "auto", vocab_split: bool = False):
    """The weights `sample` decodes with: one gathered, compute-dtype copy per call.

    FSDP-sharded params (on `mesh`) are all-gathered once into replicated buffers, and float
    leaves are cast to config.dtype once (bf16 compute from float32 masters reads half the
    bytes per token), so the decode loop runs no per-token collectives or casts; on CPU
    (layer_loop "auto"/"unrolled") the layers are also split into per-layer buffers.
    Params that need none of this are returned as they are (single-device float32 CPU
    params even unstacked without a copy), so calling it ahead of several `sample` calls
    (e.g. an eval sweep) keeps one copy alive instead of making one per call."""
    unstack = _unrolled(layer_loop) and not llama.is_unstacked(params)
    dt = jnp.dtype(llama.jnp_dtype(config.dtype))
    leaves = jax.tree.leaves(params)
    cast = any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt for x in leaves)
    gather = mesh is not None and any(
        isinstance(x, jax.Array) and not x.sharding.is_fully_replicated for x in leaves)
    if not (cast or gather):
        return _split_for_decoding(params) if unstack else params
    return _gather_cast_fn(dt.name, unstack, _replicated(mesh), mesh if vocab_split else None)(params)


def decode_layout(params, mesh):
    """The shardings of `decode_params(vocab_split=True)`'s copy: every leaf replicated on
    `mesh` but the vocabulary-sized ones (VOCAB_LEAVES), split by the FSDP rule."""
    from jax.sharding import NamedSharding, PartitionSpec

    layout = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    for mod, name in VOCAB_LEAVES:
        if name in params.get(mod, {}):
            layout[mod] = {**layout[mod], name: NamedSharding(mesh, fsdp_spec(params[mod][name].shape, mesh))}
    return layout


def _replicated(mesh):
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


@functools.lru_cache(maxsize=16)
def _gather_cast_fn(dtype: str, unstack: bool, sharding, vocab_mesh=None):
    """vocab_mesh: keep the vocabulary-sized leaves split on it (cast on their shards)."""

    def fn(params):
        cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        params = jax.tree.map(cast, params)
        if vocab_mesh is not None:
            return jax.tree.map(jax.lax.with_sharding_constraint, params, decode_layout(params, vocab_mesh))
        return llama.unstack_layers(params) if unstack else params

    return jax.jit(fn, out_shardings=None if vocab_mesh is not None else sharding)


def _split_for_decoding(params):
    """Stacked params -> per-layer params for the unrolled decoder: free for single-device
    CPU params (`llama.unstack_layers` aliases the stacked buffers), else one jitted copy."""
    if llama._single_cpu_device(params) is not None:
        return llama.unstack_layers(params)
    return _split_layers(params)


def _left_fit(tokens_BxP, mask_BxP, P: int, pad_id: int):
    """Left-pad or strip leading padding columns so the prompt block is exactly P wide."""
    B, width = tokens_BxP.shape
    if width >= P:
        return tokens_BxP[:, width - P:], mask_BxP[:, width - P:]
    pad = P - width
    return (np.concatenate([np.full((B, pad), pad_id, np.int32), tokens_BxP], axis=1),
            np.concatenate([np.zeros((B, pad), np.int32), mask_BxP], axis=1))

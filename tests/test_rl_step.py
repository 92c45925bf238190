"""The update step: parity of its gradient with a per-sample reference loss, exact
gradient accumulation, 1 device vs 8 (replicated and FSDP), one compilation.

The policy here is a bigram table (logits of the next token = W[current token]):
the step never looks inside the model, and a tiny model keeps compile times low.
Tests that need a real transformer live in test_rl_learning.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rubrax.rl.state import TrainState
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.step import RLConfig, Trainer, update
from jax.sharding import PartitionSpec

from rubrax.sharding import batch_sharding, make_mesh

V, T, G, P = 8, 6, 4, 4  # vocab, sequence length, group size, prompts
B = G * P
PROMPT = 2


def bigram_logits(params, tokens_BxT, mask_BxT):
    return params["w"][tokens_BxT]


def make_params(seed=0):
    return {"w": jax.random.normal(jax.random.PRNGKey(seed), (V, V)) * 0.5}


def make_rollouts(seed=0, invalid=(3,)) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    lengths = rng.integers(1, T - PROMPT + 1, B)
    loss_mask = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        loss_mask[i, PROMPT : PROMPT + n] = 1
    mask = loss_mask.copy()
    mask[:, :PROMPT] = 1
    behaviour = np.where(loss_mask, rng.normal(-2.0, 0.3, (B, T)), 0.0).astype(np.float32)
    rewards = rng.integers(0, 3, B).astype(np.float32)
    valid = np.ones(B, bool)
    valid[list(invalid)] = False
    return RolloutBatch(tokens, mask, loss_mask, behaviour, rewards, valid)


# --------------------------------------------------------------------------- reference


def reference_loss(w, ref_w, batch: RolloutBatch, cfg: RLConfig, base_w=None) -> float:
    """Straightforward per-sample, per-token loops in float64 numpy (one epoch, one minibatch).

    base_w: the params at the start of the update, which give the behaviour logprobs
    when cfg.behaviour_logprobs == "recompute" (held fixed while w varies)."""
    b = jax.tree.map(np.asarray, batch)
    if cfg.behaviour_logprobs == "recompute":
        behaviour = np.zeros((B, T))
        for i in range(B):
            for t in range(1, T):
                z = base_w[b.tokens_BxT[i, t - 1]] / cfg.temperature
                behaviour[i, t] = z[b.tokens_BxT[i, t]] - np.log(np.exp(z).sum())
        b = b.replace(behaviour_logp_BxT=behaviour)

    def dist(table, i, t):  # log-probs and probs of the distribution predicting token t of row i
        z = table[b.tokens_BxT[i, t - 1]] / cfg.temperature
        logp = z - np.log(np.exp(z).sum())
        return logp, np.exp(logp)

    def kl(lr):  # lr = log pi_ref - log pi
        return {"k1": -lr, "k2": lr**2 / 2, "k3": np.exp(lr) - 1 - lr}[cfg.kl_estimator]

    rewards = b.rewards_B.astype(np.float64)
    if cfg.kl_in_reward:
        for i in range(B):
            for t in range(1, T):
                if b.loss_mask_BxT[i, t] and b.valid_B[i]:
                    rewards[i] -= cfg.kl_coef * kl(dist(ref_w, i, t)[0][b.tokens_BxT[i, t]] - b.behaviour_logp_BxT[i, t])
    adv = np.zeros(B)
    for s in range(0, B, G):
        idx = [i for i in range(s, s + G) if b.valid_B[i]]
        vals = rewards[idx]
        for i in idx:
            if len(idx) >= 2 and vals.std() > cfg.adv_eps:
                adv[i] = {"grpo": (rewards[i] - vals.mean()) / vals.std(), "dr_grpo": rewards[i] - vals.mean(),
                          "rloo": rewards[i] - (vals.sum() - rewards[i]) / (len(idx) - 1)}[cfg.advantage]
    rows = [i for i in range(B) if b.valid_B[i] and b.loss_mask_BxT[i].sum() > 0]
    n_tokens = sum(int(b.loss_mask_BxT[i].sum()) for i in rows)
    total = 0.0
    for i in rows:
        seq = 0.0
        for t in range(1, T):
            if not b.loss_mask_BxT[i, t]:
                continue
            logp, probs = dist(w, i, t)
            lp = logp[b.tokens_BxT[i, t]]
            ratio = np.exp(lp - b.behaviour_logp_BxT[i, t])
            term = -min(ratio * adv[i], np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.upper_clip) * adv[i])
            if cfg.kl_coef and not cfg.kl_in_reward:
                term += cfg.kl_coef * kl(dist(ref_w, i, t)[0][b.tokens_BxT[i, t]] - lp)
            term -= cfg.entropy_coef * -np.sum(probs * logp)
            seq += term
        if cfg.loss_aggregation == "sequence":
            total += seq / b.loss_mask_BxT[i].sum() / len(rows)
        elif cfg.loss_aggregation == "token":
            total += seq / n_tokens
        else:
            total += seq / (len(rows) * (T - b.prompt_width))  # Dr. GRPO: N_seq x completion budget
    return total


def numeric_grad(f, w, h=1e-5):
    g = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        d = np.zeros_like(w)
        d[idx] = h
        g[idx] = (f(w + d) - f(w - d)) / (2 * h)
    return g


CASES = {
    "grpo_token_kl3": dict(advantage="grpo", loss_aggregation="token", kl_coef=0.1, kl_estimator="k3"),
    "rloo_sequence_entropy": dict(advantage="rloo", loss_aggregation="sequence", entropy_coef=0.05, clip_high=0.28),
    "drgrpo_kl1_in_reward_temp": dict(advantage="dr_grpo", loss_aggregation="dr_grpo", kl_coef=0.2, kl_estimator="k1",
                                      kl_in_reward=True, temperature=0.7,
                                      behaviour_logprobs="recompute"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_gradient_matches_per_sample_reference(case):
    cfg = RLConfig(group_size=G, **CASES[case])
    params, ref_params = make_params(0), make_params(1)
    batch = make_rollouts()
    tx = optax.sgd(1.0)  # params_new = params - grad: exposes the gradient exactly
    state = TrainState.create(params, tx, seed=0)
    new_state, metrics = jax.jit(lambda s, b, r: update(s, b, r, cfg=cfg, logits_fn=bigram_logits, tx=tx))(
        state, jax.tree.map(jnp.asarray, batch), ref_params
    )
    w, ref_w = np.asarray(params["w"], np.float64), np.asarray(ref_params["w"], np.float64)
    ref_loss = lambda x: reference_loss(x, ref_w, batch, cfg, base_w=w)
    np.testing.assert_allclose(metrics["loss"], ref_loss(w), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["w"] - new_state.params["w"], numeric_grad(ref_loss, w), rtol=1e-3, atol=2e-5)
    assert int(metrics["reward_invalid"]) == 1
    assert int(new_state.step) == 1


def test_invalid_samples_do_not_move_the_params():
    cfg = RLConfig(group_size=G)
    tx = optax.sgd(1.0)
    all_invalid = make_rollouts(invalid=range(B))
    state = TrainState.create(make_params(), tx, seed=0)
    new_state, metrics = jax.jit(lambda s, b: update(s, b, None, cfg=cfg, logits_fn=bigram_logits, tx=tx))(
        state, jax.tree.map(jnp.asarray, all_invalid)
    )
    np.testing.assert_array_equal(new_state.params["w"], state.params["w"])
    assert int(metrics["reward_invalid"]) == B
    assert np.isfinite(float(metrics["loss"]))


@functools.lru_cache(maxsize=None)  # the 1-device baseline is shared by several tests
def _run(cfg, n_devices, *, fsdp=False, steps=2, fsdp_axis_size=None):
    tx = optax.adam(1e-2)
    mesh = make_mesh(jax.devices()[:n_devices], fsdp_axis_size=fsdp_axis_size)
    ref = make_params(1)
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, seed=3), make_params())
    trainer = Trainer(cfg, bigram_logits, tx, abstract, ref, mesh=mesh, fsdp=fsdp)
    state, ref = trainer.init_state(make_params(), seed=3), trainer.place_ref(ref)
    history = []
    for s in range(steps):
        state, metrics = trainer(state, make_rollouts(seed=s), ref)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history, trainer


PPO_CFG = RLConfig(group_size=G, kl_coef=0.05, ppo_epochs=2, num_minibatches=2, grad_accum=1, clip_low=0.1)


def test_grad_accumulation_is_exact():
    s1, h1, _ = _run(PPO_CFG, 1)
    s4, h4, _ = _run(dataclasses.replace(PPO_CFG, grad_accum=4), 1)
    np.testing.assert_allclose(s4.params["w"], s1.params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h4[-1]["loss"], h1[-1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("mode", ["replicated", "fsdp", "hybrid_2x4"])
def test_one_device_equals_eight(mode):
    """Data parallel, FSDP over all 8 devices, and hybrid sharding on a 2 x 4 ("data",
    "fsdp") mesh (params split over the 4-device axis, replicated over the other, rows over
    all 8) all equal one device."""
    assert len(jax.devices()) >= 8, "conftest must provide 8 CPU devices"
    s1, h1, _ = _run(PPO_CFG, 1)
    s8, h8, trainer = _run(PPO_CFG, 8, fsdp=mode != "replicated", fsdp_axis_size=4 if mode == "hybrid_2x4" else None)
    np.testing.assert_allclose(s8.params["w"], s1.params["w"], rtol=1e-5, atol=1e-6)
    for k in h1[-1]:
        np.testing.assert_allclose(h8[-1][k], h1[-1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(s8.step) == int(s1.step) == 2
    spec = trainer.state_shardings.params["w"].spec
    assert spec == {"replicated": PartitionSpec(), "fsdp": PartitionSpec("data", None), "hybrid_2x4": PartitionSpec("fsdp", None)}[mode]
    if mode == "hybrid_2x4":
        assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 4}
        assert trainer.state_shardings.params["w"].shard_shape((V, V)) == (V // 4, V)
        # rows split over all 8 devices, each its own
        assert len(set(map(str, batch_sharding(trainer.mesh).devices_indices_map((B,)).values()))) == 8


def test_init_state_is_born_sharded_and_leaves_the_callers_params_alone():
    """Trainer.init_state creates params and Adam moments directly with the FSDP
    shardings (from an abstract state; no unsharded state ever built), equal to
    TrainState.create; the update's donation never touches the caller's params."""
    tx = optax.adam(1e-2)
    params = make_params()
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, seed=3), params)
    trainer = Trainer(PPO_CFG, bigram_logits, tx, abstract, params, mesh=make_mesh(), fsdp=True)
    state = trainer.init_state(params, seed=3)
    want = TrainState.create(params, tx, seed=3)
    for x, ref, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(want), jax.tree.leaves(trainer.state_shardings)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
        assert x.sharding == sharding
    mu = state.opt_state[0].mu["w"]
    assert all(s.data.shape == (V // 8, V) for s in mu.addressable_shards)
    before = np.asarray(params["w"])
    state, _ = trainer(state, make_rollouts(), trainer.place_ref(params))
    np.testing.assert_array_equal(np.asarray(params["w"]), before)


def test_step_compiles_exactly_once():
    traces = []

    def counting_logits(params, tokens_BxT, mask_BxT):
        traces.append(tokens_BxT.shape)  # Python runs only while jax traces (= compiles) the step
        return bigram_logits(params, tokens_BxT, mask_BxT)

    tx = optax.adam(1e-2)
    state = TrainState.create(make_params(), tx, seed=0)
    trainer = Trainer(PPO_CFG, counting_logits, tx, state, make_params(1), mesh=make_mesh(jax.devices()[:8]))
    state, ref = trainer.place_state(state), trainer.place_ref(make_params(1))
    losses = []
    for s in range(4):
        state, metrics = trainer(state, make_rollouts(seed=s, invalid=(s,)), ref)
        losses.append(float(metrics["loss"]))
        if s == 0:
            n_traced = len(traces)
    assert n_traced > 0 and len(traces) == n_traced  # no retrace after the first call
    assert trainer.update_fn._cache_size() == 1
    assert len(set(losses)) == 4  # really different batches


def test_minibatch_shuffle_is_keyed_by_step():
    # same batch, two different steps -> different minibatch orders -> different params
    tx = optax.sgd(0.5)
    cfg = dataclasses.replace(PPO_CFG, kl_coef=0.0)
    batch = jax.tree.map(jnp.asarray, make_rollouts())
    s0 = TrainState.create(make_params(), tx, seed=0)
    step = jax.jit(lambda s: update(s, batch, None, cfg=cfg, logits_fn=bigram_logits, tx=tx)[0])
    a, b, c = step(s0), step(s0.replace(step=jnp.int32(5))), step(s0)
    assert not np.allclose(a.params["w"], b.params["w"])
    np.testing.assert_array_equal(a.params["w"], c.params["w"])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="loss_aggregation"):
        RLConfig(group_size=4, loss_aggregation="mean")
    with pytest.raises(ValueError, match="advantage"):
        RLConfig(group_size=4, advantage="ppo")
    with pytest.raises(ValueError, match="group_size"):
        RLConfig(group_size=0)
    with pytest.raises(ValueError, match="divide"):
        update(TrainState.create(make_params(), optax.sgd(1.0), seed=0), jax.tree.map(jnp.asarray, make_rollouts()),
               None, cfg=RLConfig(group_size=G, num_minibatches=3), logits_fn=bigram_logits, tx=optax.sgd(1.0))


def test_donation_never_frees_the_callers_params():
    # Regression: a 1 -> 8 device replicated device_put aliases shard 0 with the source, so
    # donating the placed state freed the caller's params (which train() uses as reference).
    tx = optax.sgd(0.1)
    params = make_params()
    before = np.asarray(params["w"]).copy()
    state = TrainState.create(params, tx, seed=0)
    trainer = Trainer(PPO_CFG, bigram_logits, tx, state, params, mesh=make_mesh(jax.devices()[:8]))
    placed, ref = trainer.place_state(state), trainer.place_ref(params)
    for s in range(2):
        placed, _ = trainer(placed, make_rollouts(seed=s), ref)
    np.testing.assert_array_equal(np.asarray(params["w"]), before)
    np.testing.assert_array_equal(np.asarray(ref["w"]), before)
    assert not np.allclose(np.asarray(placed.params["w"]), before)


# --------------------------------------------------------------------------- fused LM head


@pytest.mark.parametrize("chunk", [None, 7, 1000])
@pytest.mark.parametrize("entropy_grad", [True, False])
@pytest.mark.parametrize("start", [1, 4])
def test_fused_head_matches_full_logits_values_and_gradient(chunk, entropy_grad, start):
    """head_logprobs_and_entropy (chunked, checkpointed) == log-softmax of full logits, for
    values and for the gradient of a loss that uses both; chunk 7 does not divide B*(T-1).
    With start=4 only positions t >= 4 are computed (the rest are 0) and a loss on those
    positions has the same gradient."""
    from rubrax.policy import head_logprobs_and_entropy
    from rubrax.rl import losses

    D, Vh, temp = 5, 11, 0.7
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    h = jax.random.normal(k1, (3, 9, D))
    w = jax.random.normal(k2, (D, Vh))
    y = jax.random.randint(k3, (3, 9), 0, Vh)
    coef = jnp.linspace(-1.0, 1.0, 27).reshape(3, 9) * (jnp.arange(9) >= start)

    def fused(w, h):
        logp, ent = head_logprobs_and_entropy(lambda x: x @ w, h, y, temperature=temp, chunk_tokens=chunk, entropy_grad=entropy_grad,
                                              start=start)
        return jnp.sum(coef * logp) + jnp.sum(coef**2 * ent), (logp, ent)

    def full(w, h):
        z = (h @ w) / temp
        logp, ent = losses.token_logprobs(z, y), losses.token_entropy(z)
        ent_term = ent if entropy_grad else jax.lax.stop_gradient(ent)
        return jnp.sum(coef * logp) + jnp.sum(coef**2 * ent_term), (logp, ent)

    (lf, (pf, ef)), gf = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(w, h)
    (lr, (pr, er)), gr = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(w, h)
    np.testing.assert_allclose(pf[:, start:], pr[:, start:], atol=1e-5)
    np.testing.assert_allclose(ef[:, start:], er[:, start:], atol=1e-5)
    assert float(jnp.abs(pf[:, :start]).max()) == 0.0 and float(jnp.abs(ef[:, :start]).max()) == 0.0
    for a, b in zip(gf, gr):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_width", [0, PROMPT])
def test_update_with_fused_model_head_equals_unfused(prompt_width):
    """The trainer's fused path (ModelLogits.token_stats) gives the same update as a plain
    logits_fn on a real (tiny) transformer, entropy bonus on so both terms carry gradient;
    also when the batch's prompt_width (as make_batch sets it) lets the head skip the
    prompt positions."""
    from rubrax import models
    from rubrax.rl.step import model_logits_fn

    config = models.ModelConfig.tiny(vocab_size=V)
    params = models.init_params(config, jax.random.PRNGKey(0))
    batch = make_rollouts().replace(prompt_width=prompt_width)
    cfg = RLConfig(group_size=G, kl_coef=0.1, entropy_coef=0.01)
    tx = optax.sgd(0.5)
    fused_fn = model_logits_fn(config, chunk_tokens=5)
    plain_fn = lambda p, t, m: models.forward(p, t, config=config, mask_BxT=m)  # noqa: E731
    outs = []
    for fn in (fused_fn, plain_fn):
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx, seed=0)
        outs.append(jax.jit(lambda s, b, r, fn=fn: update(s, b, r, cfg=cfg, logits_fn=fn, tx=tx))(state, batch, params))
    (sa, ma), (sb, mb) = outs
    for k in ("loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(ma["grad_norm"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sa.params, sb.params)


def test_make_batch_layout_by_hand():
    """make_batch: prompts repeated per group, completions appended, loss mask only on
    completion tokens, behaviour logprobs zeroed off the completion, static prompt width."""
    from rubrax.rl.batch import make_batch

    prompt = np.array([[0, 5, 6], [7, 8, 9]])
    pmask = np.array([[0, 1, 1], [1, 1, 1]])
    comp = np.array([[1, 2], [3, 0], [4, 4], [5, 0]])
    cmask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]])
    logp = np.full((4, 2), -0.5, np.float32)
    b = make_batch(prompt, pmask, comp, cmask, logp, [1, 2, 3, 4], [True, True, False, True], group_size=2)
    np.testing.assert_array_equal(b.tokens_BxT[1], [0, 5, 6, 3, 0])
    np.testing.assert_array_equal(b.tokens_BxT[2], [7, 8, 9, 4, 4])
    np.testing.assert_array_equal(b.mask_BxT[1], [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(b.loss_mask_BxT[1], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(b.behaviour_logp_BxT[1], [0, 0, 0, -0.5, 0])
    assert b.prompt_width == 3
    assert b.valid_B.tolist() == [True, True, False, True]
    # static: survives placement on a mesh
    from rubrax.sharding import make_mesh, shard_batch

    assert shard_batch(b, make_mesh(jax.devices()[:2])).prompt_width == 3


# --------------------------------------------------------------------------- defects fixed


def _bigram_logp(w, tokens_BxT):
    from rubrax.rl import losses

    return np.asarray(losses.token_logprobs(bigram_logits({"w": w}, tokens_BxT, None), tokens_BxT))


def _padded_batch(extra_pad: int) -> RolloutBatch:
    """make_rollouts' batch with `extra_pad` more left-padding columns, as make_batch
    builds it (prompt_width = W): the same completions behind a wider prompt block."""
    b = make_rollouts()
    pad = lambda x, v=0: np.concatenate([np.full((B, extra_pad), v, x.dtype), np.asarray(x)], axis=1)  # noqa: E731
    return RolloutBatch(pad(b.tokens_BxT), pad(b.mask_BxT), pad(b.loss_mask_BxT), pad(b.behaviour_logp_BxT),
                        b.rewards_B, b.valid_B, prompt_width=PROMPT + extra_pad)


def test_dr_grpo_divides_by_the_completion_budget_whatever_the_prompt_width():
    """Dr. GRPO's loss is sum_it m l / (N_seq * C) with C the completion budget (T - W), a
    constant: two batches that differ only in left padding (prompt_bucket widths) take the
    same step. Hand-computed on policy (ratio 1): pg_loss = -sum_i A_i |y_i| / (N_seq C)."""
    cfg = RLConfig(group_size=G, advantage="dr_grpo", loss_aggregation="dr_grpo", behaviour_logprobs="recompute")
    tx = optax.sgd(1.0)
    outs = []
    for extra in (0, 5):
        state = TrainState.create(make_params(), tx, seed=0)
        outs.append(jax.jit(lambda s, b: update(s, b, None, cfg=cfg, logits_fn=bigram_logits, tx=tx))(
            state, jax.tree.map(jnp.asarray, _padded_batch(extra))))
    (s0, m0), (s5, m5) = outs
    b = make_rollouts()
    r, v = np.asarray(b.rewards_B, np.float64), np.asarray(b.valid_B)
    adv = np.zeros(B)
    for g in range(0, B, G):
        idx = [i for i in range(g, g + G) if v[i]]
        adv[idx] = r[idx] - r[idx].mean()
    lengths = np.asarray(b.loss_mask_BxT).sum(axis=1) * v
    budget = T - PROMPT
    expected = -(adv * lengths).sum() / ((lengths > 0).sum() * budget)
    np.testing.assert_allclose(float(m0["pg_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m5["pg_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(s5.params["w"], s0.params["w"], rtol=1e-6, atol=1e-7)


def test_replace_clip_low_gives_a_symmetric_clip_when_clip_high_was_not_set():
    """RLConfig never writes clip_high into itself, so dataclasses.replace(cfg, clip_low=0.3)
    clips at [0.7, 1.3], and an explicit clip_high survives a replace of clip_low. Checked
    on the update: ratio 1.25 with positive advantages is inside 1.3 (no clipping) but
    outside 1.2 (all clipped)."""
    base = RLConfig(group_size=G)
    wide = dataclasses.replace(base, clip_low=0.3)
    assert wide.clip_high is None and wide.upper_clip == 0.3
    assert dataclasses.replace(RLConfig(group_size=G, clip_high=0.28), clip_low=0.1).upper_clip == 0.28
    b = make_rollouts(invalid=())
    w = np.asarray(make_params()["w"])
    behaviour = (_bigram_logp(w, b.tokens_BxT) - np.log(1.25)) * b.loss_mask_BxT
    batch = b.replace(behaviour_logp_BxT=behaviour.astype(np.float32), rewards_B=np.ones(B, np.float32))
    batch = batch.replace(rewards_B=np.tile(np.array([1.0, 0.0, 2.0, 5.0], np.float32), P))  # mixed signs of A
    tx = optax.sgd(0.0)
    clip = {}
    for name, cfg in (("base", base), ("wide", wide)):
        state = TrainState.create(make_params(), tx, seed=0)
        _, m = update(state, jax.tree.map(jnp.asarray, batch), None, cfg=cfg, logits_fn=bigram_logits, tx=tx)
        clip[name] = float(m["clip_frac"])
    assert clip["wide"] == 0.0
    pos = np.tile(np.array([1.0, 0.0, 2.0, 5.0]) - 2.0 > 0, P)  # A > 0 rows: ratio 1.25 > 1.2 clips them
    expected = (b.loss_mask_BxT.sum(axis=1) * pos).sum() / b.loss_mask_BxT.sum()
    assert clip["base"] == pytest.approx(expected, rel=1e-5) and clip["base"] > 0


def test_update_reports_the_per_sequence_kl_to_the_reference():
    """seq_kl = mean over valid rows of sum_t (log mu(y_t) - log pi_ref(y_t)) (hand-computed)."""
    cfg = RLConfig(group_size=G, kl_coef=0.1)
    b = make_rollouts()
    tx = optax.sgd(0.0)
    state = TrainState.create(make_params(), tx, seed=0)
    ref = make_params(1)
    _, m = update(state, jax.tree.map(jnp.asarray, b), ref, cfg=cfg, logits_fn=bigram_logits, tx=tx)
    ref_logp = _bigram_logp(np.asarray(ref["w"]), b.tokens_BxT)
    per_seq = ((np.asarray(b.behaviour_logp_BxT) - ref_logp) * b.loss_mask_BxT).sum(axis=1)
    assert float(m["seq_kl"]) == pytest.approx(per_seq[b.valid_B].mean(), rel=1e-5)

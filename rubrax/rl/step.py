"""The policy-gradient update: `update(state, batch, ref_params) -> (state, metrics)`.

One call is one RL iteration on one batch of rollouts (P prompts x G samples, laid
out prompt-major). Inside, all on device and jitted once:

 1. behaviour logprobs mu: the sampler's own logprobs (default; exact for the
    one-step-off-policy loop) or recomputed with the current params;
 2. reference logprobs (only when kl_coef > 0);
 3. rewards r_i, optionally minus kl_coef * sum_t KL_t (KL folded into the reward);
 4. advantages by name over each group (`rubrax.rl.advantages`), invalid samples 0;
 5. `ppo_epochs` passes; each shuffles the batch (key fold_in(update key of the step, e))
    into `num_minibatches` minibatches, one optimizer update each; a minibatch is
    split into `grad_accum` micro-batches whose gradients are summed. Loss
    normalisers are taken over the whole minibatch, so accumulation is exact;
 6. loss = aggregate(PPO-clipped surrogate) [+ kl_coef * aggregate(KL)]
           [- entropy_coef * aggregate(entropy)]       (`rubrax.rl.losses`).
Invalid rewards (valid=False) remove their sample from every loss term.
The paper (arXiv 2509.21500, Sec. 5) trains with GRPO: G = 16, KL coefficient 0.01
(experiments/configs/grpo_paper.json).

Parallelism: the batch axis is sharded over a 1-D `jax.sharding.Mesh` named
"data" spanning all devices (data parallel: XLA inserts the gradient all-reduce,
the modern form of pmap). `fsdp=True` also shards every parameter and its Adam
moments along their largest dimension divisible by the device count; XLA
all-gathers them where the forward needs them. Multi-host: call
`jax.distributed.initialize()` on every host before anything else; `jax.devices()`
then lists all hosts' devices, `rubrax.sharding.make_mesh()` spans them, `Trainer.place_state` builds
each host's shards from identical host values, and each host feeds its own rows
(`rubrax.sharding.local_rows`) through `jax.make_array_from_process_local_data`
(`rubrax.sharding.shard_batch`).
The step itself is unchanged. Tested with two CPU processes (tests/test_rl_multihost.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rubrax.hostmem import release_host_memory
from rubrax.rl import advantages as adv_lib
from rubrax.rl import losses
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.state import UPDATE_STREAM, TrainState, stream_key
from rubrax.sharding import (batch_sharding, fsdp_params, make_mesh, param_sharding, put_global, shard_batch,
                             sharded_mesh, state_sharding)

LogitsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Hyper-parameters of the update (hashable; fixed for a run).

    group_size: samples per prompt G (GRPO "rollouts"; paper: 16).
    advantage: "grpo" | "rloo" | "dr_grpo".
    clip_low / clip_high: PPO clip range [1 - clip_low, 1 + clip_high]; clip_high None
        = clip_low (symmetric, also after dataclasses.replace(cfg, clip_low=...)); DAPO's
        clip-higher uses e.g. 0.2 / 0.28. `upper_clip` is the value in force.
    loss_aggregation: "token" | "sequence" | "dr_grpo" (see rubrax.rl.losses). Dr. GRPO
        divides by N_seq x the completion budget C (the batch's completion width T - W,
        = SampleConfig.max_new_tokens for make_batch batches; T when prompt_width is 0).
    kl_coef: beta of beta * KL(pi || pi_ref) (paper: 0.01); kl_estimator "k1"|"k2"|"k3";
        kl_in_reward: subtract beta * sum_t KL_t from each reward instead of adding the
        KL term to the loss. kl_importance_weighted: multiply the per-token KL by the
        (differentiable) importance ratio pi/mu, as TRL does by default
        (`use_bias_correction_kl`); off by default (see rubrax.rl.losses).
    ppo_epochs, num_minibatches, grad_accum: passes over the batch, optimizer updates
        per pass, micro-batches per optimizer update.
    behaviour_logprobs: "sampler" (importance ratio against the logprobs recorded at
        sampling time; required when rollouts may be stale) or "recompute" (with the
        params at the start of the update: use when the sampler's distribution differs
        from the model's, e.g. top-k/top-p truncation).
    temperature: logits are divided by it before every log-softmax (TRL's convention).
        `rubrax.policy.sample` records temperature-1 logprobs, so a temperature other
        than 1 requires behaviour_logprobs="recompute" (or an importance correction fed
        with the sampler's `sampling_logprobs`).
    importance_correction: "none" | "token_tis" | "sequence_mis" (`rubrax.rl.losses.
        importance_weights`): the batch's behaviour logprobs are then the sampler's mu
        (`SampleOutput.sampling_logprobs`: tempered, top-k / top-p truncated), the PPO
        ratio is taken against the trainer's own logprobs pi_old at the start of the
        update (one more forward pass), and each token's PPO loss is weighted by the
        truncated (token) or masked (sequence) ratio pi_old / mu, capped at
        importance_cap. Needs behaviour_logprobs="sampler" (the batch carries mu).
    """

    group_size: int
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float | None = None
    loss_aggregation: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    kl_importance_weighted: bool = False
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    num_minibatches: int = 1
    grad_accum: int = 1
    behaviour_logprobs: str = "sampler"
    temperature: float = 1.0
    importance_correction: str = "none"
    importance_cap: float = 2.0

    def __post_init__(self) -> None:
        adv_lib.get_advantage_fn(self.advantage)
        from rubrax.validate import check_float, check_int

        for name in ("group_size", "ppo_epochs", "num_minibatches", "grad_accum"):
            check_int(f"RLConfig.{name}", getattr(self, name), low=1)
        if not (0 < self.clip_low < 1 and self.upper_clip > 0):
            raise ValueError(f"RLConfig: need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.loss_aggregation not in losses.AGGREGATIONS:
            raise ValueError(f"RLConfig.loss_aggregation must be one of {losses.AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"RLConfig.kl_estimator must be one of {losses.KL_ESTIMATORS}, got {self.kl_estimator!r}")
        for name in ("kl_coef", "entropy_coef", "adv_eps"):  # NaN would act as 0, inf train to NaN
            check_float(f"RLConfig.{name}", getattr(self, name), low=0)
        if self.behaviour_logprobs not in ("sampler", "recompute"):
            raise ValueError(f"RLConfig.behaviour_logprobs must be 'sampler' or 'recompute', got {self.behaviour_logprobs!r}")
        check_float("RLConfig.temperature", self.temperature, low=0, open_low=True)
        if self.temperature != 1.0 and self.behaviour_logprobs == "sampler" and self.importance_correction == "none":
            # rubrax.policy.sample records temperature-1 logprobs; a tempered numerator
            # against them would be a biased ratio.
            raise ValueError("RLConfig.temperature != 1 needs behaviour_logprobs='recompute' or an importance_correction")
        if self.importance_correction not in losses.IMPORTANCE_CORRECTIONS:
            raise ValueError(f"RLConfig.importance_correction must be one of {losses.IMPORTANCE_CORRECTIONS}, got {self.importance_correction!r}")
        if not self.importance_cap >= 1.0:
            raise ValueError(f"RLConfig.importance_cap must be >= 1, got {self.importance_cap}")
        if self.importance_correction != "none" and self.behaviour_logprobs != "sampler":
            raise ValueError("RLConfig.importance_correction needs behaviour_logprobs='sampler': the batch carries the "
                             "sampler's logprobs mu, the update recomputes pi_old itself")

    @property
    def upper_clip(self) -> float:
        """clip_high, or clip_low when clip_high is None (computed, never written back: the
        config stays what the caller built)."""
        return self.clip_low if self.clip_high is None else self.clip_high

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    def check_batch(self, rows: int, where: str = "RLConfig") -> None:
        """A batch of `rows` rollouts must split into minibatches x micro-batches: say so at
        config time (before anything is sampled), not inside the first update."""
        parts = self.num_minibatches * self.grad_accum
        if rows % self.group_size or rows % parts:
            raise ValueError(f"{where}: a batch of {rows} rollouts (prompts_per_step x group_size) does not divide into "
                             f"{self.num_minibatches} minibatches x {self.grad_accum} micro-batches")


# --------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class ModelLogits:
    """logits_fn of a rubrax.models causal LM: (params, tokens_BxT, mask_BxT) -> logits_BxTxV.

    It also offers `token_stats`, the fused chunked LM head
    (`rubrax.policy.head_logprobs_and_entropy`), which the update uses instead of
    materialising [B, T, V] logits. Any other logits_fn works too (unfused path).
    Hashable, so a trainer cache can key on it.
    """

    config: Any
    chunk_tokens: int | None = None

    def __call__(self, params, tokens_BxT, mask_BxT):
        from rubrax import models

        return models.forward(params, tokens_BxT, config=self.config, mask_BxT=mask_BxT)

    def token_stats(self, params, tokens_BxT, mask_BxT, *, temperature: float, entropy_grad: bool,
                    start: int = 1):
        from rubrax.models import llama
        from rubrax.policy import head_logprobs_and_entropy, lm_head_fn

        h_BxTxD = llama.hidden_states(params, tokens_BxT, config=self.config, mask_BxT=mask_BxT)
        return head_logprobs_and_entropy(
            lm_head_fn(params, self.config), h_BxTxD, tokens_BxT,
            temperature=temperature, chunk_tokens=self.chunk_tokens, entropy_grad=entropy_grad,
            start=start,
        )


def model_logits_fn(config: Any, chunk_tokens: int | None = None) -> ModelLogits:
    """The logits_fn of a rubrax.models causal LM (see `ModelLogits`)."""
    return ModelLogits(config, chunk_tokens)


def _logp_and_entropy(logits_fn: LogitsFn, params: Any, tokens_BxT, mask_BxT, temperature: float, entropy_grad: bool = True,
                      start: int = 1):
    """Per-token logp and entropy; the fused path computes only positions >= start (the
    completion), the others are 0 (masked out of every loss term)."""
    fused = getattr(logits_fn, "token_stats", None)
    if fused is not None:
        return fused(params, tokens_BxT, mask_BxT, temperature=temperature, entropy_grad=entropy_grad, start=start)
    logits_BxTxV = logits_fn(params, tokens_BxT, mask_BxT).astype(jnp.float32) / temperature
    return losses.token_logprobs(logits_BxTxV, tokens_BxT), losses.token_entropy(logits_BxTxV)


def _micro_loss(params, mb: dict, norms: dict, *, cfg: RLConfig, logits_fn: LogitsFn, start: int = 1):
    """Loss of one micro-batch, normalised by its minibatch (`norms`), + metric sums."""
    logp_BxT, ent_BxT = _logp_and_entropy(logits_fn, params, mb["tokens"], mb["mask"], cfg.temperature, cfg.entropy_coef > 0,
                                          start=start)
    m_BxT = mb["loss_mask"]
    pg_BxT, ratio_BxT, clipped_BxT = losses.ppo_clipped_objective(
        logp_BxT, mb["behaviour_logp"], mb["adv"], clip_low=cfg.clip_low, clip_high=cfg.upper_clip
    )
    if "is_weight" in mb:  # off-policy correction: stop-gradient weight pi_old / mu per token
        pg_BxT = pg_BxT * mb["is_weight"]
    agg = functools.partial(losses.aggregate, mask_BxT=m_BxT, mode=cfg.loss_aggregation, **norms)
    pg_loss = agg(pg_BxT)
    loss = pg_loss
    sums = {
        "pg_loss": pg_loss,
        "entropy": jnp.sum(ent_BxT * m_BxT),
        "clip_frac": jnp.sum(clipped_BxT * m_BxT),
        "ratio": jnp.sum(ratio_BxT * m_BxT),
        # |log pi_theta - log mu| at the update's own logprobs (see _summarise)
        "logp_diff_sum": jnp.sum(jnp.abs(logp_BxT - mb["behaviour_logp"]) * m_BxT),
        "logp_diff_max": jnp.max(jnp.abs(logp_BxT - mb["behaviour_logp"]) * m_BxT),
    }
    if cfg.kl_coef > 0:
        kl_BxT = losses.kl_estimate(logp_BxT, mb["ref_logp"], cfg.kl_estimator)
        sums["kl"] = jnp.sum(jax.lax.stop_gradient(kl_BxT) * m_BxT)
        if cfg.kl_importance_weighted:
            kl_BxT = kl_BxT * ratio_BxT
        if not cfg.kl_in_reward:
            loss = loss + cfg.kl_coef * agg(kl_BxT)
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * agg(ent_BxT)
    sums["loss"] = loss
    return loss, jax.tree.map(jax.lax.stop_gradient, sums)


def _constrain(x, mesh: Mesh | None):
    """Keeps a micro-batch sharded over the data axis (when its size allows)."""
    if mesh is None or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def _minibatch_update(params, opt_state, mb: dict, *, cfg: RLConfig, logits_fn: LogitsFn, tx, mesh, start: int = 1,
                      completion_budget: int):
    """One optimizer update from one minibatch, accumulated over cfg.grad_accum micro-batches."""
    m_BxT = mb["loss_mask"]
    lengths_B = m_BxT.sum(axis=1)
    norms = {"num_sequences": jnp.sum(lengths_B > 0).astype(jnp.float32), "num_tokens": m_BxT.sum()}
    if cfg.loss_aggregation == "dr_grpo":
        # A constant (the completion budget), not T: with prompt_bucket the prompt width, so T,
        # changes from batch to batch, which would rescale the step size with it.
        norms["max_len"] = completion_budget
    micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, -1, *x.shape[1:]), mb)
    grad_fn = jax.grad(functools.partial(_micro_loss, cfg=cfg, logits_fn=logits_fn, start=start), has_aux=True)

    def accumulate(grads, one):
        one = jax.tree.map(lambda x: _constrain(x, mesh), one)
        g, sums = grad_fn(params, one, norms)
        return jax.tree.map(jnp.add, grads, g), sums

    if cfg.grad_accum == 1:  # no accumulator: saves one params-sized buffer
        grads, sums = grad_fn(params, jax.tree.map(lambda x: _constrain(x[0], mesh), micro), norms)
    else:
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, sums = jax.lax.scan(accumulate, zeros, micro)
        sums = {k: x.max(axis=0) if k.endswith("_max") else x.sum(axis=0) for k, x in sums.items()}
    sums["grad_norm"] = optax.tree.norm(grads)
    sums["tokens"] = norms["num_tokens"].astype(jnp.float32)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sums


def _shuffle_into_minibatches(data: dict, key, cfg: RLConfig):
    batch = next(iter(data.values())).shape[0]
    perm = jax.random.permutation(key, batch) if cfg.num_minibatches > 1 else jnp.arange(batch)
    return jax.tree.map(lambda x: x[perm].reshape(cfg.num_minibatches, -1, *x.shape[1:]), data)


def update(
    state: TrainState,
    batch: RolloutBatch,
    ref_params: Any,
    *,
    cfg: RLConfig,
    logits_fn: LogitsFn,
    tx: optax.GradientTransformation,
    mesh: Mesh | None = None,
    fsdp: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One RL iteration (see module docstring). Pure; jit it once with `make_update`.
    fsdp: the params are split over `mesh` (rubrax.sharding.param_sharding, fsdp=True)."""
    B = batch.rewards_B.shape[0]
    if B % cfg.group_size or B % (cfg.num_minibatches * cfg.grad_accum):
        raise ValueError(
            f"batch of {B} rollouts must divide into groups of {cfg.group_size} and "
            f"{cfg.num_minibatches} minibatches x {cfg.grad_accum} micro-batches"
        )
    if mesh is None:
        return _update(state, batch, ref_params, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=None)
    # The mesh in context lets the model pin its activations to the data axis at every
    # layer boundary (rubrax.models.llama.constrain_batch); with FSDP params it casts each
    # weight on its own shard before it is gathered (rubrax.sharding.compute_copy).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), fsdp_params(mesh if fsdp else None):
        return _update(state, batch, ref_params, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=mesh)


def _scored_per_micro_batch(logits_fn, params, batch: RolloutBatch, *, cfg: RLConfig, mesh, start: int):
    """logp_BxT of a no-gradient pass (behaviour recompute, reference policy), run one
    micro-batch of rows at a time so it holds no more activations than a training
    micro-batch. Micro-batch a takes rows a, a + n, a + 2n, ...: with the rows split over
    the data axis in contiguous blocks, every device keeps its own rows (no reshuffle)."""
    n = cfg.num_minibatches * cfg.grad_accum
    if n == 1:
        return _logp_and_entropy(logits_fn, params, batch.tokens_BxT, batch.mask_BxT, cfg.temperature, start=start)[0]
    strided = lambda x: jnp.swapaxes(x.reshape(-1, n, *x.shape[1:]), 0, 1)

    def one(xs):
        tokens, mask = (_constrain(x, mesh) for x in xs)
        return _logp_and_entropy(logits_fn, params, tokens, mask, cfg.temperature, entropy_grad=False, start=start)[0]

    logp_nxMxT = jax.lax.map(one, (strided(batch.tokens_BxT), strided(batch.mask_BxT)))
    return jnp.swapaxes(logp_nxMxT, 0, 1).reshape(batch.tokens_BxT.shape)


def _update(state, batch, ref_params, *, cfg: RLConfig, logits_fn: LogitsFn, tx, mesh):
    valid_B = batch.valid_B.astype(bool)
    start = max(batch.prompt_width, 1)  # the fused head skips prompt positions (never trained on)
    loss_mask_BxT = batch.loss_mask_BxT.astype(jnp.float32) * valid_B[:, None]
    scored = functools.partial(_scored_per_micro_batch, logits_fn, batch=batch, cfg=cfg, mesh=mesh, start=start)
    sampler_BxT = batch.behaviour_logp_BxT.astype(jnp.float32) * loss_mask_BxT
    metrics: dict[str, jax.Array] = {}
    if cfg.behaviour_logprobs == "sampler":
        behaviour_BxT = sampler_BxT
    else:
        behaviour_BxT = jax.lax.stop_gradient(scored(state.params)) * loss_mask_BxT
        diff_BxT = jnp.abs(behaviour_BxT - sampler_BxT)
        metrics["sampler_logp_diff_mean"] = diff_BxT.sum() / jnp.maximum(loss_mask_BxT.sum(), 1.0)
        metrics["sampler_logp_diff_max"] = diff_BxT.max()
    is_weight = None
    if cfg.importance_correction != "none":
        behaviour_BxT, is_weight, is_metrics = _importance_correction(scored(state.params), behaviour_BxT, loss_mask_BxT, cfg=cfg)
        metrics.update(is_metrics)
    rewards_B = batch.rewards_B.astype(jnp.float32)
    data = {"tokens": batch.tokens_BxT, "mask": batch.mask_BxT, "loss_mask": loss_mask_BxT, "behaviour_logp": behaviour_BxT}
    if is_weight is not None:
        data["is_weight"] = is_weight
    if cfg.kl_coef > 0:
        data["ref_logp"] = jax.lax.stop_gradient(scored(ref_params)) * loss_mask_BxT
        rewards_B, ref_metrics = _reference_terms(cfg, rewards_B, valid_B, behaviour_BxT, data["ref_logp"], loss_mask_BxT)
        metrics.update(ref_metrics)
    data["adv"] = adv_lib.compute_advantages(cfg.advantage, rewards_B, valid_B, group_size=cfg.group_size, eps=cfg.adv_eps)

    key = stream_key(state.key, state.step, UPDATE_STREAM)
    budget = batch.tokens_BxT.shape[1] - batch.prompt_width  # C = T - W (static)
    step_mb = functools.partial(_minibatch_update, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=mesh, start=start,
                                completion_budget=budget)

    def epoch(carry, e):
        minibatches = _shuffle_into_minibatches(data, jax.random.fold_in(key, e), cfg)

        def one(carry, mb):
            params, opt_state = carry
            params, opt_state, sums = step_mb(params, opt_state, mb)
            return (params, opt_state), sums

        carry, sums = jax.lax.scan(one, carry, minibatches)
        return carry, sums

    (params, opt_state), sums = jax.lax.scan(epoch, (state.params, state.opt_state), jnp.arange(cfg.ppo_epochs))
    metrics.update(_summarise(sums, cfg, batch, valid_B, data["adv"], loss_mask_BxT))
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def _importance_correction(old_logp_BxT, mu_BxT, loss_mask_BxT, *, cfg: RLConfig):
    """(pi_old logprobs, the PPO anchor; weights pi_old / mu; mismatch metrics) from the
    trainer's no-gradient pass at the start of the update and the sampler's logprobs mu."""
    old_BxT = jax.lax.stop_gradient(old_logp_BxT) * loss_mask_BxT
    w_BxT, stats = losses.importance_weights(old_BxT, mu_BxT, loss_mask_BxT, mode=cfg.importance_correction, cap=cfg.importance_cap)
    per = jnp.maximum(loss_mask_BxT.sum(), 1.0) if cfg.importance_correction == "token_tis" else jnp.maximum(stats["rows"], 1.0)
    metrics = {
        "is_log_ratio_abs_mean": stats["log_ratio_abs"] / jnp.maximum(loss_mask_BxT.sum(), 1.0),
        "is_log_ratio_abs_max": stats["log_ratio_abs_max"],
        "is_truncated_frac": stats["truncated"] / per,  # tokens (token_tis) or sequences (sequence_mis)
    }
    return old_BxT, w_BxT, metrics


def _reference_terms(cfg: RLConfig, rewards_B, valid_B, behaviour_BxT, ref_logp_BxT, loss_mask_BxT):
    """(rewards, metrics) from the reference logprobs: the KL penalty folded into the
    rewards (kl_in_reward), and "seq_kl", the per-sequence KL of the rollouts to the
    reference, k1 = sum_t (log mu(y_t) - log pi_ref(y_t)) over the completion (an unbiased
    estimate of KL(mu || pi_ref) per response; mu = pi on policy), mean over valid rows."""
    metrics = {"seq_kl": _masked_mean(losses.sequence_sum(behaviour_BxT - ref_logp_BxT, loss_mask_BxT), valid_B)}
    if cfg.kl_in_reward:
        seq_kl_B = losses.sequence_sum(losses.kl_estimate(behaviour_BxT, ref_logp_BxT, cfg.kl_estimator), loss_mask_BxT)
        rewards_B = rewards_B - cfg.kl_coef * seq_kl_B
        metrics["reward_kl_penalty"] = _masked_mean(cfg.kl_coef * seq_kl_B, valid_B)
    return rewards_B, metrics


def _masked_mean(x, m):
    m = m.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)


def _summarise(sums: dict, cfg: RLConfig, batch: RolloutBatch, valid_B, adv_B, loss_mask_BxT) -> dict:
    """Metrics of one update: token means over all epochs/minibatches, batch statistics.

    sampler_logp_diff_mean / _max (behaviour_logprobs="sampler"): mean and max over
    completion tokens of |log pi_theta - log mu|, the update's logprobs against the
    sampler's, at the first optimizer update (params still those the step started from;
    all rows when num_minibatches = 1). Non-zero from bf16 rounding, kernels that differ
    between sampler and update, and (one_step_off_policy) the one step of policy lag;
    with "recompute" they are measured on the whole batch in _update instead.
    """
    diff_sum, diff_max = sums.pop("logp_diff_sum"), sums.pop("logp_diff_max")
    if cfg.behaviour_logprobs == "sampler":
        first = jnp.maximum(sums["tokens"][0, 0], 1.0)
        out = {"sampler_logp_diff_mean": diff_sum[0, 0] / first, "sampler_logp_diff_max": diff_max[0, 0]}
    else:
        out = {}
    tokens = jnp.maximum(sums.pop("tokens").sum(), 1.0)
    n_updates = cfg.optimizer_steps_per_update
    out |= {k: sums[k].sum() / tokens for k in ("entropy", "clip_frac", "ratio") + (("kl",) if "kl" in sums else ())}
    out["loss"] = sums["loss"].sum() / n_updates
    out["pg_loss"] = sums["pg_loss"].sum() / n_updates
    out["grad_norm"] = sums["grad_norm"].mean()
    rewards_B = batch.rewards_B.astype(jnp.float32)
    mean = _masked_mean(rewards_B, valid_B)
    out["reward_mean"] = mean
    out["reward_std"] = jnp.sqrt(_masked_mean((rewards_B - mean) ** 2, valid_B))
    out["reward_invalid"] = jnp.sum(~valid_B).astype(jnp.int32)
    out["reward_invalid_frac"] = jnp.mean(~valid_B)
    out["zero_var_frac"] = adv_lib.zero_variance_fraction(rewards_B, valid_B, group_size=cfg.group_size, eps=cfg.adv_eps)
    out["adv_abs_mean"] = _masked_mean(jnp.abs(adv_B), valid_B)
    lengths_B = batch.loss_mask_BxT.astype(jnp.float32).sum(axis=1)
    out["response_len_mean"] = lengths_B.mean()
    out["response_len_max"] = lengths_B.max()
    out["reward_len_corr"] = _masked_corr(rewards_B, lengths_B, valid_B)  # length bias of the reward
    return out


def _masked_corr(x_B, y_B, m_B):
    """Pearson correlation over the rows of m_B; NaN when either side is constant there."""
    mx, my = _masked_mean(x_B, m_B), _masked_mean(y_B, m_B)
    cov = _masked_mean((x_B - mx) * (y_B - my), m_B)
    var = _masked_mean((x_B - mx) ** 2, m_B) * _masked_mean((y_B - my) ** 2, m_B)
    return jnp.where(var > 0, cov / jnp.sqrt(jnp.where(var > 0, var, 1.0)), jnp.nan)


# --------------------------------------------------------------------------- jit


def make_update(
    cfg: RLConfig,
    logits_fn: LogitsFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    ref_shardings: Any,
) -> Callable[[TrainState, RolloutBatch, Any], tuple[TrainState, dict]]:
    """`update` jitted once: state donated, batch split over the mesh, outputs pinned to
    the input shardings (so the next call reuses the same executable)."""
    fsdp = sharded_mesh(state_shardings.params) is not None
    fn = functools.partial(update, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=mesh, fsdp=fsdp)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding(mesh), ref_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def reference_dtype(logits_fn: LogitsFn):
    """The dtype the frozen reference params are kept in: a rubrax model's compute dtype
    when it differs from its parameter dtype (bf16 compute over float32 master weights:
    every layer casts its weights to bf16 before use, so a bf16 copy gives bit-identical
    logprobs at half the memory), else None (kept as given)."""
    config = getattr(logits_fn, "config", None)
    if config is None or getattr(config, "dtype", None) == getattr(config, "param_dtype", None):
        return None
    return jnp.dtype(config.dtype)


def cast_floating(tree: Any, dtype) -> Any:
    """Floating leaves of tree (arrays or ShapeDtypeStructs) in dtype; others unchanged."""
    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)
    return jax.tree.map(one, tree)


class Trainer:
    """A thin shell around the pure step: places state/batches on the mesh, calls the
    jitted update. Holds no training state of its own besides the compiled function.
    Only the shapes of `state` and `ref_params` are read: pass their `jax.eval_shape`
    (as train() does) to build a trainer without materialising any state."""

    def __init__(self, cfg: RLConfig, logits_fn: LogitsFn, tx, state: TrainState, ref_params: Any, *, mesh: Mesh | None = None, fsdp: bool = False):
        self.cfg, self.tx, self.mesh, self.logits_fn = cfg, tx, mesh or make_mesh(), logits_fn
        self._create = None
        self.state_shardings = state_sharding(state, self.mesh, fsdp=fsdp)
        self.ref_shardings = param_sharding(ref_params, self.mesh, fsdp=fsdp)
        self.update_fn = make_update(cfg, logits_fn, tx, mesh=self.mesh, state_shardings=self.state_shardings, ref_shardings=self.ref_shardings)

    def init_state(self, params: Any, *, seed: int) -> TrainState:
        """TrainState.create(params) made directly on the mesh: one jitted function whose
        outputs are pinned to the state's shardings, so the optimizer moments are born
        sharded (never a full unsharded copy of them on one device) and the params are
        copied into buffers of the state's own (the update donates them; the caller's
        arrays, maybe the reference policy too, stay intact). Params already placed with
        these shardings (e.g. loaded with them) move nowhere before the copy."""
        if self._create is None:  # compiled once per Trainer (the seed is an argument)
            self._create = jax.jit(lambda p, key: TrainState.create(jax.tree.map(jnp.copy, p), self.tx, key=key),
                                   out_shardings=self.state_shardings)
        placed = put_global(params, self.state_shardings.params)
        key = put_global(jax.random.PRNGKey(seed), self.state_shardings.key)
        out = self._create(placed, key)
        del placed
        release_host_memory()
        return out

    def place_state(self, state: TrainState) -> TrainState:
        """Copies the state onto the mesh, into buffers of its own: the update donates the
        state, which must never free the caller's arrays (e.g. the params passed to
        train(), which may also serve as the reference policy). A jitted copy, because
        device_put(..., may_alias=False) still aliases the first shard of a 1 -> N device
        replicated put (jax 0.10)."""
        placed = put_global(state, self.state_shardings)
        copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=self.state_shardings)
        out = copy(placed)
        del placed
        release_host_memory()  # the caller usually drops the unplaced state next
        return out

    def place_ref(self, ref_params: Any) -> Any:
        """The reference params on the mesh, in the model's compute dtype when that differs
        from the storage dtype (see `reference_dtype`)."""
        if ref_params is None:
            return None
        placed = put_global(ref_params, self.ref_shardings)
        dtype = reference_dtype(self.logits_fn)
        if dtype is None:
            return placed
        cast = jax.jit(lambda t: cast_floating(t, dtype), out_shardings=self.ref_shardings)
        return cast(placed)

    def __call__(self, state: TrainState, batch: RolloutBatch, ref_params: Any):
        return self.update_fn(state, shard_batch(batch, self.mesh), ref_params)


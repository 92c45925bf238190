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
from rubrax.sharding import batch_sharding, make_mesh, param_sharding, put_global, shard_batch, state_sharding

LogitsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Hyper-parameters of the update (hashable; fixed for a run).

    group_size: samples per prompt G (GRPO "rollouts"; paper: 16).
    advantage: "grpo" | "rloo" | "dr_grpo".
    clip_low / clip_high: PPO clip range [1 - clip_low, 1 + clip_high]; clip_high None
        = clip_low (symmetric); DAPO's clip-higher uses e.g. 0.2 / 0.28.
    loss_aggregation: "token" | "sequence" | "dr_grpo" (see rubrax.rl.losses).
    kl_coef: beta of beta * KL(pi || pi_ref) (paper: 0.01); kl_estimator "k1"|"k2"|"k3";
        kl_in_reward: subtract beta * sum_t KL_t from each reward instead of adding the
        KL term to the loss.
    ppo_epochs, num_minibatches, grad_accum: passes over the batch, optimizer updates
        per pass, micro-batches per optimizer update.
    behaviour_logprobs: "sampler" (importance ratio against the logprobs recorded at
        sampling time; required when rollouts may be stale) or "recompute" (with the
        params at the start of the update: use when the sampler's distribution differs
        from the model's, e.g. top-k/top-p truncation).
    temperature: logits are divided by it before every log-softmax (TRL's convention).
        `rubrax.policy.sample` records temperature-1 logprobs, so a temperature other
        than 1 requires behaviour_logprobs="recompute".
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
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    num_minibatches: int = 1
    grad_accum: int = 1
    behaviour_logprobs: str = "sampler"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        adv_lib.get_advantage_fn(self.advantage)
        if self.clip_high is None:
            object.__setattr__(self, "clip_high", self.clip_low)
        for name in ("group_size", "ppo_epochs", "num_minibatches", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"RLConfig: need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.loss_aggregation not in losses.AGGREGATIONS:
            raise ValueError(f"RLConfig.loss_aggregation must be one of {losses.AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"RLConfig.kl_estimator must be one of {losses.KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.adv_eps < 0:
            raise ValueError("RLConfig: kl_coef, entropy_coef and adv_eps must be >= 0")
        if self.behaviour_logprobs not in ("sampler", "recompute"):
            raise ValueError(f"RLConfig.behaviour_logprobs must be 'sampler' or 'recompute', got {self.behaviour_logprobs!r}")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature must be > 0, got {self.temperature}")
        if self.temperature != 1.0 and self.behaviour_logprobs == "sampler":
            # rubrax.policy.sample records temperature-1 logprobs; a tempered numerator
            # against them would be a biased ratio.
            raise ValueError("RLConfig.temperature != 1 needs behaviour_logprobs='recompute'")

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.ppo_epochs * self.num_minibatches


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
        logp_BxT, mb["behaviour_logp"], mb["adv"], clip_low=cfg.clip_low, clip_high=cfg.clip_high
    )
    agg = functools.partial(losses.aggregate, mask_BxT=m_BxT, mode=cfg.loss_aggregation, **norms)
    pg_loss = agg(pg_BxT)
    loss = pg_loss
    sums = {
        "pg_loss": pg_loss,
        "entropy": jnp.sum(ent_BxT * m_BxT),
        "clip_frac": jnp.sum(clipped_BxT * m_BxT),
        "ratio": jnp.sum(ratio_BxT * m_BxT),
    }
    if cfg.kl_coef > 0:
        kl_BxT = losses.kl_estimate(logp_BxT, mb["ref_logp"], cfg.kl_estimator)
        sums["kl"] = jnp.sum(jax.lax.stop_gradient(kl_BxT) * m_BxT)
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


def _minibatch_update(params, opt_state, mb: dict, *, cfg: RLConfig, logits_fn: LogitsFn, tx, mesh, start: int = 1):
    """One optimizer update from one minibatch, accumulated over cfg.grad_accum micro-batches."""
    m_BxT = mb["loss_mask"]
    lengths_B = m_BxT.sum(axis=1)
    norms = {"num_sequences": jnp.sum(lengths_B > 0).astype(jnp.float32), "num_tokens": m_BxT.sum()}
    if cfg.loss_aggregation == "dr_grpo":
        norms["max_len"] = m_BxT.shape[1]
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
        sums = jax.tree.map(lambda x: x.sum(axis=0), sums)
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
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One RL iteration (see module docstring). Pure; jit it once with `make_update`."""
    B = batch.rewards_B.shape[0]
    if B % cfg.group_size or B % (cfg.num_minibatches * cfg.grad_accum):
        raise ValueError(
            f"batch of {B} rollouts must divide into groups of {cfg.group_size} and "
            f"{cfg.num_minibatches} minibatches x {cfg.grad_accum} micro-batches"
        )
    valid_B = batch.valid_B.astype(bool)
    start = max(batch.prompt_width, 1)  # the fused head skips prompt positions (never trained on)
    loss_mask_BxT = batch.loss_mask_BxT.astype(jnp.float32) * valid_B[:, None]
    if cfg.behaviour_logprobs == "sampler":
        behaviour_BxT = batch.behaviour_logp_BxT.astype(jnp.float32)
    else:
        behaviour_BxT, _ = _logp_and_entropy(logits_fn, state.params, batch.tokens_BxT, batch.mask_BxT, cfg.temperature,
                                             start=start)
    behaviour_BxT = jax.lax.stop_gradient(behaviour_BxT) * loss_mask_BxT
    rewards_B = batch.rewards_B.astype(jnp.float32)
    data = {"tokens": batch.tokens_BxT, "mask": batch.mask_BxT, "loss_mask": loss_mask_BxT, "behaviour_logp": behaviour_BxT}
    metrics: dict[str, jax.Array] = {}
    if cfg.kl_coef > 0:
        ref_logp_BxT, _ = _logp_and_entropy(logits_fn, ref_params, batch.tokens_BxT, batch.mask_BxT, cfg.temperature,
                                            start=start)
        data["ref_logp"] = jax.lax.stop_gradient(ref_logp_BxT) * loss_mask_BxT
        if cfg.kl_in_reward:
            seq_kl_B = losses.sequence_sum(losses.kl_estimate(behaviour_BxT, data["ref_logp"], cfg.kl_estimator), loss_mask_BxT)
            rewards_B = rewards_B - cfg.kl_coef * seq_kl_B
            metrics["reward_kl_penalty"] = _masked_mean(cfg.kl_coef * seq_kl_B, valid_B)
    data["adv"] = adv_lib.compute_advantages(cfg.advantage, rewards_B, valid_B, group_size=cfg.group_size, eps=cfg.adv_eps)

    key = stream_key(state.key, state.step, UPDATE_STREAM)
    step_mb = functools.partial(_minibatch_update, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=mesh, start=start)

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


def _masked_mean(x, m):
    m = m.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)


def _summarise(sums: dict, cfg: RLConfig, batch: RolloutBatch, valid_B, adv_B, loss_mask_BxT) -> dict:
    """Metrics of one update: token means over all epochs/minibatches, batch statistics."""
    tokens = jnp.maximum(sums.pop("tokens").sum(), 1.0)
    n_updates = cfg.optimizer_steps_per_update
    out = {k: sums[k].sum() / tokens for k in ("entropy", "clip_frac", "ratio") + (("kl",) if "kl" in sums else ())}
    out["loss"] = sums["loss"].sum() / n_updates
    out["pg_loss"] = sums["pg_loss"].sum() / n_updates
    out["grad_norm"] = sums["grad_norm"].mean()
    rewards_B = batch.rewards_B.astype(jnp.float32)
    mean = _masked_mean(rewards_B, valid_B)
    out["reward_mean"] = mean
    out["reward_std"] = jnp.sqrt(_masked_mean((rewards_B - mean) ** 2, valid_B))
    out["reward_invalid"] = jnp.sum(~valid_B).astype(jnp.int32)
    out["zero_var_frac"] = adv_lib.zero_variance_fraction(rewards_B, valid_B, group_size=cfg.group_size, eps=cfg.adv_eps)
    out["adv_abs_mean"] = _masked_mean(jnp.abs(adv_B), valid_B)
    lengths_B = batch.loss_mask_BxT.astype(jnp.float32).sum(axis=1)
    out["response_len_mean"] = lengths_B.mean()
    out["response_len_max"] = lengths_B.max()
    return out



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
    fn = functools.partial(update, cfg=cfg, logits_fn=logits_fn, tx=tx, mesh=mesh)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding(mesh), ref_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


class Trainer:
    """A thin shell around the pure step: places state/batches on the mesh, calls the
    jitted update. Holds no training state of its own besides the compiled function.
    Only the shapes of `state` and `ref_params` are read: pass their `jax.eval_shape`
    (as train() does) to build a trainer without materialising any state."""

    def __init__(self, cfg: RLConfig, logits_fn: LogitsFn, tx, state: TrainState, ref_params: Any, *, mesh: Mesh | None = None, fsdp: bool = False):
        self.cfg, self.tx, self.mesh = cfg, tx, mesh or make_mesh()
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
        return put_global(ref_params, self.ref_shardings)

    def __call__(self, state: TrainState, batch: RolloutBatch, ref_params: Any):
        return self.update_fn(state, shard_batch(batch, self.mesh), ref_params)


"""Policy-gradient losses: PPO-clipped surrogate, KL estimators, entropy, aggregation.

Notation (per completion token t of sample i, samples drawn from the behaviour
policy mu that produced the rollouts):

    rho_it = exp(log pi_theta(y_t | .) - log mu(y_t | .))          importance ratio
    l_it   = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)   (Schulman et al. 2017)

`eps_high > eps_low` is DAPO's asymmetric "clip-higher" (Yu et al. 2025). With one
PPO epoch on fresh on-policy samples rho = 1 and the loss is plain REINFORCE with a
group baseline; the clip matters for extra epochs/minibatches and for the
one-step-off-policy loop.

KL(pi || pi_ref) is estimated per token from samples y ~ pi with
log_r = log pi_ref(y) - log pi(y) (Schulman 2020, "Approximating KL divergence"):

    k1 = -log_r                     unbiased, high variance, can be negative
    k2 = log_r^2 / 2                biased, low variance
    k3 = exp(log_r) - 1 - log_r     unbiased, >= 0, low variance (GRPO's choice)

Aggregation of a per-token quantity x_it over the mask m_it of one (mini)batch:

    "token"     sum_it m x / sum_it m                 (DAPO: every token counts the same)
    "sequence"  mean_i [sum_t m x / sum_t m]          (original GRPO: per-sample mean first)
    "dr_grpo"   sum_it m x / (N_seq * T_max)          (Dr. GRPO: no length normalisation)

with T_max the completion budget C (max new tokens: a constant, whatever the prompt width).
The denominators can be passed in explicitly so that micro-batches of one minibatch
sum exactly to the minibatch loss (gradient accumulation is then exact).

Off-policy correction (`importance_weights`). The sampler's distribution mu (the policy
of one step ago in the one-step-off-policy loop, bf16 sampling, top-k / top-p
truncation) differs from the trainer's pi_old (the current params at the start of the
update, which anchor the PPO ratio). With log_w_it = log pi_old(y_t | .) - log mu(y_t | .):

    "token_tis"     w_it = min(exp(log_w_it), cap)                       (truncated IS)
    "sequence_mis"  w_i  = exp(S_i) * [S_i <= log cap],  S_i = sum_t m log_w_it
                                                         (masked IS: drop the sequence)

and the per-token PPO loss is multiplied by the stop-gradient weight (the KL and entropy
terms are not: they are expectations under pi itself). A masked sequence keeps its place
in the loss normalisers, as in TRL's GRPOTrainer (vllm_importance_sampling_mode
"token_truncate" / "sequence_mask"); verl's rollout correction (Liu, Li et al. 2025,
"When Speed Kills Stability") defines the same two estimators.
All functions are pure jnp, float32, mask-aware.

Against TRL (GRPOTrainer._compute_loss, trl 1.16; tests/test_trl_parity.py feeds both the
same per-token logprobs, masks and advantages): "token" = TRL's bnpo and dapo, "sequence"
= grpo, "dr_grpo" = dr_grpo (max_completion_length = C), clip_low / clip_high = epsilon_low
/ epsilon_high, k3 = TRL's KL; loss and gradient agree to float32 rounding. Differences
that remain, by design:
 - KL weighting: TRL multiplies the per-token k3 by the (differentiable) importance ratio
   by default (`use_bias_correction_kl=True`), which changes the KL gradient even on policy
   (its value there is 1, its derivative is not 0). rubrax does not, unless
   RLConfig.kl_importance_weighted=True (then it matches TRL's default).
 - Empty completions: N_seq counts rows with at least one completion token; TRL's grpo and
   dr_grpo divide by all B rows, so with e empty rows TRL's loss is (B - e) / B of ours.
 - Invalid samples (valid=False: the judge failed) leave every term and every divisor
   (N_seq, token count); TRL has no such rows (a failed reward is NaN in its advantages,
   and the row still counts in its divisors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray

AGGREGATIONS = ("token", "sequence", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_CORRECTIONS = ("none", "token_tis", "sequence_mis")


def token_logprobs(logits_BxTxV: Array, tokens_BxT: Array) -> Array:
    """logp[:, t] = log softmax(logits[:, t-1])[tokens[:, t]]; 0 at t = 0 (no context).

    Same alignment as `rubrax.policy.logprobs`. Gathers from a float32 log-softmax.
    """
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    picked_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked_BxT, ((0, 0), (1, 0)))


def token_entropy(logits_BxTxV: Array) -> Array:
    """H[:, t] = -sum_v p log p of the distribution that predicts tokens[:, t]; 0 at t = 0."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    ent_BxT = -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
    return jnp.pad(ent_BxT, ((0, 0), (1, 0)))


def kl_estimate(logp_BxT: Array, ref_logp_BxT: Array, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (see module docstring)."""
    log_r = ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        # expm1 keeps precision when pi ~ pi_ref (log_r ~ 0), where k3 ~ log_r^2 / 2.
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def ppo_clipped_objective(
    logp_BxT: Array, behaviour_logp_BxT: Array, adv_B: Array, *, clip_low: float, clip_high: float
) -> tuple[Array, Array, Array]:
    """Per-token PPO loss l = -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A).

    Returns (loss_BxT, ratio_BxT, clipped_BxT) where clipped marks tokens whose
    gradient the clip switched off.
    """
    ratio_BxT = jnp.exp(logp_BxT - behaviour_logp_BxT)
    adv_Bx1 = adv_B[:, None].astype(jnp.float32)
    unclipped = ratio_BxT * adv_Bx1
    clipped = jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high) * adv_Bx1
    loss_BxT = -jnp.minimum(unclipped, clipped)
    was_clipped_BxT = ((adv_Bx1 > 0) & (ratio_BxT > 1.0 + clip_high)) | ((adv_Bx1 < 0) & (ratio_BxT < 1.0 - clip_low))
    return loss_BxT, ratio_BxT, was_clipped_BxT


def aggregate(
    x_BxT: Array,
    mask_BxT: Array,
    mode: str,
    *,
    num_sequences: Array | float | None = None,
    num_tokens: Array | float | None = None,
    max_len: int | None = None,
) -> Array:
    """Masked reduction of a per-token quantity to a scalar (see module docstring).

    Defaults: num_tokens = sum(mask), num_sequences = number of rows with a token,
    max_len = T. Pass the minibatch's values when reducing one micro-batch of it.
    """
    m = mask_BxT.astype(jnp.float32)
    total = jnp.sum(x_BxT * m)
    lengths_B = m.sum(axis=1)
    if num_sequences is None:
        num_sequences = jnp.sum(lengths_B > 0)
    if mode == "token":
        denom = m.sum() if num_tokens is None else num_tokens
        return total / jnp.maximum(denom, 1.0)
    if mode == "sequence":
        per_seq_B = jnp.sum(x_BxT * m, axis=1) / jnp.maximum(lengths_B, 1.0)
        return per_seq_B.sum() / jnp.maximum(num_sequences, 1.0)
    if mode == "dr_grpo":
        t_max = x_BxT.shape[1] if max_len is None else max_len
        return total / (jnp.maximum(num_sequences, 1.0) * t_max)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")


def sequence_sum(x_BxT: Array, mask_BxT: Array) -> Array:
    """sum_t m x per sequence (e.g. the sequence-level KL folded into the reward)."""
    return jnp.sum(x_BxT * mask_BxT.astype(jnp.float32), axis=1)


def importance_weights(
    old_logp_BxT: Array, behaviour_logp_BxT: Array, mask_BxT: Array, *, mode: str, cap: float
) -> tuple[Array, dict[str, Array]]:
    """Off-policy weights w_BxT of pi_old / mu (see module docstring) and mismatch stats.

    Returns (w_BxT, stats): w is 0 off the mask, 1 everywhere for mode "none"; stats
    holds sums over the masked tokens / rows, for metrics: "log_ratio_abs" (sum of
    |log_w|), "log_ratio_abs_max", "truncated" (tokens whose ratio exceeded cap, for
    token_tis; rows dropped, for sequence_mis) and "rows" (rows with a token).
    """
    m_BxT = mask_BxT.astype(jnp.float32)
    log_w_BxT = (old_logp_BxT.astype(jnp.float32) - behaviour_logp_BxT.astype(jnp.float32)) * m_BxT
    log_cap = jnp.log(jnp.float32(cap))
    stats = {
        "log_ratio_abs": jnp.sum(jnp.abs(log_w_BxT)),
        "log_ratio_abs_max": jnp.max(jnp.abs(log_w_BxT)),
        "rows": jnp.sum(m_BxT.sum(axis=1) > 0).astype(jnp.float32),
    }
    if mode == "none":
        w_BxT = m_BxT
        stats["truncated"] = jnp.float32(0.0)
    elif mode == "token_tis":
        # exp of the capped log ratio: never overflows, whatever the mismatch.
        w_BxT = jnp.exp(jnp.minimum(log_w_BxT, log_cap)) * m_BxT
        stats["truncated"] = jnp.sum((log_w_BxT > log_cap) * m_BxT)
    elif mode == "sequence_mis":
        s_B = log_w_BxT.sum(axis=1)
        keep_B = s_B <= log_cap
        w_B = jnp.where(keep_B, jnp.exp(jnp.minimum(s_B, log_cap)), 0.0)
        w_BxT = w_B[:, None] * m_BxT
        stats["truncated"] = jnp.sum(~keep_B & (m_BxT.sum(axis=1) > 0)).astype(jnp.float32)
    else:
        raise ValueError(f"unknown importance correction {mode!r}; expected one of {IMPORTANCE_CORRECTIONS}")
    return jax.lax.stop_gradient(w_BxT), jax.tree.map(jax.lax.stop_gradient, stats)

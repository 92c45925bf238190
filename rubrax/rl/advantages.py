"""Group-relative advantage estimators: GRPO, RLOO and Dr. GRPO, picked by name.

All estimators see a flat batch of B = P * G rewards laid out prompt-major (row
i * G + j is sample j of prompt i, as `rubrax.policy.sample` returns them) and a
validity mask. Invalid samples (the judge failed, timed out, ...) take no part in
their group's statistics and get advantage 0; they are also masked out of the loss
by the update step, so the 0 is never a silent reward.

With r_j the valid rewards of one group and n the number of valid ones:

    grpo     A_i = (r_i - mean_j r_j) / std_j r_j                (Shao et al. 2024)
    rloo     A_i = r_i - (sum_{j != i} r_j) / (n - 1)              (Ahmadian et al. 2024)
           = n / (n - 1) * (r_i - mean_j r_j)
    dr_grpo  A_i = r_i - mean_j r_j                                (Liu et al. 2025)

`std` is the population standard deviation (ddof=0). A group whose valid rewards
all tie (std below `eps`) carries no learning signal: its advantages are exactly 0
for every estimator, never NaN and never r/eps blow-ups. So is a group with fewer
than two valid samples. Dr. GRPO's other half (no length normalisation) is the
loss aggregation "dr_grpo" in `rubrax.rl.losses`.

Against TRL (GRPOTrainer, trl 1.16, scale_rewards="group"): TRL divides by the
Bessel-corrected std plus 1e-4, A = (r - mean) / (std_{ddof=1} + 1e-4), so its GRPO
advantages are sqrt((G - 1) / G) of ours when std >> 1e-4 (0.968x at G = 16); a group whose
rewards tie gets A = 0 in both. Invalid samples (valid=False) are left out of their
group's mean and std here; TRL has no invalid rows. tests/test_trl_parity.py therefore
feeds both losses the same advantages.

Pure jnp; jit-able; no Python branching on values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Array = jnp.ndarray


def _group_stats(rewards_B: Array, valid_B: Array, group_size: int):
    """Per-group valid count, mean and population std, broadcast back to B."""
    if rewards_B.ndim != 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"rewards must be flat with a multiple of group_size={group_size} entries, got {rewards_B.shape}")
    r_PxG = rewards_B.reshape(-1, group_size).astype(jnp.float32)
    v_PxG = valid_B.reshape(-1, group_size).astype(jnp.float32)
    n_P = v_PxG.sum(axis=1)
    mean_P = (r_PxG * v_PxG).sum(axis=1) / jnp.maximum(n_P, 1.0)
    centred_PxG = (r_PxG - mean_P[:, None]) * v_PxG
    var_P = (centred_PxG**2).sum(axis=1) / jnp.maximum(n_P, 1.0)
    std_P = jnp.sqrt(var_P)
    return r_PxG, v_PxG, n_P, mean_P, std_P


def _finish(adv_PxG: Array, v_PxG: Array, n_P: Array, std_P: Array, eps: float) -> Array:
    informative_P = (n_P >= 2) & (std_P > eps)
    adv_PxG = jnp.where(informative_P[:, None] & (v_PxG > 0), adv_PxG, 0.0)
    return adv_PxG.reshape(-1)


def grpo(rewards_B: Array, valid_B: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO: A_i = (r_i - mean) / std over the valid samples of the group; 0 if std <= eps."""
    r, v, n, mean, std = _group_stats(rewards_B, valid_B, group_size)
    safe_std = jnp.where(std > eps, std, 1.0)
    return _finish((r - mean[:, None]) / safe_std[:, None], v, n, std, eps)


def rloo(rewards_B: Array, valid_B: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """RLOO: A_i = r_i - mean of the other valid samples = n/(n-1) (r_i - mean)."""
    r, v, n, mean, std = _group_stats(rewards_B, valid_B, group_size)
    scale = n / jnp.maximum(n - 1.0, 1.0)
    return _finish(scale[:, None] * (r - mean[:, None]), v, n, std, eps)


def dr_grpo(rewards_B: Array, valid_B: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """Dr. GRPO: A_i = r_i - mean (no division by the group std)."""
    r, v, n, mean, std = _group_stats(rewards_B, valid_B, group_size)
    return _finish(r - mean[:, None], v, n, std, eps)


ADVANTAGES: dict[str, Callable[..., Array]] = {"grpo": grpo, "rloo": rloo, "dr_grpo": dr_grpo}


def get_advantage_fn(name: str) -> Callable[..., Array]:
    """The estimator registered under `name` (one of ADVANTAGES)."""
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGES)}") from None


def compute_advantages(name: str, rewards_B: Array, valid_B: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """Advantages by estimator name: `compute_advantages("grpo", r, valid, group_size=16)`."""
    return get_advantage_fn(name)(rewards_B, valid_B, group_size=group_size, eps=eps)


def zero_variance_fraction(rewards_B: Array, valid_B: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """Fraction of groups without learning signal (valid rewards tie, or < 2 valid samples)."""
    _, _, n, _, std = _group_stats(rewards_B, valid_B, group_size)
    return jnp.mean(((n < 2) | (std <= eps)).astype(jnp.float32))

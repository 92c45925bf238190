"""Peer test: rubrax's update and TRL's GRPOTrainer._compute_loss on identical inputs.

Both get the same per-token logprobs (the policy's, the behaviour policy's and the
reference's), completion masks and advantages; the policy logprobs are the leaves we
differentiate, so the comparison covers the loss value and its gradient with nothing
else in between (no model: rubrax's logits_fn returns the given logprobs, TRL's
_get_per_token_logps_and_entropies likewise). rubrax's update runs with SGD(lr=1), so
logp_new = logp - grad. Mapping (rubrax loss_aggregation -> TRL loss_type):
token -> bnpo and dapo, sequence -> grpo, dr_grpo -> dr_grpo (max_completion_length = C);
clip_low / clip_high -> epsilon_low / epsilon_high; k3 KL with kl_coef -> beta, and
kl_importance_weighted -> use_bias_correction_kl. The remaining convention differences
(advantage std, empty completions, invalid samples) are documented in rubrax/rl/losses.py
and rubrax/rl/advantages.py.
"""

import collections
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from trl.trainer import grpo_trainer

from rubrax.rl import advantages as adv_lib
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.state import TrainState
from rubrax.rl.step import RLConfig, update

G, P, W, C = 4, 3, 3, 6  # group size, prompts, prompt width, completion budget
B, T = G * P, W + C


@dataclasses.dataclass(frozen=True)
class GivenLogprobs:
    """A logits_fn stand-in whose fused path returns params["logp"] as the per-token logprobs."""

    def __call__(self, params, tokens_BxT, mask_BxT):
        raise AssertionError("only the fused path is used")

    def token_stats(self, params, tokens_BxT, mask_BxT, *, temperature, entropy_grad, start=1):
        return params["logp"], jnp.zeros_like(params["logp"])


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, C + 1, B)  # no empty completion (a documented difference)
    mask_BxC = (np.arange(C)[None] < lengths[:, None]).astype(np.float32)
    logp = rng.normal(-1.5, 0.5, (B, C)).astype(np.float32) * mask_BxC
    old = (logp + rng.normal(0.0, 0.25, (B, C)).astype(np.float32)) * mask_BxC  # ratios in ~[0.6, 1.6]: both clips bite
    ref = (logp + rng.normal(0.0, 0.3, (B, C)).astype(np.float32)) * mask_BxC
    rewards = rng.integers(0, 4, B).astype(np.float32)
    return mask_BxC, logp, old, ref, rewards


def rubrax_loss_and_grad(cfg: RLConfig, inputs):
    mask_BxC, logp, old, ref, rewards = inputs
    pad = lambda x: np.concatenate([np.zeros((B, W), np.float32), x], axis=1)  # noqa: E731
    batch = RolloutBatch(
        tokens_BxT=np.zeros((B, T), np.int32), mask_BxT=np.concatenate([np.ones((B, W)), mask_BxC], 1).astype(np.int32),
        loss_mask_BxT=pad(mask_BxC).astype(np.int32), behaviour_logp_BxT=pad(old), rewards_B=rewards,
        valid_B=np.ones(B, bool), prompt_width=W,
    )
    tx = optax.sgd(1.0)
    state = TrainState.create({"logp": jnp.asarray(pad(logp))}, tx, seed=0)
    new, metrics = update(state, jax.tree.map(jnp.asarray, batch), {"logp": jnp.asarray(pad(ref))}, cfg=cfg,
                          logits_fn=GivenLogprobs(), tx=tx)
    grad = np.asarray(state.params["logp"] - new.params["logp"])[:, W:]
    return float(metrics["loss"]), grad


def trl_loss_and_grad(loss_type: str, cfg: RLConfig, inputs, advantages):
    mask_BxC, logp, old, ref, _ = inputs
    leaf = torch.tensor(logp, requires_grad=True)
    ident = lambda x, **_: x  # noqa: E731  one process
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=cfg.kl_coef, loss_type=loss_type, epsilon_low=cfg.clip_low, epsilon_high=cfg.upper_clip,
        args=types.SimpleNamespace(use_bias_correction_kl=cfg.kl_importance_weighted, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=C, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=types.SimpleNamespace(gather=ident, reduce=ident, num_processes=1),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    m = torch.tensor(mask_BxC)
    inputs = {
        "prompt_ids": torch.zeros((B, W), dtype=torch.long), "prompt_mask": torch.ones((B, W), dtype=torch.long),
        "completion_ids": torch.zeros((B, C), dtype=torch.long), "completion_mask": m,
        "advantages": torch.tensor(np.asarray(advantages)), "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": m.sum(),
    }
    loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss.detach()), leaf.grad.numpy()


PAIRS = [("token", "bnpo"), ("token", "dapo"), ("sequence", "grpo"), ("dr_grpo", "dr_grpo")]


@pytest.mark.parametrize("aggregation,loss_type", PAIRS)
@pytest.mark.parametrize("kl_importance_weighted", [False, True])
def test_loss_and_gradient_match_trl(aggregation, loss_type, kl_importance_weighted):
    cfg = RLConfig(group_size=G, loss_aggregation=aggregation, clip_low=0.2, clip_high=0.28, kl_coef=0.04,
                   kl_estimator="k3", kl_importance_weighted=kl_importance_weighted)
    inputs = make_inputs()
    adv = adv_lib.compute_advantages(cfg.advantage, jnp.asarray(inputs[4]), jnp.ones(B, bool), group_size=G, eps=cfg.adv_eps)
    ours, g_ours = rubrax_loss_and_grad(cfg, inputs)
    theirs, g_theirs = trl_loss_and_grad(loss_type, cfg, inputs, adv)
    assert ours == pytest.approx(theirs, rel=2e-6, abs=1e-7)
    np.testing.assert_allclose(g_ours, g_theirs, rtol=2e-5, atol=1e-7)
    assert np.abs(g_ours).max() > 1e-3  # a real gradient, both clips active somewhere
    ratio = np.exp(inputs[1] - inputs[2])[inputs[0] > 0]
    assert (ratio > 1.28).any() and (ratio < 0.8).any()



@pytest.mark.parametrize("aggregation,loss_type", [("sequence", "grpo"), ("dr_grpo", "dr_grpo"), ("token", "bnpo")])
def test_empty_completions_keep_rubrax_divisors(aggregation, loss_type):
    """A documented difference: a row without completion tokens is not a sequence for
    rubrax (N_seq counts rows with tokens) but still one of TRL's B rows, so TRL's grpo and
    dr_grpo losses are (B - 1) / B of rubrax's with one empty row; token means agree."""
    cfg = RLConfig(group_size=G, loss_aggregation=aggregation)
    mask, logp, old, ref, rewards = make_inputs(2)
    mask[5], logp[5], old[5], ref[5] = 0.0, 0.0, 0.0, 0.0
    inputs = (mask, logp, old, ref, rewards)
    adv = adv_lib.compute_advantages("grpo", jnp.asarray(rewards), jnp.ones(B, bool), group_size=G)
    ours, g_ours = rubrax_loss_and_grad(cfg, inputs)
    theirs, g_theirs = trl_loss_and_grad(loss_type, cfg, inputs, adv)
    share = 1.0 if aggregation == "token" else (B - 1) / B
    assert theirs == pytest.approx(share * ours, rel=2e-6)
    np.testing.assert_allclose(g_theirs, share * g_ours, rtol=2e-5, atol=1e-7)

"""Policy-gradient RL: GRPO / RLOO / Dr. GRPO in pure JAX, data parallel, checkpointed.

    advantages  compute_advantages("grpo" | "rloo" | "dr_grpo", rewards_B, valid_B, group_size=G)
    losses      ppo_clipped_objective, kl_estimate (k1/k2/k3), token_entropy, aggregate
    state       TrainState (params, opt_state, step, root key); keys fold_in(root, step)
    step        RLConfig, RolloutBatch, update(state, batch, ref_params) -> (state, metrics),
                Trainer / make_update (jitted once, donated, sharded over a "data" mesh)
    loop        train(...): prompts -> rubrax.policy.sample -> reward protocol -> update
    recipe      JSON recipes for experiments/train_grpo.py and `rubrax rl train`
    toy         a programmatic task ("say <word>", reward "target_word") for CPU runs
"""

from rubrax.rl.advantages import ADVANTAGES, compute_advantages, dr_grpo, get_advantage_fn, grpo, rloo
from rubrax.rl.losses import aggregate, kl_estimate, ppo_clipped_objective, token_entropy, token_logprobs
from rubrax.rl.state import TrainState, step_key
from rubrax.rl.step import RLConfig, RolloutBatch, Trainer, make_batch, make_mesh, make_update, update
from rubrax.rl.loop import LoopConfig, TrainResult, train

__all__ = [
    "ADVANTAGES",
    "LoopConfig",
    "RLConfig",
    "RolloutBatch",
    "TrainState",
    "TrainResult",
    "Trainer",
    "aggregate",
    "compute_advantages",
    "dr_grpo",
    "get_advantage_fn",
    "grpo",
    "kl_estimate",
    "make_batch",
    "make_mesh",
    "make_update",
    "ppo_clipped_objective",
    "rloo",
    "step_key",
    "token_entropy",
    "token_logprobs",
    "train",
    "update",
]

"""Policy-gradient RL: GRPO / RLOO / Dr. GRPO in pure JAX, data parallel, checkpointed.

    advantages  compute_advantages("grpo" | "rloo" | "dr_grpo", rewards_B, valid_B, group_size=G)
    losses      ppo_clipped_objective, kl_estimate (k1/k2/k3), token_entropy, aggregate
    state       TrainState (params, opt_state, step, root key); keys fold_in(root, step)
    batch       RolloutBatch, make_batch (prompts x G completions -> one batch of B rows)
    step        RLConfig, update(state, batch, ref_params) -> (state, metrics),
                Trainer / make_update (jitted once, donated, sharded over rubrax.sharding's mesh)
    loop        LoopConfig, train(...): prompts -> rollouts -> rewards -> update, with hooks
    prompts     load_prompts -> PromptSet (tokenised records, the per-epoch data order)
    rollouts    RolloutSampler / EvalSampler (left padding, rubrax.policy.sample, decoding)
    reward_runner  RewardRunner (concurrent reward calls in a background thread, failures masked)
    resume      RunCheckpoints (orbax checkpoints + pre-sampled batches, resume, pruning)
    runlog      RunLogger (metrics JSONL / TensorBoard / W&B, progress bar)
    hooks       eval hooks (reward_eval_hook, winrate_eval_hook)
    recipe      JSON recipes for experiments/train_grpo.py and `rubrax rl train`
    toy         a programmatic task ("say <word>", reward "target_word") for CPU runs
"""

from rubrax.rl.advantages import ADVANTAGES, compute_advantages, dr_grpo, get_advantage_fn, grpo, rloo
from rubrax.rl.losses import aggregate, kl_estimate, ppo_clipped_objective, token_entropy, token_logprobs
from rubrax.rl.state import TrainState, step_key
from rubrax.rl.batch import RolloutBatch, make_batch
from rubrax.rl.step import RLConfig, Trainer, make_update, update
from rubrax.sharding import make_mesh
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

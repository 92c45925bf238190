"""The tail world: a synthetic testbed with a known gold reward (README's main job).

    rubrax sim run --preset cpu        # every arm of the paper's comparison, ~10 min on 2 CPU cores

Modules: world (tasks, tiered hidden requirements, gold reward and judge), predicates
(the criterion language), generators (base demonstrations, "good" and "great"
off-policy models with artifacts), agents (simulated proposer and verifier for the
shared RTD code), rewards ("sim_gold", registered here), presets (frozen configs),
experiment (the arms), report (tables, figures, CSVs), cli. Text is tokenised by
rubrax.models.tokenizer.WordTokenizer.

Importing this package is cheap (no jax); the experiment imports jax when it runs.
"""

from rubrax.rewards.registry import register_reward
from rubrax.sim.world import World, WorldConfig, make_world

# The testbed registers its own rewards (lazily: nothing is imported until one is asked for).
register_reward("sim_gold", "rubrax.sim.rewards:GoldReward")

__all__ = ["World", "WorldConfig", "make_world"]

"""The RL training state: one frozen PyTree (policy params, optimizer state, step, root key).

The frozen reference policy's params are NOT part of it: they never change, are
passed to `update` as a separate argument (so they are neither donated nor saved
with every checkpoint) and may be sharded differently.

Randomness is derived, not threaded: the key stored here is the run's root key and
never changes; the randomness of step s is `jax.random.fold_in(root, s)`, so a run
resumed from a checkpoint of step s draws exactly the keys the uninterrupted run
would have drawn.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rubrax import pytree

@pytree.dataclass
class TrainState:
    """params: policy PyTree; opt_state: optax state; step: int32 scalar (RL iterations
    done); key: uint32[2] root key (raw key data, so orbax can save it)."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, *, seed: int | None = None, key: jax.Array | None = None) -> TrainState:
        if (seed is None) == (key is None):
            raise ValueError("TrainState.create needs exactly one of seed= or key=")
        if key is None:
            key = jax.random.PRNGKey(seed)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=jnp.asarray(key, jnp.uint32))

    def step_key(self, step: int | jax.Array | None = None) -> jax.Array:
        """fold_in(root, step): the key of RL iteration `step` (default: the current one)."""
        return step_key(self.key, self.step if step is None else step)


# Independent streams derived from one step key: fold_in(step_key, stream).
UPDATE_STREAM = 0  # minibatch shuffles of the update (then fold_in(., epoch))
SAMPLE_STREAM = 1  # the rollouts of this step


def step_key(root_key: jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of RL iteration `step`: fold_in(root, step). Same on host and device."""
    return jax.random.fold_in(root_key, step)


def stream_key(root_key: jax.Array, step: int | jax.Array, stream: int) -> jax.Array:
    """fold_in(fold_in(root, step), stream): e.g. the sampling key of a step."""
    return jax.random.fold_in(step_key(root_key, step), stream)

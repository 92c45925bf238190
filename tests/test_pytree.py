"""rubrax.pytree: dataclass pytrees whose tree structure tells their classes apart.

The regression behind it: with jax's register_dataclass (and flax.struct.dataclass) two
different classes with the same fields have equal PyTreeDefs, and jit now and then ran
one class's trace for the other (CI: the gradient of worst_wrong(0.25) returned for
top_wrong(0.25)). With 300 such classes through one jit, register_dataclass gave a wrong
result for ~14% of them on this machine; the test below needs all 300 right.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rubrax
from rubrax import pytree
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.state import TrainState
from rubrax.theory import misspec, tilted
from rubrax.train.trainer import SupervisedState


def test_one_jit_never_runs_another_classes_trace():
    f = jax.jit(lambda m: m.c + type(m).k)
    wrong = []
    for i in range(300):
        cls = pytree.dataclass(type(f"K{i}", (), {"__annotations__": {"c": Any}, "k": float(i)}))
        if float(f(cls(jnp.float32(0.0)))) != i:
            wrong.append(i)
    assert not wrong


def test_tree_structure_names_the_class_and_the_static_fields():
    s = jax.tree_util.tree_structure
    assert s(misspec.top_wrong(0.25)) != s(misspec.worst_wrong(0.25))
    assert s(misspec.top_wrong(0.25)) == s(misspec.top_wrong(0.5))  # c is a leaf
    assert s(misspec.shuffled_band(0.2, 0.5, seed=0)) != s(misspec.shuffled_band(0.2, 0.5, perm=(1, 0, 3, 2)))
    three = (np.zeros(()),) * 3
    assert s(SupervisedState(*three)) != s(TrainState(*three, np.zeros(())))
    rows = (np.zeros((2, 3)),) * 4 + (np.zeros(2), np.zeros(2, bool))
    assert s(RolloutBatch(*rows, prompt_width=1)) != s(RolloutBatch(*rows, prompt_width=2))


def test_round_trip_keys_replace_and_no_init_on_unflatten():
    calls = []

    @pytree.dataclass
    class Box:
        a: Any
        b: Any
        tag: str = pytree.field(static=True, default="x")

        def __post_init__(self):
            calls.append(self.a)

    box = Box(np.float32(1.0), {"w": np.arange(3)}, tag="y")
    paths, treedef = jax.tree_util.tree_flatten_with_path(box)
    assert [jax.tree_util.keystr(p) for p, _ in paths] == [".a", ".b['w']"]
    calls.clear()
    doubled = jax.tree_util.tree_map(lambda x: x * 2, box)
    assert calls == [] and doubled.tag == "y" and float(doubled.a) == 2.0
    np.testing.assert_array_equal(doubled.b["w"], [0, 2, 4])
    assert box.replace(tag="z").tag == "z" and float(box.replace(a=3.0).a) == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        box.a = 0


def test_maps_of_equal_parameters_give_their_own_gradients():
    # The CI failure: in one process, worst_wrong(0.25) then top_wrong(0.25) through vjp.
    betas = jnp.array([0.1, 1.0])
    grads = {}
    for name, f in (("worst", misspec.worst_wrong(0.25)), ("top", misspec.top_wrong(0.25))):
        _, vjp = jax.vjp(lambda b, f=f: tilted(f, b).win_rate, betas)
        (grads[name],) = vjp(jnp.ones_like(betas))
    h = 1e-3
    for name, f in (("worst", misspec.worst_wrong(0.25)), ("top", misspec.top_wrong(0.25))):
        fd = (tilted(f, betas + h).win_rate - tilted(f, betas - h).win_rate) / (2 * h)
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(fd), rtol=2e-3)
    assert abs(float(grads["worst"][0] - grads["top"][0])) > 0.5  # -0.999 vs -0.083


def test_no_module_registers_dataclasses_with_jax_or_flax():
    root = Path(rubrax.__file__).parent
    use = re.compile(r"register_dataclass\b(?!`)|@\s*(flax\.)?struct\.dataclass|struct\.PyTreeNode")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "pytree.py" and any(use.search(line.split("#")[0]) for line in p.read_text().splitlines())]
    assert not offenders, f"use rubrax.pytree.dataclass instead in: {offenders}"


def test_user_maps_registered_by_jax_run_their_own_programs():
    # A user's Map subclasses registered the jax way have tree structures that compare equal;
    # tilted / best_of_n_uniform also key their jit on the Map's class, so each runs its own.
    from rubrax.theory import best_of_n_uniform

    def user_map(name, body):
        cls = type(name, (misspec.Map,), {"__annotations__": {"c": Any}, "__call__": body,
                                          "kinks": property(lambda self: jnp.reshape(self.c, (1,)))})
        return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))

    Low = user_map("Low", lambda self, u: jnp.where(u <= self.c, self.c - u, u))  # worst-c wrong
    High = user_map("High", lambda self, u: jnp.where(u <= 1 - self.c, u, 2 - self.c - u))  # top-c wrong
    High.kinks = property(lambda self: jnp.reshape(1 - self.c, (1,)))
    betas, n = jnp.array([0.05, 0.3, 2.0]), jnp.array([1.0, 4.0, 32.0])
    for user, ours in ((Low(0.3), misspec.worst_wrong(0.3)), (High(0.3), misspec.top_wrong(0.3))):
        np.testing.assert_allclose(np.asarray(tilted(user, betas).win_rate), np.asarray(tilted(ours, betas).win_rate), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(best_of_n_uniform(user, n).win_rate),
                                   np.asarray(best_of_n_uniform(ours, n).win_rate), rtol=1e-5)

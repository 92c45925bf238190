"""The reward-function protocol: RewardBatch, TRL-style wrapping, registry, combinators.

Host side only: no jax, so these tests are fast.
"""

import asyncio
import math

import numpy as np
import pytest

from rubrax.rewards import (
    CallableReward,
    Clip,
    Normalize,
    RewardBatch,
    RewardFnBase,
    WeightedSum,
    acall_reward,
    as_reward_fn,
    available_rewards,
    get_reward,
    register_reward,
)
from rubrax.rewards import registry

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


class Fixed(RewardFnBase):
    """A sync reward with fixed scores and validity."""

    def __init__(self, scores, valid=None, name="fixed"):
        self.scores, self.valid, self.name = scores, valid, name

    def __call__(self, prompts, completions, **columns):
        valid = np.ones(len(self.scores), bool) if self.valid is None else self.valid
        return RewardBatch(np.array(self.scores, np.float32), valid, tuple({"i": i} for i in range(len(self.scores))))


class AsyncFixed(RewardFnBase):
    def __init__(self, scores, name="afixed"):
        self.scores, self.name = scores, name

    async def acall(self, prompts, completions, **columns):
        await asyncio.sleep(0)
        return RewardBatch(np.array(self.scores, np.float32), np.ones(len(self.scores), bool))


# --------------------------------------------------------------------------- RewardBatch


def test_reward_batch_nonfinite_scores_become_invalid_zero():
    rb = RewardBatch([1.0, math.nan, math.inf, -2.0], [True, True, True, False])
    np.testing.assert_array_equal(rb.scores, np.array([1.0, 0.0, 0.0, -2.0], np.float32))
    np.testing.assert_array_equal(rb.valid, [True, False, False, False])
    assert rb.scores.dtype == np.float32 and rb.valid.dtype == bool
    assert rb.num_invalid == 3 and len(rb) == 4 and rb.info == ({}, {}, {}, {})


def test_reward_batch_shape_errors():
    with pytest.raises(ValueError, match="scores has shape"):
        RewardBatch([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="info entries"):
        RewardBatch([1.0, 2.0], [True, True], ({},))


def test_reward_batch_invalid():
    rb = RewardBatch.invalid(3, "judge down")
    assert not rb.valid.any() and rb.info[2] == {"error": "judge down"}


# --------------------------------------------------------------------------- TRL-style callables


def test_callable_wrapping_floats_none_nan():
    def f(prompts, completions, **kw):
        return [1.5, None, float("nan"), 4]

    rb = as_reward_fn(f)(PROMPTS, COMPLETIONS)
    np.testing.assert_array_equal(rb.valid, [True, False, False, True])
    np.testing.assert_array_equal(rb.scores, np.array([1.5, 0.0, 0.0, 4.0], np.float32))
    assert as_reward_fn(f).name == "f"


def test_callable_receives_keyword_columns():
    seen = {}

    def f(prompts, completions, answer, **kw):
        seen.update(prompts=prompts, answer=answer, extra=kw)
        return [float(c == a) for c, a in zip(completions, answer)]

    rb = as_reward_fn(f)(PROMPTS, COMPLETIONS, answer=["a", "x", "ccc", "y"], prompt_id=[0, 1, 2, 3])
    np.testing.assert_array_equal(rb.scores, [1, 0, 1, 0])
    assert seen["prompts"] == PROMPTS and seen["extra"] == {"prompt_id": [0, 1, 2, 3]}


def test_callable_exception_makes_batch_invalid_with_reason():
    def broken(prompts, completions, **kw):
        raise RuntimeError("rate limited")

    rb = as_reward_fn(broken)(PROMPTS, COMPLETIONS)
    assert not rb.valid.any()
    assert rb.info[0]["error"] == "RuntimeError: rate limited"


def test_callable_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="returned 2 scores for 4"):
        as_reward_fn(lambda prompts, completions, **kw: [1.0, 2.0])(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="3 prompts but 4 completions"):
        as_reward_fn(length_reward)(PROMPTS[:3], COMPLETIONS)
    with pytest.raises(ValueError, match="column 'answer' has 2 entries"):
        as_reward_fn(length_reward)(PROMPTS, COMPLETIONS, answer=["a", "b"])


def test_async_callable_sync_and_async_forms():
    async def f(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [None if c == "bb" else 2.0 * len(c) for c in completions]

    fn = as_reward_fn(f)
    for rb in (fn(PROMPTS, COMPLETIONS), asyncio.run(fn.acall(PROMPTS, COMPLETIONS))):
        np.testing.assert_array_equal(rb.scores, [2, 0, 6, 8])
        np.testing.assert_array_equal(rb.valid, [True, False, True, True])

    async def broken(prompts, completions, **kw):
        raise TimeoutError("slow judge")

    rb = asyncio.run(acall_reward(broken, PROMPTS, COMPLETIONS))
    assert not rb.valid.any() and "TimeoutError" in rb.info[0]["error"]


def test_sync_call_inside_running_loop():
    """A notebook calls a sync reward while an event loop runs: still works."""

    async def inside():
        return as_reward_fn(AsyncFixed([1.0, 2.0, 3.0, 4.0]))(PROMPTS, COMPLETIONS)

    rb = asyncio.run(inside())
    np.testing.assert_array_equal(rb.scores, [1, 2, 3, 4])


def test_callable_returning_reward_batch_passes_through():
    def f(prompts, completions, **kw):
        return RewardBatch([1.0, 2.0, 3.0, 4.0], [True, False, True, True])

    rb = as_reward_fn(f)(PROMPTS, COMPLETIONS)
    np.testing.assert_array_equal(rb.valid, [True, False, True, True])


def test_base_derives_missing_form_and_rejects_neither():
    rb = asyncio.run(Fixed([1.0, 2.0, 3.0, 4.0]).acall(PROMPTS, COMPLETIONS))
    np.testing.assert_array_equal(rb.scores, [1, 2, 3, 4])
    rb = AsyncFixed([5.0, 6.0, 7.0, 8.0])(PROMPTS, COMPLETIONS)
    np.testing.assert_array_equal(rb.scores, [5, 6, 7, 8])

    class Neither(RewardFnBase):
        pass

    with pytest.raises(NotImplementedError):
        Neither()(PROMPTS, COMPLETIONS)
    with pytest.raises(NotImplementedError):
        asyncio.run(Neither().acall(PROMPTS, COMPLETIONS))


def test_as_reward_fn_rejects_non_callables():
    with pytest.raises(TypeError):
        as_reward_fn(3)
    fixed = Fixed([1.0])
    assert as_reward_fn(fixed) is fixed


# --------------------------------------------------------------------------- combinators


def test_weighted_sum_hand_computed_and_validity():
    a = Fixed([1.0, 2.0, 3.0, 4.0], [True, True, False, True], name="a")
    b = Fixed([10.0, 20.0, 30.0, 40.0], [True, False, True, True], name="b")
    ws = WeightedSum([a, b], weights=[0.5, -0.1])
    rb = ws(PROMPTS, COMPLETIONS)
    # 0.5 * a - 0.1 * b
    np.testing.assert_allclose(rb.scores, [-0.5, -1.0, -1.5, -2.0], rtol=1e-6)
    np.testing.assert_array_equal(rb.valid, [True, False, False, True])
    assert ws.name == "a+b"
    assert rb.info[2]["a"] == {"score": 3.0, "valid": False, "i": 2}
    assert rb.info[2]["b"]["valid"] is True


def test_weighted_sum_mapping_async_and_callables():
    ws = WeightedSum({"len": length_reward, "fixed": AsyncFixed([1.0, 1.0, 1.0, 1.0])}, weights=[2.0, 3.0])
    for rb in (ws(PROMPTS, COMPLETIONS), asyncio.run(ws.acall(PROMPTS, COMPLETIONS))):
        np.testing.assert_allclose(rb.scores, [5.0, 7.0, 9.0, 11.0])
        assert rb.valid.all()
    assert ws.names == ["len", "fixed"]
    with pytest.raises(ValueError, match="2 weights for 1"):
        WeightedSum([length_reward], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])


def test_weighted_sum_default_weights_are_ones():
    rb = WeightedSum([Fixed([1.0, 2.0]), Fixed([3.0, 5.0])])(["p", "q"], ["a", "b"])
    np.testing.assert_allclose(rb.scores, [4.0, 7.0])


def test_clip_hand_computed_keeps_invalid():
    rb = Clip(Fixed([-3.0, 0.5, 7.0, 2.0], [True, True, True, False]), low=0.0, high=1.0)(PROMPTS, COMPLETIONS)
    np.testing.assert_array_equal(rb.scores, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(rb.valid, [True, True, True, False])
    with pytest.raises(ValueError):
        Clip(length_reward, low=2.0, high=1.0)


def test_normalize_batch_ignores_invalid_scores():
    # valid scores 1, 3 -> mean 2, population std 1; the invalid 100 takes no part.
    inner = Fixed([1.0, 3.0, 100.0, 2.0], [True, True, False, True])
    rb = Normalize(inner, eps=0.0)(PROMPTS, COMPLETIONS)
    std = np.std([1.0, 3.0, 2.0])
    np.testing.assert_allclose(rb.scores[[0, 1, 3]], np.array([-1.0, 1.0, 0.0]) / std, rtol=1e-6)
    np.testing.assert_array_equal(rb.valid, [True, True, False, True])


def test_normalize_constant_batch_is_zero_not_nan():
    rb = Normalize(Fixed([2.0, 2.0, 2.0]))(["p"] * 3, ["c"] * 3)
    np.testing.assert_array_equal(rb.scores, [0.0, 0.0, 0.0])
    assert rb.valid.all()


def test_normalize_running_statistics_hand_computed():
    norm = Normalize(Fixed([1.0, 3.0]), mode="running", eps=0.0)
    rb1 = norm(["p"] * 2, ["c"] * 2)
    np.testing.assert_allclose(rb1.scores, [-1.0, 1.0])  # mean 2, std 1
    norm.inner = Fixed([5.0, 7.0])
    rb2 = norm(["p"] * 2, ["c"] * 2)
    seen = np.array([1.0, 3.0, 5.0, 7.0])  # mean 4, std sqrt(5)
    np.testing.assert_allclose(rb2.scores, (np.array([5.0, 7.0]) - 4.0) / np.sqrt(5.0), rtol=1e-6)
    assert norm.count == 4 and norm.mean == pytest.approx(seen.mean())
    with pytest.raises(ValueError, match="mode"):
        Normalize(length_reward, mode="ema")


def test_transforms_compose_async():
    fn = Clip(Normalize(length_reward, eps=0.0), low=-1.0, high=1.0)
    rb = asyncio.run(fn.acall(PROMPTS, COMPLETIONS))
    z = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.std([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(rb.scores, np.clip(z, -1, 1), rtol=1e-6)
    assert fn.name == "clip(normalize(length_reward))"


# --------------------------------------------------------------------------- registry


def test_registry_by_name():
    @register_reward("test_len_scaled")
    class LenScaled(RewardFnBase):
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, prompts, completions, **columns):
            return RewardBatch([self.scale * len(c) for c in completions], np.ones(len(completions), bool))

    try:
        fn = get_reward("test_len_scaled", scale=0.5)
        np.testing.assert_allclose(fn(PROMPTS, COMPLETIONS).scores, [0.5, 1.0, 1.5, 2.0])
        assert "test_len_scaled" in available_rewards()
        # A string is accepted wherever a reward function is.
        assert isinstance(as_reward_fn("test_len_scaled"), LenScaled)
        # Registering the same factory again is harmless; another one under the name is not.
        register_reward("test_len_scaled")(LenScaled)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_len_scaled")(Fixed)
    finally:
        registry._REGISTRY.pop("test_len_scaled", None)


def test_registry_function_factory_and_unknown_name():
    @register_reward("test_plain_fn")
    def make(bonus=0.0):
        return lambda prompts, completions, **kw: [len(c) + bonus for c in completions]

    try:
        fn = get_reward("test_plain_fn", bonus=1.0)
        assert isinstance(fn, CallableReward)
        np.testing.assert_allclose(fn(PROMPTS, COMPLETIONS).scores, [2, 3, 4, 5])
    finally:
        registry._REGISTRY.pop("test_plain_fn", None)
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        get_reward("no_such_reward")


def test_registry_lists_bradley_terry_provider():
    assert "bradley_terry" in available_rewards()


def test_callable_without_kwargs_gets_only_its_columns():
    from rubrax.rewards import as_reward_fn

    def length_reward(prompts, completions):
        return [float(len(c)) for c in completions]

    out = as_reward_fn(length_reward)(["p", "q"], ["ab", "abcd"], prompt_id=["1", "2"])
    assert out.valid.tolist() == [True, True]
    assert out.scores.tolist() == [2.0, 4.0]


# --------------------------------------------------------------------------- names: "module:attr", "file.py:attr"


def test_names_resolve_modules_files_classes_factories_and_trl_callables(tmp_path, monkeypatch):
    from rubrax.rewards import UnknownRewardError, make_reward, resolve_reward

    (tmp_path / "pkg_rw").mkdir()
    (tmp_path / "pkg_rw" / "__init__.py").write_text("")
    (tmp_path / "pkg_rw" / "mod.py").write_text(
        "from rubrax.rewards import RewardBatch, RewardFnBase\n"
        "class Scaled(RewardFnBase):\n"
        "    def __init__(self, scale):\n        self.scale = scale\n"
        "    def __call__(self, prompts, completions, **kw):\n"
        "        return RewardBatch([self.scale * len(c) for c in completions], [True] * len(completions))\n"
        "def make(bonus):\n    return lambda prompts, completions, **kw: [len(c) + bonus for c in completions]\n"
        "def trl(prompts, completions, bonus=0.0):\n    return [len(c) * 10 + bonus for c in completions]\n"
        "INSTANCE = Scaled(3.0)\n"
        "class Ns:\n    nested = staticmethod(trl)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("pkg_rw.mod:Scaled", scale=0.5)(PROMPTS, COMPLETIONS).scores.tolist() == [0.5, 1.0, 1.5, 2.0]
    assert get_reward("pkg_rw.mod:make", bonus=1.0)(PROMPTS, COMPLETIONS).scores.tolist() == [2, 3, 4, 5]
    trl = get_reward("pkg_rw.mod:trl", bonus=0.5)  # kwargs bound to every call
    assert trl(PROMPTS, COMPLETIONS, prompt_id=["a"] * 4).scores.tolist() == [10.5, 20.5, 30.5, 40.5]
    assert get_reward("pkg_rw.mod:INSTANCE")(PROMPTS, COMPLETIONS).scores.tolist() == [3, 6, 9, 12]
    assert get_reward("pkg_rw.mod:Ns.nested")(PROMPTS, COMPLETIONS).scores.tolist() == [10, 20, 30, 40]
    with pytest.raises(TypeError, match="takes no kwargs"):
        make_reward(resolve_reward("pkg_rw.mod:INSTANCE"), {"scale": 2})
    # a file, relative to base_dir first, loaded once
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rw.py").write_text("CALLS = []\ndef f(prompts, completions):\n    CALLS.append(1)\n    return [1.0] * len(completions)\n")
    fn = resolve_reward("rw.py:f", base_dir=tmp_path / "sub")
    assert resolve_reward(str(tmp_path / "sub" / "rw.py") + ":f") is fn
    assert get_reward(str(tmp_path / "sub" / "rw.py") + ":f")(PROMPTS, COMPLETIONS).scores.tolist() == [1.0] * 4
    with pytest.raises(UnknownRewardError, match=r"no file 'rw.py' \(tried "):
        resolve_reward("rw.py:f", base_dir=tmp_path)
    with pytest.raises(UnknownRewardError, match="has no attribute 'g'"):
        resolve_reward("rw.py:g", base_dir=tmp_path / "sub")


def test_lazy_registration_imports_nothing_until_asked():
    import sys

    register_reward("test_lazy", "json.decoder:JSONDecoder")  # a module surely not ours
    try:
        assert "test_lazy" in available_rewards()
        register_reward("test_lazy", "json.decoder:JSONDecoder")  # the same target again: harmless
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_lazy", "json:dumps")
        name = "rubrax_test_never_imported"
        register_reward("test_lazy2", f"{name}:f")
        assert name not in sys.modules
        with pytest.raises(KeyError, match=f"tried to import module '{name}'"):
            get_reward("test_lazy2")
    finally:
        registry._REGISTRY.pop("test_lazy", None)
        registry._REGISTRY.pop("test_lazy2", None)


def test_weighted_sum_reports_components_through_concat_and_transforms():
    a = CallableReward(lambda prompts, completions, **kw: [float(len(c)) for c in completions], name="len")
    b = CallableReward(lambda prompts, completions, **kw: [None if c == "bb" else 1.0 for c in completions], name="gap")
    ws = Clip(WeightedSum([a, b], [0.5, 2.0]), -10, 10)
    assert ws.component_names == ("len", "gap")
    out = ws(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(out.components["len"][0], [1, 2, 3, 4])
    assert out.components["gap"][1].tolist() == [True, False, True, True]
    assert out.valid.tolist() == [True, False, True, True]
    whole = RewardBatch.concat([out, RewardBatch.invalid(2, "timeout")])  # a failed call has no components
    assert whole.components["len"][1].tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(whole.components["len"][0], [1, 2, 3, 4, 0, 0])
    assert [i.get("error") for i in whole.info[4:]] == ["timeout", "timeout"]
    assert WeightedSum([a, b, a]).component_names == ("len_0", "gap", "len_2")

"""The reward-function protocol: the host-side door between text and the RL step.

A reward function takes a batch of prompts and completions (plus per-example
columns, TRL-style keyword arguments) and returns a `RewardBatch`:

    scores  float32[B]  the reward of each completion (meaningless where not valid)
    valid   bool[B]     False where the reward could not be computed (judge failed,
                        rubric missing, timeout ...). Invalid is never a silent 0:
                        the RL step masks invalid samples out of the loss.
    info    list[dict]  per-example details (verdicts, failures, ...), JSON-able

Two forms exist: `RewardFn` (sync `__call__`) and `AsyncRewardFn` (`async acall`).
Every reward function built here implements both through `RewardFnBase`.
Plain Python callables returning floats (TRL's convention; `None` or NaN = invalid)
are accepted anywhere a reward function is, through `as_reward_fn`.

Host side only: numpy, no jax.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """Scores, validity mask and per-example info of one batch of completions."""

    scores: np.ndarray  # float32[B]
    valid: np.ndarray  # bool[B]
    info: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        valid = np.asarray(self.valid, dtype=bool).reshape(-1)
        if scores.shape != valid.shape:
            raise ValueError(f"RewardBatch: scores has shape {scores.shape} but valid has {valid.shape}")
        # A non-finite score cannot be trusted: it is invalid, and stored as 0 so that
        # downstream arithmetic (masked means) never sees NaN.
        finite = np.isfinite(scores)
        valid = valid & finite
        scores = np.where(finite, scores, 0.0).astype(np.float32)
        info = tuple(self.info) if self.info else tuple({} for _ in range(scores.shape[0]))
        if len(info) != scores.shape[0]:
            raise ValueError(f"RewardBatch: {len(info)} info entries for {scores.shape[0]} scores")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "info", info)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    @classmethod
    def invalid(cls, n: int, reason: str) -> "RewardBatch":
        return cls(np.zeros(n, np.float32), np.zeros(n, bool), tuple({"error": reason} for _ in range(n)))


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch: ...


@runtime_checkable
class AsyncRewardFn(Protocol):
    async def acall(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch: ...


class RewardFnBase:
    """Base class: implement one of `__call__` / `acall`; the other form is derived.

    Subclasses that are naturally async (LLM judges) override `acall`; CPU-bound
    ones (a reward model, a programmatic check) override `__call__`.
    """

    name: str = "reward"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        if type(self).acall is RewardFnBase.acall:
            raise NotImplementedError(f"{type(self).__name__} implements neither __call__ nor acall")
        return _run_sync(self.acall(prompts, completions, **columns))

    async def acall(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        if type(self).__call__ is RewardFnBase.__call__:
            raise NotImplementedError(f"{type(self).__name__} implements neither __call__ nor acall")
        return await asyncio.to_thread(self.__call__, prompts, completions, **columns)


def _run_sync(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (a notebook): run the coroutine on a fresh loop in a thread.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _check_lengths(prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Any]) -> int:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"reward function got {len(prompts)} prompts but {n} completions")
    for key, col in columns.items():
        if isinstance(col, (list, tuple, np.ndarray)) and len(col) != n:
            raise ValueError(f"reward column {key!r} has {len(col)} entries for {n} completions")
    return n


class CallableReward(RewardFnBase):
    """Wraps a TRL-style callable `f(prompts, completions, **kw) -> list[float | None]`.

    Also accepts callables that return a `RewardBatch`, and async callables. An
    exception from the callable makes the whole batch invalid (recorded in info);
    `None` or NaN makes one item invalid.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        self._accepts = _accepted_columns(fn)

    def _columns(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        # Pass only the columns the callable can take (all of them when it has **kwargs), so a
        # function without **kwargs is not turned into an all-invalid batch by a TypeError.
        return dict(columns) if self._accepts is None else {k: v for k, v in columns.items() if k in self._accepts}

    def _convert(self, out: Any, n: int) -> RewardBatch:
        if isinstance(out, RewardBatch):
            if len(out) != n:
                raise ValueError(f"reward {self.name!r} returned {len(out)} scores for {n} completions")
            return out
        values = list(out)
        if len(values) != n:
            raise ValueError(f"reward {self.name!r} returned {len(values)} scores for {n} completions")
        scores = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float32)
        return RewardBatch(scores, np.isfinite(scores))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        if self._is_async:
            return _run_sync(self.acall(prompts, completions, **columns))
        n = _check_lengths(prompts, completions, columns)
        try:
            out = self.fn(prompts=list(prompts), completions=list(completions), **self._columns(columns))
        except Exception as err:  # failures are values: the batch is invalid, the loop goes on
            return RewardBatch.invalid(n, f"{type(err).__name__}: {err}")
        return self._convert(out, n)

    async def acall(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
        if not self._is_async:
            return await asyncio.to_thread(self.__call__, prompts, completions, **columns)
        n = _check_lengths(prompts, completions, columns)
        try:
            out = await self.fn(prompts=list(prompts), completions=list(completions), **self._columns(columns))
        except Exception as err:
            return RewardBatch.invalid(n, f"{type(err).__name__}: {err}")
        return self._convert(out, n)


def _accepted_columns(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Names of the keyword arguments `fn` accepts, or None when it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def as_reward_fn(fn: Any) -> RewardFnBase:
    """Returns `fn` if it already is a rubrax reward function, else wraps it."""
    if isinstance(fn, RewardFnBase):
        return fn
    if isinstance(fn, str):
        return get_reward(fn)
    if callable(fn):
        return CallableReward(fn)
    raise TypeError(f"not a reward function: {fn!r}")


async def acall_reward(fn: Any, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardBatch:
    """Calls any reward function in its async form."""
    return await as_reward_fn(fn).acall(prompts, completions, **columns)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: registers a reward-function factory (a class or function) under `name`.

    Configs then pick rewards by name: `get_reward("rubric", rubrics=...)`.
    """

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return deco


# Modules that register rewards on import; imported lazily by get_reward so that the
# registry is complete without importing jax for host-only rewards.
_PROVIDERS = (
    "rubrax.rewards.rubric",
    "rubrax.rewards.bradley_terry",
    "rubrax.sim.rewards",
    "rubrax.rl.toy",
)


def _load_providers() -> None:
    import importlib

    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise


def available_rewards() -> list[str]:
    _load_providers()
    return sorted(_REGISTRY)


def get_reward(name: str, **kwargs: Any) -> RewardFnBase:
    """Builds the reward function registered under `name` with keyword arguments."""
    if name not in _REGISTRY:
        _load_providers()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return as_reward_fn(_REGISTRY[name](**kwargs))


# --------------------------------------------------------------------------- combinators


class WeightedSum(RewardFnBase):
    """sum_k w_k r_k. An item is valid only where every component is valid.

    Components are called concurrently in the async form.
    """

    def __init__(self, rewards: Mapping[str, Any] | Sequence[Any], weights: Sequence[float] | None = None):
        if isinstance(rewards, Mapping):
            names, fns = list(rewards.keys()), [as_reward_fn(r) for r in rewards.values()]
        else:
            fns = [as_reward_fn(r) for r in rewards]
            names = [f.name for f in fns]
        if not fns:
            raise ValueError("WeightedSum needs at least one reward")
        weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
        if len(weights) != len(fns):
            raise ValueError(f"WeightedSum: {len(weights)} weights for {len(fns)} rewards")
        self.names, self.fns, self.weights = names, fns, weights
        self.name = "+".join(names)

    def _combine(self, parts: Sequence[RewardBatch]) -> RewardBatch:
        scores = sum(w * p.scores.astype(np.float64) for w, p in zip(self.weights, parts))
        valid = np.logical_and.reduce([p.valid for p in parts])
        info = tuple(
            {name: {"score": float(p.scores[i]), "valid": bool(p.valid[i]), **p.info[i]} for name, p in zip(self.names, parts)}
            for i in range(len(parts[0]))
        )
        return RewardBatch(np.asarray(scores, np.float32), valid, info)

    def __call__(self, prompts, completions, **columns):
        return self._combine([f(prompts, completions, **columns) for f in self.fns])

    async def acall(self, prompts, completions, **columns):
        parts = await asyncio.gather(*(f.acall(prompts, completions, **columns) for f in self.fns))
        return self._combine(parts)

    async def aclose(self) -> None:
        """Closes every component that holds connections (LLM verifiers)."""
        for f in self.fns:
            if hasattr(f, "aclose"):
                await f.aclose()


class _Transform(RewardFnBase):
    """A reward with an elementwise/batchwise transform of its valid scores."""

    def __init__(self, inner: Any):
        self.inner = as_reward_fn(inner)
        self.name = f"{type(self).__name__.lower()}({self.inner.name})"

    def transform(self, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, out: RewardBatch) -> RewardBatch:
        return RewardBatch(self.transform(out.scores, out.valid), out.valid, out.info)

    def __call__(self, prompts, completions, **columns):
        return self._apply(self.inner(prompts, completions, **columns))

    async def acall(self, prompts, completions, **columns):
        return self._apply(await self.inner.acall(prompts, completions, **columns))


class Clip(_Transform):
    """Clips valid scores to [low, high]."""

    def __init__(self, inner: Any, low: float = -math.inf, high: float = math.inf):
        if not low <= high:
            raise ValueError(f"Clip: low={low} > high={high}")
        super().__init__(inner)
        self.low, self.high = low, high

    def transform(self, scores, valid):
        return np.clip(scores, self.low, self.high)


class Normalize(_Transform):
    """Standardises a reward: (r - mean) / (std + eps).

    `mode="batch"` uses the valid scores of each batch; `mode="running"` keeps a
    running mean/variance over all batches seen (Welford), so the scale is stable
    along training. Invalid scores take no part in the statistics.
    """

    def __init__(self, inner: Any, mode: str = "batch", eps: float = 1e-6):
        if mode not in ("batch", "running"):
            raise ValueError(f"Normalize: mode must be 'batch' or 'running', got {mode!r}")
        super().__init__(inner)
        self.mode, self.eps = mode, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def transform(self, scores, valid):
        x = scores[valid].astype(np.float64)
        if self.mode == "running":
            for v in x:
                self.count += 1
                delta = v - self.mean
                self.mean += delta / self.count
                self.m2 += delta * (v - self.mean)
            mean = self.mean
            std = math.sqrt(self.m2 / self.count) if self.count else 0.0
        else:
            mean = float(x.mean()) if x.size else 0.0
            std = float(x.std()) if x.size else 0.0
        return ((scores - mean) / (std + self.eps)).astype(np.float32)

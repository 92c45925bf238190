"""The paper's preference-pair sets for the Bradley-Terry baseline, labelled by a judge.

Pair sets as in the paper's BT baseline (Sec. 5, appendix): on-policy pairs are two
samples of the policy being trained; off-policy pairs are two responses of a stronger
model; mixed is both sets together. Labels come from any judge callable
`judge(prompt, response_a, response_b) -> 0 | 1 | None` (sync or async; None or an
exception = the judgement failed: the pair is dropped and counted, never guessed).
With `cache_path`, every judgement is appended to a JSONL file as soon as it is made and
reused on a rerun, so a crash loses nothing already judged. The pair format itself
(reading, writing, token arrays) is rubrax.data.pairs.

Host side only: no jax.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from rubrax.data.pairs import PreferencePair, parse_label
from rubrax.data.records import append_jsonl, iter_jsonl, text_field

Judge = Callable[[str, str, str], "int | None | Awaitable[int | None]"]
KINDS = ("on_policy", "off_policy")


@dataclasses.dataclass(frozen=True)
class PairSet:
    pairs: tuple[PreferencePair, ...]
    num_failed: int  # judgements that failed (None or exception): dropped, not guessed
    num_cached: int  # judgements reused from the cache file


def _load_cache(path: str | os.PathLike | None) -> dict[tuple[str, str, str], int]:
    if path is None or not os.path.exists(path):
        return {}
    cache = {}
    for src, line, rec in iter_jsonl(path):
        key = (text_field(rec, "prompt", src, line), text_field(rec, "response_a", src, line), text_field(rec, "response_b", src, line))
        cache[key] = parse_label(rec, src, line)
    return cache


def _choose(candidates: Sequence[str], k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """k distinct unordered pairs of distinct candidates, each in a random order."""
    n = len(candidates)
    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if candidates[i] != candidates[j]]
    picked = rng.permutation(len(all_pairs))[:k]
    out = []
    for idx in picked:
        i, j = all_pairs[idx]
        # Random presentation order, so a judge's position bias does not become a label bias.
        out.append((candidates[i], candidates[j]) if rng.random() < 0.5 else (candidates[j], candidates[i]))
    return out


async def _judge_one(judge: Judge, prompt: str, a: str, b: str, sem: asyncio.Semaphore) -> int | None:
    async with sem:
        try:
            out = judge(prompt, a, b)
            if inspect.isawaitable(out):
                out = await out
        except Exception:  # a failed judgement is a dropped pair, counted by the caller
            return None
    if isinstance(out, bool) or out not in (0, 1):
        return None
    return int(out)


async def amake_pairs(
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    judge: Judge,
    *,
    kind: str,
    pairs_per_prompt: int = 1,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    max_concurrency: int = 8,
) -> PairSet:
    """Picks `pairs_per_prompt` pairs among each prompt's candidates and labels them with `judge`."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    cache = _load_cache(cache_path)
    todo = []
    for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
        rng = np.random.default_rng([seed, i])
        todo += [(prompt, a, b) for a, b in _choose(list(cands), pairs_per_prompt, rng)]
    sem = asyncio.Semaphore(max_concurrency)
    num_cached = sum(key in cache for key in todo)

    async def label(key: tuple[str, str, str]) -> int | None:
        if key in cache:
            return cache[key]
        out = await _judge_one(judge, *key, sem)
        if out is not None and cache_path is not None:
            append_jsonl(cache_path, {"prompt": key[0], "response_a": key[1], "response_b": key[2], "label": out})
        return out

    labels = await asyncio.gather(*(label(key) for key in todo))
    pairs = [
        PreferencePair(p, a if y == 0 else b, b if y == 0 else a, kind)
        for (p, a, b), y in zip(todo, labels)
        if y is not None
    ]
    return PairSet(tuple(pairs), sum(y is None for y in labels), num_cached)


def make_pairs(*args: Any, **kwargs: Any) -> PairSet:
    """Sync form of `amake_pairs` (for scripts; inside a running event loop use amake_pairs)."""
    return asyncio.run(amake_pairs(*args, **kwargs))


def on_policy_pairs(prompts: Sequence[str], policy_samples: Sequence[Sequence[str]], judge: Judge, **kw: Any) -> PairSet:
    """Pairs of the policy's own samples (the paper's on-policy BT data)."""
    return make_pairs(prompts, policy_samples, judge, kind="on_policy", **kw)


def off_policy_pairs(prompts: Sequence[str], strong_samples: Sequence[Sequence[str]], judge: Judge, **kw: Any) -> PairSet:
    """Pairs of a stronger model's responses (the paper's off-policy "great" pairs)."""
    return make_pairs(prompts, strong_samples, judge, kind="off_policy", **kw)


def mixed_pairs(
    prompts: Sequence[str],
    policy_samples: Sequence[Sequence[str]],
    strong_samples: Sequence[Sequence[str]],
    judge: Judge,
    *,
    seed: int = 0,
    **kw: Any,
) -> PairSet:
    """On-policy and off-policy pairs together, shuffled (the paper's "both" arm)."""
    on = on_policy_pairs(prompts, policy_samples, judge, seed=seed, **kw)
    off = off_policy_pairs(prompts, strong_samples, judge, seed=seed + 1, **kw)
    pairs = list(on.pairs + off.pairs)
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(pairs))
    return PairSet(tuple(pairs[i] for i in order), on.num_failed + off.num_failed, on.num_cached + off.num_cached)

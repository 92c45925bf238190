"""Preference pairs: readers, writers, token arrays, and the paper's pair-set builders.

Record shapes (JSONL lines or `datasets` rows):
    {prompt, chosen, rejected}                      chosen is preferred
    {prompt, response_a, response_b, label}         label 0: response_a preferred,
                                                    label 1: response_b preferred
Both may carry `source` (e.g. "on_policy"). Errors name the file, line (or row) and
field: missing field, empty text, label not in {0, 1}.

Pair sets as in the paper's BT baseline (Sec. 5, appendix): on-policy pairs are two
samples of the policy being trained; off-policy pairs are two responses of a stronger
model; mixed is both sets together. Labels come from any judge callable
`judge(prompt, response_a, response_b) -> 0 | 1 | None` (sync or async; None or an
exception = the judgement failed: the pair is dropped and counted, never guessed).
With `cache_path`, every judgement is appended to a JSONL file as soon as it is made and
reused on a rerun, so a crash loses nothing already judged.

Token arrays (`encode_pairs`): tokens_Nx2xT, mask_Nx2xT with index 0 = chosen,
1 = rejected, each row `chat(prompt) + response + eos` (rubrax.data.sft encoding).

Host side only: no jax.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rubrax.data.records import RecordError, append_jsonl, iter_jsonl, iter_source, source_name, text_field, write_jsonl
from rubrax.data.sft import encode_prompt_response, pad_id, padded_length

Judge = Callable[[str, str, str], "int | None | Awaitable[int | None]"]
KINDS = ("on_policy", "off_policy")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: str = ""

    def to_record(self) -> dict[str, str]:
        rec = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.source:
            rec["source"] = self.source
        return rec


def _label(rec: Mapping[str, Any], source: str, line: int) -> int:
    if "label" not in rec or rec["label"] is None:
        raise RecordError(source, line, "label", "missing")
    value = rec["label"]
    # bool is an int in Python; True/False are not labels.
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise RecordError(source, line, "label", f"must be 0 (response_a preferred) or 1 (response_b preferred), got {value!r}")
    return int(value)


def parse_pair(rec: Mapping[str, Any], source: str = "<record>", line: int = 0) -> PreferencePair:
    prompt = text_field(rec, "prompt", source, line)
    src = rec.get("source") or ""
    if not isinstance(src, str):
        raise RecordError(source, line, "source", f"must be a string, got {type(src).__name__}")
    if "response_a" in rec or "response_b" in rec or "label" in rec:
        a = text_field(rec, "response_a", source, line)
        b = text_field(rec, "response_b", source, line)
        label = _label(rec, source, line)
        chosen, rejected = (a, b) if label == 0 else (b, a)
    else:
        chosen = text_field(rec, "chosen", source, line)
        rejected = text_field(rec, "rejected", source, line)
    return PreferencePair(prompt, chosen, rejected, src)


def read_pairs(data: str | os.PathLike | Iterable[Mapping[str, Any]], source: str | None = None) -> list[PreferencePair]:
    """Reads pairs from a JSONL path, a list of dicts or a `datasets.Dataset` (either shape)."""
    out = [parse_pair(rec, src, line) for src, line, rec in iter_source(data, source)]
    if not out:
        raise RecordError(source_name(data, source), None, None, "no records")
    return out


def write_pairs(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> None:
    """Writes {prompt, chosen, rejected, source} lines atomically."""
    write_jsonl(path, (p.to_record() for p in pairs))


def encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """tokens_Nx2xT int32 and mask_Nx2xT int32 (right padding); [:, 0] chosen, [:, 1] rejected."""
    seqs = [
        [encode_prompt_response(tokenizer, p.prompt, r, max_length=max_length)[0] for r in (p.chosen, p.rejected)]
        for p in pairs
    ]
    t = pad_to or padded_length([len(s) for pair in seqs for s in pair], max_length)
    tokens = np.full((len(seqs), 2, t), pad_id(tokenizer), np.int32)
    mask = np.zeros((len(seqs), 2, t), np.int32)
    for i, pair in enumerate(seqs):
        for j, ids in enumerate(pair):
            ids = ids[-t:] if len(ids) > t else ids
            tokens[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = 1
    return {"tokens": tokens, "mask": mask}


# --------------------------------------------------------------------------- building pair sets


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
        cache[key] = _label(rec, src, line)
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

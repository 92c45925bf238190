"""The "Chasing the Tail" experiment's config: one JSON file, parsed and validated once.

    {
      "prompts":  {"train": "train.jsonl", "test": "test.jsonl"},      # {prompt_id, prompt}
      "endpoint": {"base_url": null, "concurrency": 64, ...},          # ClientConfig defaults
      "proposer": {"model": "gpt-4.1", "temperature": 0.0},            # + any ClientConfig field
      "verifier": {"model": "gpt-4.1-mini", "mode": "all"},
      "judge":    {"model": "gpt-4.1"},
      "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 4096},   # the pools
      "pools": {"good": {"sources": [{"model": "...", "n": 2}]},       # or {"file": "pool.jsonl"}
                "great": ..., "great_diverse": ...},
      "rtd":  {"pool_size": 16, "drop_used": true, "seed": 0},
      "arms": [{"name": "initial_rubric"},                             # no pool: the initial rubric
               {"name": "4_great_pairs", "pool": "great", "pairs": 4}, ...],
      "grpo": {"model": ..., "rl": ..., "sample": ..., "optim": ..., "loop": ..., "epochs": ...},
      "eval": {"temperature": 0.0, "max_tokens": 2048, "both_orders": true, ...},
      "healthbench": null                                              # or a HealthBench rubrics file
    }

"prompts" may also give "n_train" / "n_test": the prompt counts `--dry-run` uses when the
files are not there yet. "eval.curve_every" k > 0 also judges each arm's policy against the base every k RL steps
during training (the held-out win-rate curve; k x fewer calls than every step, still
arms x steps / k x test prompts judge calls). "pairs" is the number of RTD rounds (one pair of responses per round, used pairs dropped).
"grpo" is a `rubrax rl train` recipe without "train"/"eval"/"reward" (the experiment fills
them: the train prompts and the arm's rubric reward). Relative paths are relative to the
config file. Keys starting with "_" are comments; unknown keys are errors naming the file
and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

STAGES = ("pools", "rubrics", "rtd", "grpo", "export", "responses", "winrate", "healthbench", "report")
_TOP = ("prompts", "endpoint", "proposer", "verifier", "judge", "sampling", "pools", "rtd", "arms", "grpo", "eval", "healthbench")
_CLIENT_FIELDS = ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s", "json_mode",
                  "price_per_mtok", "transport")


class ConfigError(ValueError):
    """A bad experiment config: names the file and the key."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__(f"{source}: key {key!r}: {message}")


def _comments_out(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if not str(k).startswith("_")}


def _check_keys(section: Any, allowed: tuple[str, ...], source: str, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise ConfigError(source, where, f"must be an object, got {type(section).__name__}")
    section = _comments_out(section)
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(source, f"{where}.{unknown[0]}" if where else unknown[0], f"unknown; expected one of {list(allowed)}")
    return section


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A model at an OpenAI-compatible endpoint; `client` holds ClientConfig fields."""

    model: str
    client: Mapping[str, Any]

    def client_config(self, cache_dir: str) -> Any:
        from rubrax.elicit.client import ClientConfig

        values = dict(self.client)
        if values.get("price_per_mtok") is not None:
            values["price_per_mtok"] = tuple(values["price_per_mtok"])
        return ClientConfig(model=self.model, cache_dir=cache_dir, **values)


@dataclasses.dataclass(frozen=True)
class Pool:
    name: str
    sources: tuple[tuple[Endpoint, int], ...] = ()
    file: str | None = None

    @property
    def size(self) -> int:
        return sum(n for _, n in self.sources)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    pool: str | None = None
    pairs: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    source: str
    raw: Mapping[str, Any]
    train_prompts: str
    test_prompts: str
    n_train: int | None = None  # --dry-run only, when the prompt files are absent
    n_test: int | None = None
    proposer: Endpoint
    proposer_temperature: float
    proposer_max_tokens: int | None
    verifier: Endpoint
    verifier_mode: str
    judge: Endpoint
    sampling: Mapping[str, Any]
    pools: Mapping[str, Pool]
    pool_size: int
    drop_used: bool
    rtd_seed: int
    arms: tuple[Arm, ...]
    grpo: Mapping[str, Any]
    eval: Mapping[str, Any]
    healthbench: str | None

    def stage_config(self, stage: str) -> dict[str, Any]:
        """The part of the raw config a stage's outputs depend on (stored with the stage, fingerprinted)."""
        keys = {
            "pools": ("prompts", "sampling", "pools"),
            "rubrics": ("prompts", "proposer"),
            "rtd": ("prompts", "proposer", "verifier", "pools", "rtd", "arms"),
            "grpo": ("prompts", "verifier", "arms", "grpo"),
            "export": ("arms", "grpo"),
            "responses": ("prompts", "arms", "grpo", "eval"),
            "winrate": ("prompts", "arms", "judge", "eval"),
            "healthbench": ("prompts", "arms", "verifier", "healthbench"),
            "report": ("arms",),
        }[stage]
        return {k: self.raw.get(k) for k in keys}

    def fingerprint(self, stage: str) -> str:
        return hashlib.sha256(json.dumps(self.stage_config(stage), sort_keys=True).encode()).hexdigest()[:16]


def _endpoint(spec: Any, defaults: Mapping[str, Any], source: str, where: str, extra: tuple[str, ...] = ()) -> tuple[Endpoint, dict[str, Any]]:
    spec = _check_keys(spec, ("model", *_CLIENT_FIELDS, *extra), source, where)
    if not isinstance(spec.get("model"), str) or not spec["model"]:
        raise ConfigError(source, f"{where}.model", "missing or not a string")
    client = {**defaults, **{k: v for k, v in spec.items() if k in _CLIENT_FIELDS}}
    return Endpoint(spec["model"], client), {k: spec[k] for k in extra if k in spec}


def _path(value: Any, base: str, source: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(source, key, "missing or not a path")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _pools(section: Any, defaults: Mapping[str, Any], base: str, source: str) -> dict[str, Pool]:
    if not isinstance(section, Mapping) or not _comments_out(section):
        raise ConfigError(source, "pools", "must be an object of named pools")
    pools = {}
    for name, spec in _comments_out(section).items():
        spec = _check_keys(spec, ("sources", "file"), source, f"pools.{name}")
        if ("sources" in spec) == ("file" in spec):
            raise ConfigError(source, f"pools.{name}", "give exactly one of 'sources' (endpoint models) or 'file' (a responses JSONL)")
        if "file" in spec:
            pools[name] = Pool(name, file=_path(spec["file"], base, source, f"pools.{name}.file"))
            continue
        if not isinstance(spec["sources"], list) or not spec["sources"]:
            raise ConfigError(source, f"pools.{name}.sources", "must be a non-empty list")
        sources = []
        for i, s in enumerate(spec["sources"]):
            ep, extra = _endpoint(s, defaults, source, f"pools.{name}.sources[{i}]", ("n",))
            n = extra.get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(source, f"pools.{name}.sources[{i}].n", f"must be a positive int, got {n!r}")
            sources.append((ep, n))
        models = [ep.model for ep, _ in sources]
        if len(set(models)) != len(models):
            raise ConfigError(source, f"pools.{name}.sources", f"a model is listed twice: {models}")
        pools[name] = Pool(name, tuple(sources))
    return pools


def _arms(section: Any, pools: Mapping[str, Pool], source: str) -> tuple[Arm, ...]:
    if not isinstance(section, list) or not section:
        raise ConfigError(source, "arms", "must be a non-empty list")
    arms = []
    for i, spec in enumerate(section):
        spec = _check_keys(spec, ("name", "pool", "pairs"), source, f"arms[{i}]")
        name = spec.get("name")
        if not isinstance(name, str) or not name or name == "base" or not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigError(source, f"arms[{i}].name", f"must be a file-name-safe string other than 'base', got {name!r}")
        pool, pairs = spec.get("pool"), spec.get("pairs", 0 if spec.get("pool") is None else 1)
        if pool is not None and pool not in pools:
            raise ConfigError(source, f"arms[{i}].pool", f"unknown pool {pool!r}; pools: {sorted(pools)}")
        if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 0 or (pool is None and pairs):
            raise ConfigError(source, f"arms[{i}].pairs", f"must be an int >= 0 (0 without a pool), got {pairs!r}")
        arms.append(Arm(name, pool, pairs))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(source, "arms", f"arm names must be unique: {names}")
    return tuple(arms)


def parse_config(raw: Mapping[str, Any], source: str = "<config>") -> ExperimentConfig:
    base = os.path.dirname(os.path.abspath(source)) if source != "<config>" else os.getcwd()
    cfg = _check_keys(raw, _TOP, source, "")
    for key in ("prompts", "proposer", "verifier", "judge", "pools", "arms", "grpo"):
        if key not in cfg:
            raise ConfigError(source, key, "missing")
    prompts = _check_keys(cfg["prompts"], ("train", "test", "n_train", "n_test"), source, "prompts")
    for key in ("n_train", "n_test"):
        if key in prompts and (not isinstance(prompts[key], int) or prompts[key] < 1):
            raise ConfigError(source, f"prompts.{key}", f"must be a positive int, got {prompts[key]!r}")
    defaults = _check_keys(cfg.get("endpoint", {}), _CLIENT_FIELDS, source, "endpoint")
    proposer, p_extra = _endpoint(cfg["proposer"], defaults, source, "proposer", ("temperature", "max_tokens"))
    verifier, v_extra = _endpoint(cfg["verifier"], defaults, source, "verifier", ("mode",))
    if v_extra.get("mode", "all") not in ("all", "per_criterion"):
        raise ConfigError(source, "verifier.mode", f"must be 'all' or 'per_criterion', got {v_extra['mode']!r}")
    judge, _ = _endpoint(cfg["judge"], defaults, source, "judge")
    sampling = _check_keys(cfg.get("sampling", {}), ("temperature", "top_p", "max_tokens"), source, "sampling")
    pools = _pools(cfg["pools"], defaults, base, source)
    rtd = _check_keys(cfg.get("rtd", {}), ("pool_size", "drop_used", "seed"), source, "rtd")
    pool_size = rtd.get("pool_size", 16)
    if not isinstance(pool_size, int) or pool_size < 2:
        raise ConfigError(source, "rtd.pool_size", f"must be an int >= 2, got {pool_size!r}")
    grpo = _check_keys(cfg["grpo"], ("model", "tiny_model", "rl", "sample", "optim", "loop", "epochs", "eval_sample"), source, "grpo")
    if "model" not in grpo:
        raise ConfigError(source, "grpo.model", "missing")
    if grpo["model"] not in ("smollm2", "tiny"):
        grpo = {**grpo, "model": _path(grpo["model"], base, source, "grpo.model")}
    evals = _check_keys(cfg.get("eval", {}), ("temperature", "top_p", "max_tokens", "batch_prompts", "both_orders", "bootstrap", "seed",
                                              "curve_every"), source, "eval")
    if not isinstance(evals.get("curve_every", 0), int) or evals.get("curve_every", 0) < 0:
        raise ConfigError(source, "eval.curve_every", f"must be an int >= 0, got {evals['curve_every']!r}")
    healthbench = cfg.get("healthbench")
    return ExperimentConfig(
        source=source, raw=json.loads(json.dumps(cfg)),
        train_prompts=_path(prompts.get("train"), base, source, "prompts.train"),
        test_prompts=_path(prompts.get("test"), base, source, "prompts.test"),
        n_train=prompts.get("n_train"), n_test=prompts.get("n_test"),
        proposer=proposer, proposer_temperature=float(p_extra.get("temperature", 0.0)), proposer_max_tokens=p_extra.get("max_tokens"),
        verifier=verifier, verifier_mode=v_extra.get("mode", "all"), judge=judge,
        sampling={"temperature": 1.0, "top_p": 0.95, "max_tokens": None, **sampling},
        pools=pools, pool_size=pool_size, drop_used=bool(rtd.get("drop_used", True)), rtd_seed=int(rtd.get("seed", 0)),
        arms=_arms(cfg["arms"], pools, source), grpo=grpo,
        eval={"temperature": 0.0, "top_p": 1.0, "max_tokens": 2048, "batch_prompts": 8, "both_orders": True, "bootstrap": 2000, "seed": 0,
              "curve_every": 0, **evals},
        healthbench=None if healthbench is None else _path(healthbench, base, source, "healthbench"),
    )


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    source = os.fspath(path)
    with open(source, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{err.lineno}: invalid JSON: {err.msg}") from None
    return parse_config(raw, source)

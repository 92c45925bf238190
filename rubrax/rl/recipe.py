"""GRPO run recipes: a JSON config -> model, tokenizer, prompts, reward -> `loop.train`.

A config file has these keys (every section optional except "model"):

    model       "tiny" | "smollm2" | an HF-format folder (config.json + safetensors +
                tokenizer files), e.g. a local copy of Qwen/Qwen3-8B-Base
    tiny_model  ModelConfig.tiny overrides (vocab and special ids come from the tokenizer)
    model_settings
                how the model runs: {"dtype": compute dtype, "param_dtype": master-weight
                dtype, "remat", "attention", "attention_block"} (ModelConfig fields; e.g.
                bf16 compute over float32 weights and Adam state on accelerators). Absent
                = ModelConfig's defaults (float32, "auto"; see rubrax.models.config)
    model_shape a named architecture (rubrax.models.config.SHAPES, e.g. "qwen3-8b") that
                `rubrax plan` uses when `model` is not a readable folder yet
    train       prompt records: JSONL path, or a `datasets` name with "dataset": true
                ("split"); omitted = the toy task's prompts (rubrax.rl.toy, "toy_prompts")
    eval        held-out prompt records (same forms); evaluated with "eval_sample"
    epochs      passes over the prompts; sets loop.total_steps = ceil(epochs * N / P)
    reward      {"name": NAME, "kwargs": {...}}; NAME is a registered reward ("rubric",
                "bradley_terry", "target_word"), "pkg.module:attr" or "path/to/file.py:attr"
                (relative to the config's folder, then the working directory): a RewardFn
                class, a factory, or a TRL-style fn(prompts, completions, **kw) -> list[float]
                (kwargs are bound to every call). For "rubric", kwargs.verifier is
                {"model": ..., ClientConfig fields, "mode": "all"}
    rewards     instead of "reward": [{"name", "weight" (1.0), "kwargs", "label"}, ...],
                combined by WeightedSum; the loop logs each component's
                reward/<label>/mean and reward/<label>/invalid per step (label: the
                registered name or the attribute, unless given)
    rl, sample, optim, loop, eval_sample
                fields of RLConfig, SampleConfig, OptimConfig, LoopConfig, SampleConfig
    gold        a gold monitor on the held-out prompts (rubrax.rl.monitor.GoldMonitor):
                {"reward": {"name", "kwargs"}, "sample": SampleConfig fields (default: the
                training sample with n=4), "patience", "min_delta", "keep_best",
                "forecast_samples": n > 0 writes the theory's forecast from n base samples
                per held-out prompt to OUT/forecast.jsonl before training (rubrax.forecast)}
Keys starting with "_" are comments. Unknown keys are errors naming the file and key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from rubrax.rewards import WeightedSum, make_reward, resolve_reward
from rubrax.rewards.registry import UnknownRewardError, reward_file
from rubrax.rl.loop import LoopConfig
from rubrax.rl.step import RLConfig
from rubrax.rl.toy import TOY_WORDS, toy_prompts, toy_tokenizer  # also registers the reward "target_word"

class RecipeError(ValueError):
    """A config that names something unusable (found while building it); the message says where."""


MODEL_SETTINGS = ("dtype", "param_dtype", "remat", "attention", "attention_block")
_TOP_KEYS = ("model", "tiny_model", "model_settings", "model_shape", "train", "dataset", "split", "eval", "toy_prompts", "epochs",
             "reward", "rewards", "rl", "sample", "optim", "loop", "eval_sample", "gold")


def parse_model_settings(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A config's checked "model_settings" (and "model_shape"): errors name the file and key."""
    settings = config.get("model_settings", {})
    if not isinstance(settings, Mapping):
        raise ValueError(f"{source}: model_settings: must be an object, got {settings!r}")
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    unknown = sorted(set(settings) - set(MODEL_SETTINGS))
    if unknown:
        raise ValueError(f"{source}: model_settings: unknown key(s) {unknown}; expected some of {list(MODEL_SETTINGS)}")
    from rubrax.models.config import SHAPES, ModelConfig

    try:
        ModelConfig.tiny(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: model_settings: {err}") from None
    if config.get("model_shape") is not None and config["model_shape"] not in SHAPES:
        raise ValueError(f"{source}: model_shape={config['model_shape']!r} is not one of {sorted(SHAPES)}")
    return settings


def _build(cls, section: Mapping[str, Any], where: str, **defaults):
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: must be an object of {cls.__name__} fields, got {section!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in section.items() if not k.startswith("_")}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(fields)}")
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    try:
        return cls(**{**defaults, **values})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPORecipe:
    """A parsed, validated config file (see module docstring)."""

    model: str
    rl: RLConfig
    sample: Any
    optim: Any
    loop: Mapping[str, Any]
    tiny_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_shape: str | None = None
    train: str | None = None
    dataset: bool = False
    split: str = "train"
    eval: str | None = None
    toy_prompts: int = 64
    epochs: float | None = None
    # the "reward" section (a mapping) or the "rewards" list (a tuple of component mappings)
    reward: Mapping[str, Any] | tuple[Mapping[str, Any], ...] = dataclasses.field(default_factory=lambda: {"name": "target_word"})
    eval_sample: Any = None
    gold: Mapping[str, Any] | None = None  # {"reward", "sample", "monitor"} (parsed)
    source: str = "<config>"

    def loop_config(self, num_prompts: int, **overrides: Any) -> LoopConfig:
        """LoopConfig with total_steps from `epochs` when the file does not give it."""
        values = {**self.loop, **{k: v for k, v in overrides.items() if v is not None}}
        if "total_steps" not in values:
            if self.epochs is None:
                raise ValueError(f"{self.source}: give loop.total_steps or epochs")
            values["total_steps"] = max(1, math.ceil(self.epochs * num_prompts / values["prompts_per_step"]))
        return _build(LoopConfig, values, f"{self.source}: loop")


def parse_recipe(config: Mapping[str, Any], source: str = "<config>") -> GRPORecipe:
    from rubrax.policy import SampleConfig
    from rubrax.train.optim import OptimConfig

    unknown = sorted(k for k in config if k not in _TOP_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {list(_TOP_KEYS)}")
    if "model" not in config:
        raise ValueError(f"{source}: missing key 'model'")
    rl = _build(RLConfig, config.get("rl", {}), f"{source}: rl")
    for key in ("tiny_model", "loop"):
        if not isinstance(config.get(key, {}), Mapping):
            raise ValueError(f"{source}: {key} must be an object, got {config[key]!r}")
    if "tiny_model" in config:
        _check_tiny_model(config["tiny_model"], source)
    sample = _build(SampleConfig, config.get("sample", {}), f"{source}: sample", n=rl.group_size, max_new_tokens=64)
    if sample.n != rl.group_size:
        raise ValueError(f"{source}: sample.n={sample.n} must equal rl.group_size={rl.group_size}")
    optim = _build(OptimConfig, config.get("optim", {}), f"{source}: optim")
    loop = {k: v for k, v in config.get("loop", {}).items() if not k.startswith("_")}
    # validate now; total_steps and out_dir are fixed at run time
    checked = _build(LoopConfig, {"total_steps": 1, "out_dir": "<out>", **loop}, f"{source}: loop")
    if "epochs" not in config and "total_steps" not in loop:
        raise ValueError(f"{source}: give loop.total_steps or epochs")
    rl.check_batch(checked.prompts_per_step * rl.group_size, f"{source}: rl")  # before anything is sampled
    eval_sample = None
    if "eval_sample" in config:
        eval_sample = _build(SampleConfig, config["eval_sample"], f"{source}: eval_sample", max_new_tokens=sample.max_new_tokens)
    reward = parse_reward_section(config, source)
    settings = parse_model_settings(config, source)
    top = {k: config[k] for k in ("model_shape", "tiny_model", "train", "dataset", "split", "eval", "toy_prompts", "epochs") if k in config}
    gold = _parse_gold(config["gold"], sample, source) if "gold" in config else None
    return GRPORecipe(model=config["model"], model_settings=settings, rl=rl, sample=sample, optim=optim, loop=loop, reward=reward,
                      eval_sample=eval_sample, gold=gold, source=source, **top)


def _parse_gold(section: Mapping[str, Any], sample: Any, source: str) -> dict[str, Any]:
    from rubrax.policy import SampleConfig
    from rubrax.rl.monitor import GoldMonitorConfig

    section = {k: v for k, v in section.items() if not k.startswith("_")}
    reward = _reward_spec(section.pop("reward", None), source, "gold.reward", component=False)
    gold_sample = _build(SampleConfig, section.pop("sample", {}), f"{source}: gold.sample", **{**dataclasses.asdict(sample), "n": 4})
    forecast_samples = section.pop("forecast_samples", 0)
    if isinstance(forecast_samples, bool) or not isinstance(forecast_samples, int) or forecast_samples < 0:
        raise ValueError(f"{source}: gold.forecast_samples must be an int >= 0, got {forecast_samples!r}")
    monitor = _build(GoldMonitorConfig, section, f"{source}: gold")
    return {"reward": reward, "sample": gold_sample, "monitor": monitor, "forecast_samples": forecast_samples}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file's JSON object; errors name the file and line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte {err.start + 1}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a recipe is a JSON object, got {type(config).__name__}")
    return config


def load_recipe(path: str | os.PathLike) -> GRPORecipe:
    return parse_recipe(read_config(path), os.fspath(path))


def _check_tiny_model(overrides: Mapping[str, Any], source: str) -> None:
    from rubrax.models import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(k for k in overrides if k not in fields and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: tiny_model: unknown ModelConfig field(s) {unknown}")


# --------------------------------------------------------------------------- building


def _tiny_config(recipe: GRPORecipe):
    from rubrax.models import ModelConfig
    from rubrax.rl.toy import toy_tokenizer

    tok = toy_tokenizer() if recipe.train is None else _words_tokenizer(recipe)
    config = ModelConfig.tiny(**{**{k: v for k, v in recipe.tiny_model.items() if not k.startswith("_")}, "vocab_size": tok.vocab_size, "pad_token_id": tok.pad_token_id,
                                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                 **recipe.model_settings})
    return config, tok


def recipe_model_config(recipe: GRPORecipe):
    """The run's ModelConfig (model_settings applied) without reading any weights: from
    the folder's config.json, the bundled SmolLM2 metadata, or `model_shape`."""
    if recipe.model == "tiny":
        return _tiny_config(recipe)[0]
    return model_config_without_weights(recipe.model, recipe.model_settings, model_shape=recipe.model_shape,
                                        source=recipe.source)


def model_config_without_weights(model: str, model_settings: Mapping[str, Any], *, model_shape: str | None = None,
                                 source: str = "<config>"):
    """The ModelConfig of `model` ("smollm2" or an HF folder; else `model_shape`) with
    model_settings applied, read from metadata only (no weights): what `rubrax plan` and
    the training CLIs' fit check compile. Shared by RL recipes and supervised plans."""
    import json as json_lib
    from pathlib import Path

    from rubrax.models import checkpoint
    from rubrax.models.config import shape_config

    settings = dict(model_settings)
    dtypes = {k: settings.pop(k) for k in ("dtype", "param_dtype") if k in settings}
    if model == "smollm2":
        return shape_config("smollm2-135m", **dtypes, **settings)
    config_file = Path(model) / "config.json"
    if config_file.exists():
        config = checkpoint.config_from_hf(json_lib.loads(config_file.read_text()), source=str(config_file), **dtypes)
        return config.replace(**settings)
    if model_shape is not None:
        return shape_config(model_shape, **dtypes, **settings)
    raise ValueError(f"{source}: model={model!r} has no config.json; give model_shape "
                     f"(e.g. \"qwen3-8b\") to plan without the checkpoint")


def load_model(recipe: GRPORecipe, seed: int, shardings=None):
    """(params, model_config, tokenizer) for recipe.model, model_settings applied; a
    checkpoint's weights are read straight into `shardings` (see load_pretrained)."""
    import jax

    if recipe.model == "tiny":
        from rubrax.models import init_params

        config, tok = _tiny_config(recipe)
        return init_params(config, jax.random.PRNGKey(seed)), config, tok
    from rubrax import models

    path = models.smollm2_checkpoint() if recipe.model == "smollm2" else recipe.model
    settings = dict(recipe.model_settings)
    dtypes = {k: settings.pop(k) for k in ("dtype", "param_dtype") if k in settings}
    params, config = models.load_pretrained(path, shardings=shardings, **dtypes)
    return params, config.replace(**settings), models.load_tokenizer(path)


def _words_tokenizer(recipe: GRPORecipe):
    from rubrax.data.records import iter_source
    from rubrax.models.tokenizer import WordTokenizer

    words = {w for _, _, rec in iter_source(_records(recipe.train, recipe)) for w in str(rec.get("prompt", "")).split()}
    return WordTokenizer(sorted(words | set(TOY_WORDS)))


def _records(name: str, recipe: GRPORecipe, split: str | None = None):
    if not recipe.dataset:
        return name
    import datasets

    return datasets.load_dataset(name, split=split or recipe.split)


def _base_dir(source: str) -> str | None:
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None


def _reward_spec(item: Any, source: str, key: str, *, component: bool) -> dict[str, Any]:
    """One validated reward spec {"name", "kwargs"} (+ "weight", "label" for a component)."""
    allowed = ("name", "kwargs", "weight", "label") if component else ("name", "kwargs")
    if not isinstance(item, Mapping):
        raise ValueError(f"{source}: key {key!r}: must be an object {{\"name\": ..., \"kwargs\": {{...}}}}, got {item!r}")
    values = {k: v for k, v in item.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: key {key!r}: unknown field(s) {unknown}; expected some of {list(allowed)}")
    name, kwargs = values.get("name"), values.get("kwargs", {})
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{source}: key '{key}.name': must be a reward name, got {name!r}")
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: key '{key}.kwargs': must be an object, got {kwargs!r}")
    try:
        resolve_reward(name, base_dir=_base_dir(source))  # a wrong name fails now, before any model is loaded
        where, _, attr = name.rpartition(":")
        if where.endswith(".py"):  # kept absolute, so the spec builds the same reward from any folder
            name = f"{reward_file(where, _base_dir(source))}:{attr}"
    except UnknownRewardError as err:
        raise ValueError(f"{source}: key '{key}.name': {err}") from None
    spec = {"name": name, "kwargs": dict(kwargs)}
    if component:
        weight, label = values.get("weight", 1.0), values.get("label", name.rpartition(":")[2].rpartition(".")[2])
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{source}: key '{key}.weight': must be a finite number, got {weight!r}")
        if not isinstance(label, str) or not label or "/" in label or any(ch.isspace() for ch in label):
            raise ValueError(f"{source}: key '{key}.label': must be a name without '/' or spaces, got {label!r}")
        spec.update(weight=float(weight), label=label)
    return spec


def parse_reward_section(config: Mapping[str, Any], source: str) -> Mapping[str, Any] | tuple[Mapping[str, Any], ...]:
    """The validated "reward" section, or the "rewards" list as a tuple of components."""
    if "rewards" not in config:
        return _reward_spec(config.get("reward", {"name": "target_word"}), source, "reward", component=False)
    if "reward" in config:
        raise ValueError(f"{source}: give 'reward' (one) or 'rewards' (a weighted list), not both")
    items = config["rewards"]
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: key 'rewards': must be a non-empty list of {{\"name\", \"weight\", \"kwargs\"}}, got {items!r}")
    specs = tuple(_reward_spec(item, source, f"rewards[{i}]", component=True) for i, item in enumerate(items))
    labels = [s["label"] for s in specs]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ValueError(f"{source}: key 'rewards[{i}].label': {label!r} is also rewards[{labels.index(label)}]'s; give each a distinct label")
    return specs


def build_reward(spec: Mapping[str, Any] | tuple[Mapping[str, Any], ...], *, source: str = "<config>"):
    """The reward function of a config's "reward" section, or the WeightedSum of its
    "rewards" list (`parse_reward_section`'s output)."""
    if isinstance(spec, Mapping):
        return _build_one(spec, source, "reward")
    parts = {s["label"]: _build_one(s, source, f"rewards[{i}]") for i, s in enumerate(spec)}
    return WeightedSum(parts, [s["weight"] for s in spec])


def _build_one(spec: Mapping[str, Any], source: str, key: str):
    kwargs = dict(spec.get("kwargs", {}))
    if spec["name"] == "rubric" and isinstance(kwargs.get("verifier"), Mapping):
        from rubrax.elicit.client import ChatClient, ClientConfig
        from rubrax.elicit.llm import LLMVerifier

        v = dict(kwargs["verifier"])
        mode = v.pop("mode", "all")
        kwargs["verifier"] = LLMVerifier(ChatClient(ClientConfig(**v)), mode=mode)
    factory = resolve_reward(spec["name"], base_dir=_base_dir(source))
    try:
        return make_reward(factory, kwargs, name=spec.get("label", spec["name"]))
    except TypeError as err:  # wrong kwargs for the factory
        raise ValueError(f"{source}: key '{key}.kwargs': reward {spec['name']!r}: {err}") from None


def reward_clients(fn: Any) -> list[Any]:
    """The endpoint clients a reward function holds (an LLM verifier's; components of a
    weighted sum), for the end-of-run summary of calls, cache hits, tokens and cost."""
    client = getattr(getattr(fn, "verifier", None), "client", None)
    found = [client] if client is not None and hasattr(client, "stats") else []
    for inner in list(getattr(fn, "fns", ())) + [getattr(fn, "inner", None)]:
        if inner is not None:
            found += [c for c in reward_clients(inner) if all(c is not f for f in found)]
    return found


def run_recipe(recipe: GRPORecipe, *, out_dir: str | None, reward_fn: Any = None, make_hooks: Any = None, **loop_overrides: Any):
    """Loads everything the recipe names and trains; returns loop.TrainResult.

    `reward_fn`: the reward already built from recipe.reward (a caller that reads its
    endpoint counters afterwards); default: built here. The loop closes it at the end.
    `make_hooks(tokenizer, model_config) -> [EvalHook]`: more eval hooks (they need the
    tokenizer and model this function loads)."""
    from rubrax.rl.hooks import reward_eval_hook
    from rubrax.rl.loop import loop_mesh, train
    from rubrax.rl.prompts import load_prompts
    from rubrax.sharding import param_sharding

    seed = int(recipe.loop.get("seed", 0))
    # The mesh only needs the device settings, known before the prompt count: the weights
    # load straight into the run's (FSDP) shardings, and train() frees nothing it needs.
    mesh_loop = recipe.loop_config(1, out_dir=out_dir, **loop_overrides)
    mesh = loop_mesh(mesh_loop)
    params, model_config, tok = load_model(
        recipe, seed, shardings=lambda abstract: param_sharding(abstract, mesh, fsdp=mesh_loop.fsdp))
    records = toy_prompts(recipe.toy_prompts, seed=seed) if recipe.train is None else _records(recipe.train, recipe)
    max_prompt = int(recipe.loop.get("max_prompt_tokens", LoopConfig.max_prompt_tokens))
    chat = bool(recipe.loop.get("chat_template", True))
    prompts = load_prompts(records, tok, max_prompt_tokens=max_prompt, chat_template=chat)
    loop = recipe.loop_config(len(prompts), out_dir=out_dir, **loop_overrides)
    reward_fn = build_reward(recipe.reward, source=recipe.source) if reward_fn is None else reward_fn
    hooks = []
    if recipe.eval is not None or recipe.train is None:
        held = toy_prompts(16, seed=seed + 1) if recipe.eval is None else _records(recipe.eval, recipe, "test")
        eval_sample = recipe.eval_sample or dataclasses.replace(recipe.sample, n=1, temperature=0.0)
        hooks.append(reward_eval_hook(load_prompts(held, tok, max_prompt_tokens=max_prompt, chat_template=chat), reward_fn, tok,
                                      model_config, eval_sample, max_prompt_tokens=max_prompt, timeout_s=loop.reward_timeout_s))
    if recipe.gold is not None:
        from rubrax.rl.monitor import GoldMonitor

        held = toy_prompts(16, seed=seed + 1) if recipe.eval is None else _records(recipe.eval, recipe, "test")
        held = load_prompts(held, tok, max_prompt_tokens=max_prompt, chat_template=chat)
        gold_fn = build_reward(recipe.gold["reward"], source=recipe.source)
        if recipe.gold["forecast_samples"] and out_dir and not os.path.exists(os.path.join(out_dir, "forecast.jsonl")):
            _write_forecast(recipe, held, gold_fn, reward_fn, params, model_config, tok, max_prompt, out_dir)
        hooks.append(GoldMonitor(held, gold_fn, reward_fn, tok, model_config, recipe.gold["sample"], max_prompt_tokens=max_prompt,
                                 ref_params=params, out_dir=out_dir, config=recipe.gold["monitor"]))
    if make_hooks is not None:
        hooks += list(make_hooks(tok, model_config))
    run_config = {"source": recipe.source, "model": recipe.model, "rl": dataclasses.asdict(recipe.rl),
                  "optim": dataclasses.asdict(recipe.optim),
                  "reward": recipe.reward["name"] if isinstance(recipe.reward, Mapping)  # names only: kwargs may hold secrets
                  else [{k: r[k] for k in ("name", "weight", "label")} for r in recipe.reward]}
    return train(params=params, model_config=model_config, tokenizer=tok, reward_fn=reward_fn, prompts=prompts, rl=recipe.rl,
                 sample=recipe.sample, optim=recipe.optim, loop=loop, eval_hooks=hooks, run_config=run_config, mesh=mesh,
                 donate_params=recipe.gold is None)  # the gold monitor keeps the base params as its reference


def _write_forecast(recipe: GRPORecipe, held: Any, gold_fn: Any, reward_fn: Any, params: Any, model_config: Any, tok: Any,
                    max_prompt: int, out_dir: str) -> None:
    """The theory's forecast from base samples of the held-out prompts (before training)."""
    from rubrax import forecast

    cfg = dataclasses.replace(recipe.gold["sample"], n=recipe.gold["forecast_samples"])
    samples = forecast.sample_base(params, held, tok, model_config, cfg, max_prompt_tokens=max_prompt)
    rows = forecast.forecast(gold_fn, reward_fn, held.texts, samples, columns=held.columns, label=recipe.reward.get("name", "proxy"))
    os.makedirs(out_dir, exist_ok=True)
    forecast.write_forecast(out_dir, rows)

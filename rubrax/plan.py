"""Will it fit? Per-device memory and FLOPs of a recipe's device programs, without weights.

    rubrax plan experiments/configs/grpo_paper.json --devices 8 [--device-memory 80]

    from rubrax import plan
    p = plan.plan_recipe("experiments/configs/grpo_paper.json", devices=8)
    print(p.table()); p.fits

The RL update and the rollout sampler are compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct` with the run's shardings: no weights are read, no device memory
is allocated) with exactly the functions, settings and shardings the run uses
(`rubrax.rl.step.make_update`, `rubrax.sharding.state_sharding`, `rubrax.policy`'s
sampler), then XLA's own accounting is read: `compiled.memory_analysis()` for memory and
`compiled.cost_analysis()` for FLOPs (which counts a loop body once, so the table shows
`model_flops`, the analytic count, and the JSON both). Per device:

    params / optimizer / reference   this device's shards of the state (exact); for the
                                     sampler, the state that stays on the device meanwhile
    gathered                         the sampler's replicated compute-dtype copy of the
                                     weights (`policy.decode_params`, one per sample() call)
    kv cache                         the sampler's [L, R, K, S, Dh] cache shard (exact; it is
                                     created inside the program, so part of temporaries)
    batch + outputs                  arguments and outputs besides the above, minus donation
    temporaries                      XLA's temp buffers: activations, gradients, gathers
    peak                             arguments + outputs - aliased (donated) + temporaries
                                     (+ for the sampler the resident state)

`devices=N` plans for N devices: on the real ones when there are that many, else on N
fake CPU devices (in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N
when this process's jax already has fewer). On CPU, XLA computes bf16 matmuls in float32
and would hoist that conversion out of loops (a float32 copy of every layer's saved input
at once); accelerators do not, so CPU plans are compiled with
while-loop-invariant-code-motion disabled, a closer proxy for GPU/TPU temporaries. Fused
attention kernels that cannot compile on CPU (cuDNN, TPU flash) are planned with the
blockwise kernel, which holds the same O(T) memory; the table says so.

"auto" settings are resolved for the *target* platform (`--platform`, default: the
devices' own, or "gpu" when planning on fake CPU devices), so a plan made on a laptop
describes the accelerator run. Rows per device = prompts_per_step x group_size /
(devices x num_minibatches x grad_accum), the micro-batch the backward pass sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

GB = 1e9
DEFAULT_DEVICE_MEMORY_GB = 80.0  # an H100 / A100-80GB, when the devices cannot say
_CPU_COMPILE_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
KNOBS = ("rows per device (loop.prompts_per_step, rl.grad_accum, rl.num_minibatches)",
         "rematerialisation (model_settings.remat: 'full' keeps least)",
         "dtype (model_settings.dtype 'bfloat16', param_dtype)",
         "devices (more devices, loop.fsdp true)")


def model_flops(config, *, tokens: int, T: int, backward: bool) -> float:
    """Model FLOPs of `tokens` tokens in sequences of T (the MFU convention: 2 per
    multiply-add of every weight matmul, plus causal attention's QK and PV at mean context
    T / 2; x3 with the backward pass; recomputation not counted)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    attn = c.num_hidden_layers * 2 * q * T  # 2 matmuls x 2 flops x T/2 mean context
    return (3.0 if backward else 1.0) * tokens * (2.0 * matmul + attn)


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One compiled program's per-device bytes (see module docstring) and its cost."""

    name: str
    params: int
    optimizer: int
    reference: int
    kv_cache: int
    other_io: int
    temporaries: int
    peak: int
    flops: float  # XLA's cost_analysis, per device: loop bodies (layer scan) counted once
    model_flops: float  # per device, `model_flops`
    tokens: int
    compile_s: float
    gathered: int = 0  # the sampler's replicated compute-dtype copy of the weights (decode_params)


@dataclasses.dataclass(frozen=True)
class Plan:
    source: str
    devices: int
    platform: str
    target: str
    device_memory: float  # bytes per device
    settings: dict
    programs: tuple[ProgramPlan, ...]

    @property
    def fits(self) -> bool:
        return all(p.peak <= self.device_memory for p in self.programs)

    def table(self) -> str:
        cols = ("params", "optimizer", "reference", "gathered", "kv_cache", "other_io", "temporaries", "peak")
        head = f"{'program':<10}" + "".join(f"{c:>13}" for c in cols) + f"{'fits':>6}{'model TFLOP':>13}{'tokens':>9}"
        rows = [head]
        for p in self.programs:
            cells = "".join(f"{_size(getattr(p, c)):>13}" for c in cols)
            rows.append(f"{p.name:<10}{cells}{'yes' if p.peak <= self.device_memory else 'NO':>6}"
                        f"{p.model_flops / 1e12:>13.2f}{p.tokens:>9}")
        settings = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return (f"{self.source}: {self.devices} {self.platform} devices planned for {self.target}, "
                f"{self.device_memory / GB:.0f} GB each; per device:\n" + "\n".join(rows) + f"\nsettings: {settings}")

    def refusal(self) -> str | None:
        """None when every program fits, else a message naming the knobs to turn."""
        over = [p for p in self.programs if p.peak > self.device_memory]
        if not over:
            return None
        what = ", ".join(f"the {p.name} needs {p.peak / GB:.1f} GB" for p in over)
        return (f"{self.source}: will not fit: {what} per device, more than the {self.device_memory / GB:.1f} GB "
                f"of each of {self.devices} devices (settings: "
                + ", ".join(f"{k}={v}" for k, v in self.settings.items())
                + "). Turn a knob: " + "; ".join(KNOBS) + ".")

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "programs": [dataclasses.asdict(p) for p in self.programs]})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["programs"] = tuple(ProgramPlan(**p) for p in d["programs"])
        return cls(**d)


# --------------------------------------------------------------------------- helpers


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _compile(lowered, platform: str):
    options = _CPU_COMPILE_OPTIONS if platform == "cpu" else None
    return lowered.compile(compiler_options=options)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _program(name: str, compiled, *, params=0, optimizer=0, reference=0, kv_cache=0, tokens=0, model_flops=0.0,
             compile_s=0.0):
    m = compiled.memory_analysis()
    args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    peak = args + out - alias + m.temp_size_in_bytes
    other = args + out - alias - params - optimizer - reference
    return ProgramPlan(name, params, optimizer, reference, kv_cache, other, m.temp_size_in_bytes, peak,
                       _flops(compiled), model_flops, tokens, compile_s)


def planned_config(config, *, target: str, platform: str, T: int):
    """The model config as planned: "auto" remat/attention resolved for the target
    platform; fused kernels that cannot compile on the planning platform replaced by the
    blockwise kernel (same O(T) memory). Returns (config to compile, settings to report)."""
    import jax.numpy as jnp

    from rubrax.models import attention, llama

    remat = llama.resolve_remat(config.remat, target)
    attn = attention.resolve_impl(config.attention, T=T, S=T, dtype=jnp.dtype(config.dtype),
                                  head_dim=config.head_dim, masked=False, platform=target)
    compiled_attn = attn
    if platform == "cpu" and attn in ("cudnn", "tpu_flash"):
        compiled_attn = "blockwise"
    shown = attn if compiled_attn == attn else f"{attn}(planned as {compiled_attn})"
    settings = {"dtype": config.dtype, "param_dtype": config.param_dtype, "remat": remat, "attention": shown}
    return config.replace(remat=remat, attention=compiled_attn), settings


# --------------------------------------------------------------------------- programs


def plan_update(config, rl, optim, *, rows: int, width: int, completion: int, mesh, fsdp: bool,
                total_steps: int, platform: str) -> ProgramPlan:
    """The RL update (`rubrax.rl.step.make_update`) for `rows` rollouts of width + completion
    tokens, compiled from abstract shapes on `mesh`."""
    import jax
    import jax.numpy as jnp

    from rubrax.models import init_params
    from rubrax.rl import step
    from rubrax.rl.batch import RolloutBatch
    from rubrax.rl.state import TrainState
    from rubrax.sharding import batch_sharding, param_sharding, state_sharding
    from rubrax.train.optim import make_optimizer

    tx = make_optimizer(optim, max(total_steps * rl.optimizer_steps_per_update, 1))
    logits_fn = step.model_logits_fn(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, seed=0), params)
    s_shard = state_sharding(state, mesh, fsdp=fsdp)
    r_shard = param_sharding(params, mesh, fsdp=fsdp)
    ref = None
    if rl.kl_coef > 0:
        dtype = step.reference_dtype(logits_fn)
        ref = _abstract(params if dtype is None else step.cast_floating(params, dtype), r_shard)
    T = width + completion
    rowwise = batch_sharding(mesh)
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rowwise)
    batch = RolloutBatch(tokens_BxT=spec((rows, T), jnp.int32), mask_BxT=spec((rows, T), jnp.int32),
                         loss_mask_BxT=spec((rows, T), jnp.int32), behaviour_logp_BxT=spec((rows, T), jnp.float32),
                         rewards_B=spec((rows,), jnp.float32), valid_B=spec((rows,), bool), prompt_width=width)
    fn = step.make_update(rl, logits_fn, tx, mesh=mesh, state_shardings=s_shard,
                          ref_shardings=r_shard if ref is not None else None)
    abstract_state = _abstract(state, s_shard)
    t0 = time.perf_counter()
    compiled = _compile(fn.lower(abstract_state, batch, ref), platform)
    return _program("update", compiled, params=_shard_bytes(abstract_state.params),
                    optimizer=_shard_bytes(abstract_state.opt_state), reference=_shard_bytes(ref) if ref else 0,
                    tokens=rows * T, compile_s=time.perf_counter() - t0,
                    model_flops=model_flops(config, tokens=rows * T, T=T, backward=True) / mesh.size)


def plan_sampler(config, sample, *, prompts: int, width: int, mesh, fsdp: bool, platform: str,
                 resident: tuple[int, int, int] = (0, 0, 0)) -> ProgramPlan:
    """The rollout sampler as `rubrax.policy.sample` runs it from the trainer's params: the
    one compute-dtype, replicated copy of the weights that `decode_params` makes per call
    (when the params are FSDP-sharded or stored in another dtype), then the jitted decoder
    (`_sample_rows`, stacked layers) on it, for `prompts` prompts x sample.n samples, rows
    padded to a multiple of the mesh as `sample` does. `resident`: per-device bytes of the
    training state that stays on the devices while the rollouts are drawn (params,
    optimizer state, reference params; the RL loop samples between updates), added to the
    peak and shown in their columns."""
    import jax
    import jax.numpy as jnp

    from rubrax import policy
    from rubrax.models import init_params
    from rubrax.sharding import batch_sharding, param_sharding

    from jax.sharding import NamedSharding, PartitionSpec

    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    placed = _abstract(params, param_sharding(params, mesh, fsdp=fsdp))
    cfg = dataclasses.replace(sample, layer_loop="scan")
    dt = jnp.dtype(config.dtype)
    cast = any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt for x in jax.tree.leaves(params))
    copied = cast or (fsdp and mesh.size > 1)
    vocab_split = policy._vocab_split(placed, config, mesh, cfg)
    if copied:  # decode_params' output: cast floats, replicated (vocab-sized leaves split, see SampleConfig)
        layout = policy.decode_layout(params, mesh) if vocab_split else \
            jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
        kind = lambda x: dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        dec = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, kind(x), sharding=s), params, layout)
    else:  # sampled from the trainer's params as they are
        dec = placed
    R = -(-prompts * sample.n // mesh.size) * mesh.size
    rowwise = batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((R, width), jnp.int32, sharding=rowwise)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    t0 = time.perf_counter()
    lowered = policy._sample_rows.lower(dec, tokens, tokens, key, cfg=cfg, config=config, mesh=mesh,
                                        vocab_parallel=vocab_split)
    compiled = _compile(lowered, platform)
    S = width + sample.max_new_tokens
    kv = 2 * config.num_hidden_layers * (R // mesh.size) * config.num_key_value_heads * S * config.head_dim \
        * jnp.dtype(config.dtype).itemsize
    m = compiled.memory_analysis()
    args = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    dec_bytes = _shard_bytes(dec)
    params_b, opt_b, ref_b = resident
    gathered = dec_bytes if copied else 0
    held = params_b if copied else max(params_b, dec_bytes)  # not copied: the args are the params
    return ProgramPlan("sampler", held, opt_b, ref_b, int(kv), args - dec_bytes, m.temp_size_in_bytes,
                       held + opt_b + ref_b + gathered + args - dec_bytes + m.temp_size_in_bytes,
                       _flops(compiled), model_flops(config, tokens=R * S, T=S, backward=False) / mesh.size,
                       R * sample.max_new_tokens, time.perf_counter() - t0, gathered=gathered)


def plan_supervised_step(task: str, config, cfg, bt_cfg, *, max_length: int, mesh, platform: str) -> ProgramPlan:
    """One supervised update (`rubrax.train.trainer.make_train_step` of SFT's `sft_loss` or
    BT's `pair_loss`) for cfg.batch_size sequences (pairs) of max_length tokens as
    cfg.grad_accum_steps micro-batches, compiled from abstract shapes on `mesh`."""
    import functools

    import jax
    import jax.numpy as jnp

    from rubrax.rewards import bradley_terry as bt
    from rubrax.sharding import batch_sharding, state_sharding
    from rubrax.train.optim import make_optimizer, make_schedule
    from rubrax.train.trainer import init_state, make_train_step

    total = max(cfg.max_steps or 1, 1)
    if task == "sft":
        from rubrax.models import init_params
        from rubrax.train.sft import sft_loss

        params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
        loss, mask = functools.partial(sft_loss, config=config), None
        row = (max_length,)
        names = ("tokens", "mask", "loss_mask")
    else:
        params = jax.eval_shape(lambda: bt.init_params(config, jax.random.PRNGKey(0)))
        loss = functools.partial(bt.pair_loss, config=config, bt=bt_cfg)
        mask = bt.trainable_mask(params, freeze_backbone=bt_cfg.freeze_backbone)
        row = (2, max_length)
        names = ("tokens", "mask")
    tx = make_optimizer(cfg.optim, total, mask)
    state = jax.eval_shape(functools.partial(init_state, tx=tx), params)
    sharded = mesh.size > 1
    s_shard = state_sharding(state, mesh, fsdp=cfg.fsdp) if sharded else None
    step = make_train_step(loss, tx, mask, make_schedule(cfg.optim, total), state_shardings=s_shard)
    A, M = cfg.grad_accum_steps, cfg.micro_batch_size
    rows = batch_sharding(mesh, axis=1) if sharded else None
    batch = {k: jax.ShapeDtypeStruct((A, M, *row), jnp.int32, sharding=rows) for k in names}
    abstract_state = _abstract(state, s_shard) if sharded else state
    t0 = time.perf_counter()
    compiled = _compile(step.lower(abstract_state, batch), platform)
    # the backbone's forward + backward (BT: both sequences of every pair, no LM head)
    flops = model_flops(config, tokens=cfg.batch_size * math.prod(row), T=max_length, backward=True)
    if task != "sft":
        flops -= 6.0 * cfg.batch_size * math.prod(row) * config.hidden_size * config.vocab_size
    return _program("train", compiled, params=_shard_bytes(getattr(abstract_state, "params")),
                    optimizer=_shard_bytes(abstract_state.opt_state), tokens=cfg.batch_size * math.prod(row),
                    compile_s=time.perf_counter() - t0, model_flops=flops / mesh.size)


# --------------------------------------------------------------------------- recipes


def _device_memory(devices, device_memory_gb: float | None) -> float:
    if device_memory_gb is not None:
        return float(device_memory_gb) * GB
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return DEFAULT_DEVICE_MEMORY_GB * GB


def _plan_devices(devices: int | None):
    """The devices to plan on, or None when this process cannot offer that many."""
    import jax

    if devices is None:
        return jax.devices()
    for pool in (jax.devices(), jax.devices("cpu")):
        if len(pool) >= devices:
            return pool[:devices]
    return None


def plan_recipe(config: str | os.PathLike | dict, *, devices: int | None = None,
                device_memory_gb: float | None = None, platform: str | None = None,
                source: str | None = None) -> Plan:
    """Plans a recipe (a config file path or its parsed dict): an RL recipe
    (rubrax.rl.recipe), or a supervised one ({"task": "sft" | "reward-model", ...}, see
    `parse_supervised`)."""
    from rubrax.rl.recipe import load_recipe, parse_recipe

    if isinstance(config, (str, os.PathLike)):
        source = source or os.fspath(config)
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    source = source or "<config>"
    pool = _plan_devices(devices)
    if pool is None:
        return _plan_in_subprocess(config, devices=devices, device_memory_gb=device_memory_gb,
                                   platform=platform, source=source)
    fake = devices is not None and pool[0].platform == "cpu"
    if isinstance(config, dict) and config.get("task") is not None:
        return _plan_supervised(parse_supervised(config, source), pool, device_memory_gb=device_memory_gb,
                                platform=platform, fake=fake)
    recipe = parse_recipe(config, source)
    return _plan_parsed(recipe, pool, device_memory_gb=device_memory_gb, platform=platform, fake=fake)


def _plan_parsed(recipe, pool, *, device_memory_gb, platform, fake: bool) -> Plan:
    from rubrax.rl.recipe import recipe_model_config
    from rubrax.sharding import make_mesh

    mesh = make_mesh(pool)
    here = pool[0].platform
    target = platform or ("gpu" if fake and here == "cpu" else here)
    loop = recipe.loop_config(num_prompts=1, total_steps=recipe.loop.get("total_steps", 1), out_dir="<plan>")
    width = loop.max_prompt_tokens
    completion = recipe.sample.max_new_tokens
    config, settings = planned_config(recipe_model_config(recipe), target=target, platform=here,
                                      T=width + completion)
    rows = loop.prompts_per_step * recipe.rl.group_size
    micro = recipe.rl.num_minibatches * recipe.rl.grad_accum
    per_device = rows / (mesh.size * micro)
    settings |= {"rows_per_device": int(per_device) if per_device == int(per_device) else per_device, "grad_accum": recipe.rl.grad_accum,
                 "fsdp": loop.fsdp, "T": width + completion}
    update = plan_update(config, recipe.rl, recipe.optim, rows=rows, width=width, completion=completion,
                         mesh=mesh, fsdp=loop.fsdp, total_steps=loop.total_steps, platform=here)
    sampler = plan_sampler(config, recipe.sample, prompts=loop.prompts_per_step, width=width, mesh=mesh,
                           fsdp=loop.fsdp, platform=here, resident=(update.params, update.optimizer, update.reference))
    return Plan(recipe.source, mesh.size, here, target, _device_memory(pool, device_memory_gb), settings,
                (update, sampler))


SUPERVISED_TASKS = ("sft", "reward-model")
_SUPERVISED_KEYS = ("task", "model", "model_shape", "model_settings", "preset", "train", "optim", "bt", "max_length")


@dataclasses.dataclass(frozen=True)
class SupervisedRecipe:
    """What `rubrax train sft|reward-model` runs, as far as memory goes."""

    task: str
    model: str
    model_shape: str | None
    model_settings: dict
    train: Any  # rubrax.train.trainer.TrainConfig
    bt: Any  # rubrax.rewards.bradley_terry.BTConfig
    max_length: int
    source: str


def parse_supervised(config: dict, source: str) -> SupervisedRecipe:
    """A supervised plan config: {"task": "sft" | "reward-model", "model": "smollm2" | an HF
    folder | "tiny", "model_shape" (when the folder is not there yet), "model_settings"
    (as in RL recipes), "preset": "paper" | "tiny" (rubrax.train.presets; default
    "paper"), "train": TrainConfig fields (batch_size, grad_accum_steps, fsdp,
    fsdp_axis_size, ...), "optim": OptimConfig fields, "bt": BTConfig fields,
    "max_length": tokens per sequence (default 512, as the CLI)}. `rubrax train` builds
    the same dict from its flags for its fit check. Errors name the file and key."""
    from rubrax.rewards.bradley_terry import BTConfig
    from rubrax.rl.recipe import _build, parse_model_settings
    from rubrax.train.optim import OptimConfig
    from rubrax.train.presets import PRESETS, preset
    from rubrax.train.trainer import TrainConfig
    from rubrax.validate import check_int

    unknown = sorted(k for k in config if k not in _SUPERVISED_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for a supervised plan; expected some of {list(_SUPERVISED_KEYS)}")
    task = config["task"]
    if task not in SUPERVISED_TASKS:
        raise ValueError(f"{source}: task={task!r} is not one of {list(SUPERVISED_TASKS)}")
    if "model" not in config:
        raise ValueError(f"{source}: model: missing (\"smollm2\", \"tiny\" or an HF folder; with model_shape)")
    name = config.get("preset", "paper")
    if name not in PRESETS[task]:
        raise ValueError(f"{source}: preset={name!r} is not one of {sorted(PRESETS[task])}")
    base = preset(task, name)
    optim = _build(OptimConfig, {**dataclasses.asdict(base.optim), **config.get("optim", {})}, f"{source}: optim")
    fields = {k: v for k, v in dataclasses.asdict(base).items() if k != "optim"}
    train = _build(TrainConfig, {**fields, **config.get("train", {}), "optim": optim}, f"{source}: train")
    bt = _build(BTConfig, config.get("bt", {}), f"{source}: bt")
    max_length = config.get("max_length", 512)
    try:
        check_int("max_length", max_length, low=2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    return SupervisedRecipe(task, config["model"], config.get("model_shape"), parse_model_settings(config, source),
                            train, bt, max_length, source)


def _plan_supervised(recipe: SupervisedRecipe, pool, *, device_memory_gb, platform, fake: bool) -> Plan:
    from rubrax.rl.recipe import model_config_without_weights
    from rubrax.sharding import make_mesh

    cfg = recipe.train
    here = pool[0].platform
    target = platform or ("gpu" if fake and here == "cpu" else here)
    spread = (cfg.fsdp or cfg.data_parallel) and len(pool) > 1  # else the trainer uses one device
    mesh = make_mesh(pool, fsdp_axis_size=cfg.fsdp_axis_size) if spread else make_mesh(pool[:1])
    if cfg.micro_batch_size % mesh.size:
        raise ValueError(f"{recipe.source}: micro-batch of {cfg.micro_batch_size} (train.batch_size / grad_accum_steps) "
                         f"does not divide over {mesh.size} devices")
    if recipe.model == "tiny":
        from rubrax.models import ModelConfig

        model = ModelConfig.tiny(**recipe.model_settings)
    else:
        model = model_config_without_weights(recipe.model, recipe.model_settings, model_shape=recipe.model_shape,
                                             source=recipe.source)
    config, settings = planned_config(model, target=target, platform=here, T=recipe.max_length)
    per_device = cfg.micro_batch_size // mesh.size
    rows_key = "rows_per_device" if recipe.task == "sft" else "pairs_per_device"  # a BT pair: 2 sequences
    settings |= {"task": recipe.task, rows_key: per_device, "grad_accum": cfg.grad_accum_steps,
                 "fsdp": cfg.fsdp, "T": recipe.max_length}
    step = plan_supervised_step(recipe.task, config, cfg, recipe.bt, max_length=recipe.max_length, mesh=mesh,
                                platform=here)
    return Plan(recipe.source, mesh.size, here, target, _device_memory(pool, device_memory_gb), settings, (step,))


def _plan_in_subprocess(config: dict, *, devices: int, device_memory_gb, platform, source) -> Plan:
    """The same plan in a fresh process with `devices` fake CPU devices (this process's
    jax was initialised with fewer)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "rubrax.plan", "-", "--devices", str(devices), "--json", "--source", source]
    if device_memory_gb is not None:
        cmd += ["--device-memory", str(device_memory_gb)]
    if platform is not None:
        cmd += ["--platform", platform]
    proc = subprocess.run(cmd, input=json.dumps(config), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"planning {source} on {devices} fake CPU devices failed:\n{proc.stderr[-4000:]}")
    return Plan.from_json(proc.stdout.strip().splitlines()[-1])


def check_fits(config: dict, *, source: str, device_memory_gb: float | None = None) -> Plan | None:
    """The training CLIs' check before any weights load: plans the recipe on this process's
    devices and raises SystemExit naming the knobs when it cannot fit. Skipped (None) on
    CPU unless device_memory_gb is given (host RAM is not a device budget)."""
    import jax

    if jax.default_backend() == "cpu" and device_memory_gb is None:
        return None
    plan = plan_recipe(config, device_memory_gb=device_memory_gb, source=source)
    message = plan.refusal()
    if message:
        raise SystemExit(message + "\n" + plan.table())
    return plan


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="RL recipe JSON (see rubrax.rl.recipe), a supervised one ({\"task\": \"sft\" | "
                                  "\"reward-model\", ...}: rubrax.plan.parse_supervised), or - for stdin")
    p.add_argument("--devices", type=int, default=None,
                   help="plan for N devices (fake CPU devices when this machine has fewer)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help=f"memory per device (default: the devices' own, else {DEFAULT_DEVICE_MEMORY_GB:g})")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="target platform for 'auto' settings (default: the devices', gpu for fake devices)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    p.add_argument("--source", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.config == "-":
        config = json.load(sys.stdin)
    else:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
    plan = plan_recipe(config, devices=args.devices, device_memory_gb=args.device_memory,
                       platform=args.platform, source=args.source or args.config)
    if args.json:
        print(plan.to_json())
        return 0
    print(plan.table())
    figures = " ".join(f"{p.name}_peak_gb={p.peak / GB:.2f}" for p in plan.programs)
    first = plan.programs[0]
    print(f"fits={'yes' if plan.fits else 'no'} {figures} {first.name}_model_tflop={first.model_flops / 1e12:.2f}")
    return 0 if plan.fits else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="per-device memory and FLOPs of a recipe, compiled ahead of time")
    add_arguments(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    _fake_devices_before_jax(args.devices)
    return run(args)


def _fake_devices_before_jax(devices: int | None) -> None:
    """`rubrax plan --devices N` on a machine without N accelerators: when jax is not yet
    imported, give this process N CPU devices (else plan_recipe uses a subprocess)."""
    if devices is None or "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="rubrax plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    ns = parser.parse_args()
    _fake_devices_before_jax(ns.devices)
    sys.exit(run(ns))

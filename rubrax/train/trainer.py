"""The supervised trainer shared by SFT and the Bradley-Terry reward model.

Functional core, imperative shell:
- device: `SupervisedState(params, opt_state, step)` and one pure step
  `step(state, batch) -> (state, metrics)`, jitted once per run with the state donated.
  A batch arrives as [A, M, ...] (A = gradient-accumulation micro-batches of M
  examples); gradients are averaged over the A micro-batches with `lax.scan`, then
  one AdamW update is applied. Frozen parameters (trainable mask False) get zero
  gradient, so XLA drops their backward pass.
- host: in-memory arrays -> shuffled batches (epoch e uses permutation
  rng(seed, e), so the data order is a function of the step and a resumed run sees
  the same batches), periodic held-out evaluation, orbax checkpoints, JSONL metrics
  fetched one step late (the device never waits for the host), a tqdm progress bar.

Exact resume: the checkpoint holds params, optimizer state and step; the data order is
derived from (seed, step); so "stop after k steps and resume" gives bit-identical
parameters to an uninterrupted run (tests/test_train.py checks this).

Task-specific code provides two pure functions:
    loss_fn(params, batch) -> (loss, metrics)       batch: dict of [M, ...] arrays
    eval_fn(params, batch) -> sums                  dict of summed values incl. "count";
                                                    batch has "example_weight" [M]
                                                    (0 for padding rows)
and the host reports eval metric k as sum_k / sum_count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rubrax import pytree, sharding
from rubrax.train import checkpoint
from rubrax.train.metrics import MetricsWriter
from rubrax.train.optim import OptimConfig, make_optimizer, make_schedule

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[Any, Batch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of one supervised run (the optimizer lives in `optim`).

    `batch_size` examples (pairs for BT) make one optimizer update; with
    `grad_accum_steps` A they are processed as A micro-batches of batch_size / A.
    Total updates S = min(num_epochs * floor(N / batch_size), max_steps); the schedule is
    laid out over S. `eval_every=0` evaluates at the end of each epoch (and at the end).
    `checkpoint_every=0` checkpoints at the end only (when a checkpoint folder is given).
    `data_parallel` shards each micro-batch over all devices (params replicated);
    `fsdp` does too and also shards params and optimizer state (FSDP, as the RL trainer:
    rubrax.sharding.param_sharding), `fsdp_axis_size` F making that the 2-D hybrid
    ("data", "fsdp") mesh with params split over F devices only.
    `eval_at_start` also evaluates the initial params (step 0) of a fresh run.
    """

    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch_size: int = 8
    grad_accum_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 2
    seed: int = 0
    progress: bool = True
    data_parallel: bool = False
    fsdp: bool = False
    fsdp_axis_size: int | None = None
    eval_at_start: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.optim, OptimConfig):
            raise TypeError(f"optim must be an OptimConfig, got {type(self.optim).__name__}")
        from rubrax.validate import check_int

        for name in ("batch_size", "grad_accum_steps", "num_epochs", "log_every"):
            check_int(f"TrainConfig.{name}", getattr(self, name), low=1)
        for name in ("max_steps", "eval_batch_size", "keep_checkpoints"):
            check_int(f"TrainConfig.{name}", getattr(self, name), low=1, optional=True)
        for name in ("eval_every", "checkpoint_every", "seed"):
            check_int(f"TrainConfig.{name}", getattr(self, name), low=0)
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum_steps={self.grad_accum_steps}"
            )
        check_int("TrainConfig.fsdp_axis_size", self.fsdp_axis_size, low=1, optional=True)
        if self.fsdp_axis_size is not None and not self.fsdp:
            raise ValueError(f"fsdp_axis_size={self.fsdp_axis_size!r} needs fsdp=True")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def steps_per_epoch(self, num_examples: int) -> int:
        return num_examples // self.batch_size

    def total_steps(self, num_examples: int) -> int:
        per_epoch = self.steps_per_epoch(num_examples)
        if per_epoch == 0:
            raise ValueError(f"{num_examples} training examples are fewer than batch_size={self.batch_size}")
        total = self.num_epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)


@pytree.dataclass
class SupervisedState:
    """The supervised trainer's state (RL has its own, rubrax.rl.state.TrainState, which
    also holds the run's root key)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates done


@dataclasses.dataclass(frozen=True)
class SupervisedResult:
    params: Any
    state: SupervisedState
    eval_history: tuple[dict[str, float], ...]  # one dict per evaluation, with "step"
    last_metrics: dict[str, float]  # train metrics of the last step


# --------------------------------------------------------------------------- device side


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    trainable_mask: Any | None = None,
    lr_schedule: optax.Schedule | None = None,
    state_shardings: SupervisedState | None = None,
) -> Callable[[SupervisedState, Batch], tuple[SupervisedState, dict[str, jax.Array]]]:
    """The pure update step, jitted with the state donated. Batch leaves are [A, M, ...].
    `state_shardings` pins the new state to the old one's shardings (FSDP: the params stay
    split, so XLA reduce-scatters the gradients instead of gathering the state).

    Metrics: the loss_fn metrics averaged over micro-batches, the gradient norm (after
    masking, before clipping) and, given `lr_schedule`, the learning rate of this update.
    """

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: SupervisedState, batch_AxM: Batch) -> tuple[SupervisedState, dict[str, jax.Array]]:
        def micro(grads_acc, batch_M):
            (loss, metrics), grads = grad_fn(state.params, batch_M)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return grads_acc, {"loss": loss, **metrics}

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, metrics_A = jax.lax.scan(micro, zeros, batch_AxM)
        num_micro = jax.tree.leaves(batch_AxM)[0].shape[0]
        grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grads, state.params)
        if trainable_mask is not None:
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable_mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics_A)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return SupervisedState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    mesh = state_shardings.step.mesh
    fsdp_mesh = sharding.sharded_mesh(state_shardings.params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step_on_mesh(state, batch_AxM):
        # The mesh in context lets the model pin its activations' rows to the mesh at every
        # layer boundary (rubrax.models.llama.constrain_batch), as in the RL update.
        # With FSDP params each weight is cast on its own shard before it is gathered
        # (rubrax.sharding.compute_copy).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.fsdp_params(fsdp_mesh):
            return step(state, batch_AxM)

    return jax.jit(step_on_mesh, donate_argnums=0, out_shardings=(state_shardings, replicated))


def init_state(params: Any, tx: optax.GradientTransformation) -> SupervisedState:
    return SupervisedState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def _fresh_state(params: Any, tx: optax.GradientTransformation) -> SupervisedState:
    # Copies, so the step can donate its state while the caller's params stay usable.
    return init_state(jax.tree.map(jnp.copy, params), tx)


# --------------------------------------------------------------------------- host side


def _num_examples(data: Mapping[str, np.ndarray]) -> int:
    if not data:
        raise ValueError("training data is empty (no arrays)")
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data arrays have different leading sizes: {sizes}")
    return next(iter(sizes.values()))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Example order of epoch `epoch`: a pure function of (seed, epoch), for exact resume.

    Cached (one permutation per epoch, not per step); the returned array is read-only.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def _train_batch(data: Mapping[str, np.ndarray], cfg: TrainConfig, step: int, n: int) -> dict[str, np.ndarray]:
    per_epoch = cfg.steps_per_epoch(n)
    epoch, i = divmod(step, per_epoch)
    idx = epoch_permutation(cfg.seed, epoch, n)[i * cfg.batch_size : (i + 1) * cfg.batch_size]
    a, m = cfg.grad_accum_steps, cfg.micro_batch_size
    return {k: np.asarray(v[idx]).reshape(a, m, *v.shape[1:]) for k, v in data.items()}


def _eval_batches(data: Mapping[str, np.ndarray], batch_size: int):
    """All examples in fixed-size batches; the last one is padded with weight-0 rows."""
    n = _num_examples(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weight = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        batch = {k: np.asarray(v[idx]) for k, v in data.items()}
        batch["example_weight"] = weight
        yield batch


class _Sharder:
    """Places the state and batches on the mesh of rubrax.sharding (data parallel, FSDP
    or hybrid, per TrainConfig), or does nothing (neither on, or one device)."""

    def __init__(self, cfg: TrainConfig):
        self.mesh, self.fsdp, self.state_shardings = None, cfg.fsdp, None
        if (cfg.data_parallel or cfg.fsdp) and jax.device_count() > 1:
            n = jax.device_count()
            if cfg.micro_batch_size % n:
                raise ValueError(f"micro batch size {cfg.micro_batch_size} is not divisible by {n} devices")
            self.mesh = sharding.make_mesh(fsdp_axis_size=cfg.fsdp_axis_size)

    def init_state(self, params: Any, tx: optax.GradientTransformation) -> SupervisedState:
        """The initial state, created directly with its shardings (jit out_shardings): the
        optimizer moments are born sharded, the shapes come from jax.eval_shape."""
        if self.mesh is None:
            return jax.jit(_fresh_state, static_argnums=1)(params, tx)
        abstract = jax.eval_shape(functools.partial(init_state, tx=tx), params)
        self.state_shardings = sharding.state_sharding(abstract, self.mesh, fsdp=self.fsdp)
        placed = sharding.put_global(params, self.state_shardings.params)
        create = jax.jit(functools.partial(_fresh_state, tx=tx), out_shardings=self.state_shardings)
        return create(placed)

    def batch(self, batch: dict[str, np.ndarray], axis: int) -> Any:
        if self.mesh is None:
            return batch
        return jax.device_put(batch, sharding.batch_sharding(self.mesh, axis=axis))


def evaluate(params: Any, eval_fn: EvalFn, data: Mapping[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """Runs `eval_fn` over all of `data` and returns {k: sum_k / sum_count} (plus "count").

    `eval_fn` is called as given: pass a jitted function (the trainer does) for speed.
    """
    totals: dict[str, float] = {}
    for batch in _eval_batches(data, batch_size):
        sums = jax.device_get(eval_fn(params, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if "count" not in totals:
        raise KeyError("eval_fn must return a 'count' entry (the denominator)")
    count = totals["count"]
    out = {k: (v / count if count else math.nan) for k, v in totals.items() if k != "count"}
    out["count"] = count
    return out


def train(
    loss_fn: LossFn,
    params: Any,
    train_data: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    *,
    eval_fn: EvalFn | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    trainable_mask: Any | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    stop_at: int | None = None,
    desc: str = "train",
    eval_hooks: Sequence[Callable[[int, Any], Mapping[str, float]]] = (),
) -> SupervisedResult:
    """Trains `params` on in-memory arrays; resumes from `ckpt_dir` when it has a checkpoint.

    `train_data` is a dict of arrays with a common leading size N (examples).
    `trainable_mask` is a PyTree of bools like `params` (None = train everything).
    `stop_at` stops after that many updates (a pre-emption): the schedule still spans
    the full run and a later call with the same `ckpt_dir` continues it exactly.
    `eval_hooks`: host callables (step, params) -> {name: scalar}, run at every evaluation
    (with or without eval_fn); their values join that evaluation's record (and are
    checkpointed with the eval history, so a resumed run keeps the earlier ones).
    """
    n = _num_examples(train_data)
    total = cfg.total_steps(n)
    stop = total if stop_at is None else min(stop_at, total)
    tx = make_optimizer(cfg.optim, total, trainable_mask)
    sharder = _Sharder(cfg)
    state, history = _restore(ckpt_dir, sharder.init_state(params, tx), cfg, total)
    start = int(state.step)
    step_fn = make_train_step(loss_fn, tx, trainable_mask, make_schedule(cfg.optim, total),
                              state_shardings=sharder.state_shardings)
    writer = _open_metrics(metrics_path, tensorboard_dir, start, total)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=desc, disable=not cfg.progress, dynamic_ncols=True)
    run = _RunLog(cfg, total, writer, bar, history, ckpt_dir, eval_fn, eval_data, eval_hooks)
    per_epoch = cfg.steps_per_epoch(n)
    t0 = time.perf_counter()
    try:
        if cfg.eval_at_start and start == 0 and stop > 0:
            run.evaluate(0, state.params)
        for s in range(start, stop):
            batch = sharder.batch(_train_batch(train_data, cfg, s, n), axis=1)
            state, metrics = step_fn(state, batch)
            run.flush()  # the previous step's metrics only now, so the device stays busy
            done = s + 1
            if done % cfg.log_every == 0 or done == stop:
                run.pending = (done, metrics)
            bar.update(1)
            if (cfg.eval_every and done % cfg.eval_every == 0) or (not cfg.eval_every and done % per_epoch == 0):
                run.evaluate(done, state.params)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                run.flush()  # the step's metrics belong before its checkpoint (exact resume)
                run.save(done, state)
        run.flush()
        if stop == total and start < total and (not history or history[-1]["step"] != total):
            run.evaluate(total, state.params)
        if start < stop:
            run.save(stop, state)
            if writer:
                writer.write(stop, {"time/steps_per_s": (stop - start) / (time.perf_counter() - t0)})
    finally:
        bar.close()
        if writer:
            writer.close()
    return SupervisedResult(params=state.params, state=state, eval_history=tuple(history), last_metrics=run.last)


def _restore(ckpt_dir, state: SupervisedState, cfg: TrainConfig, total: int) -> tuple[SupervisedState, list[dict[str, float]]]:
    """(state, eval history) of the latest checkpoint in ckpt_dir, or the fresh state."""
    if ckpt_dir is None or checkpoint.latest_step(ckpt_dir) is None:
        return state, []
    restored, extra = checkpoint.restore(ckpt_dir, _state_dict(state))
    _check_resumable(extra, cfg, total, ckpt_dir)
    return SupervisedState(**restored), list(extra.get("eval_history", []))


def _open_metrics(metrics_path, tensorboard_dir, start: int, total: int) -> MetricsWriter | None:
    """The metrics writer of a run starting at `start`, its files cut back to that step."""
    if not metrics_path:
        return None
    _resume_metrics(metrics_path, start, complete=start >= total)
    purge = start + 1 if tensorboard_dir and os.path.isdir(tensorboard_dir) else None
    return MetricsWriter(metrics_path, tensorboard_dir, purge_step=purge)


class _RunLog:
    """The host side of one supervised run: train metrics one step late, evaluations
    (eval_fn and eval hooks, kept in `history`) and checkpoints."""

    def __init__(self, cfg: TrainConfig, total: int, writer, bar, history: list, ckpt_dir, eval_fn, eval_data, eval_hooks):
        self.cfg, self.total, self.writer, self.bar, self.history = cfg, total, writer, bar, history
        self.ckpt_dir, self.eval_data, self.eval_hooks = ckpt_dir, eval_data, eval_hooks
        self.eval_jit = jax.jit(eval_fn) if eval_fn is not None else None
        self.eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
        self.last: dict[str, float] = {}
        self.pending: tuple[int, Any] | None = None

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        self.last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if self.writer:
            self.writer.write(step, {f"train/{k}": v for k, v in self.last.items()})
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", refresh=False)

    def evaluate(self, step: int, params: Any) -> None:
        has_data = self.eval_jit is not None and self.eval_data is not None
        if not has_data and not self.eval_hooks:
            return
        result = evaluate(params, self.eval_jit, self.eval_data, self.eval_bs) if has_data else {}
        for hook in self.eval_hooks:
            result.update({k: float(v) for k, v in hook(step, params).items()})
        self.history.append({"step": step, **result})
        if self.writer:
            self.writer.write(step, {f"eval/{k}": v for k, v in result.items()})

    def save(self, step: int, state: SupervisedState) -> None:
        if self.ckpt_dir is None or step in checkpoint.all_steps(self.ckpt_dir):
            return
        extra = {"step": step, "total_steps": self.total, "eval_history": self.history, "config": _config_dict(self.cfg)}
        checkpoint.save(self.ckpt_dir, step, _state_dict(state), extra, max_to_keep=self.cfg.keep_checkpoints)


def _resume_metrics(path: str | os.PathLike, start: int, *, complete: bool) -> None:
    """Cuts the metrics file back to what the checkpoint of step `start` covers (records of
    steps <= start; the timing-only record of an invocation stopped early goes too), so that
    a resumed run's file equals an uninterrupted run's line for line (time fields aside)."""
    from rubrax.runs import cut_jsonl

    cut_jsonl(path, lambda r: start > 0 and isinstance(r.get("step"), int) and r["step"] <= start
              and (complete or any(k != "step" and not k.startswith("time/") for k in r)))


# Settings that may change between a run and its resumption without changing the result.
_RESUME_FREE = ("progress", "log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "eval_at_start")


def _check_resumable(extra: Mapping[str, Any], cfg: TrainConfig, total: int, ckpt_dir: Any) -> None:
    """Refuses to continue a checkpoint under settings that would change the run."""
    saved = extra.get("config") or {}
    now = _config_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in _RESUME_FREE and saved.get(k) != now.get(k))
    if extra.get("total_steps") not in (None, total):
        diff.append(f"total_steps ({extra['total_steps']} saved, {total} now: different data size?)")
    if diff:
        raise ValueError(
            f"checkpoint in {ckpt_dir} was written with other training settings ({', '.join(diff)}); "
            "use another checkpoint folder or the same settings"
        )


def _state_dict(state: SupervisedState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

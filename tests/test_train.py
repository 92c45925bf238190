"""The shared supervised trainer: checkpoints, metrics, schedules, optimizer, step, resume.

A linear-regression toy keeps compile times small; the trainer is task-agnostic, so
what holds here holds for SFT and BT (tests/test_sft.py, tests/test_bradley_terry.py
run the real models through it).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.train import checkpoint
from rubrax.train.metrics import MetricsWriter, read_metrics
from rubrax.train.optim import OptimConfig, make_optimizer, make_schedule
from rubrax.train.trainer import TrainConfig, epoch_permutation, evaluate, make_train_step, init_state, train

W_TRUE = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def toy_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return {"x": x, "y": (x @ W_TRUE + 1.0).astype(np.float32)}


def toy_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2), {"abs_err": jnp.mean(jnp.abs(pred - batch["y"]))}


def toy_eval(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    w = batch["example_weight"]
    return {"mse": jnp.sum(w * (pred - batch["y"]) ** 2), "count": jnp.sum(w)}


def toy_params():
    return {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def toy_cfg(**kw):
    base = dict(
        optim=OptimConfig(learning_rate=0.05, warmup_ratio=0.1, weight_decay=0.01),
        batch_size=8,
        num_epochs=3,
        progress=False,
        log_every=2,
    )
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_roundtrip_latest_and_errors(tmp_path):
    state = {"p": {"a": jnp.arange(3.0), "b": jnp.ones((2, 2), jnp.bfloat16)}, "step": jnp.int32(5)}
    assert checkpoint.latest_step(tmp_path / "none") is None
    checkpoint.save(tmp_path, 3, state, {"pos": 7})
    changed = jax.tree.map(lambda x: x + 1, state)
    checkpoint.save(tmp_path, 10, changed, {"pos": 9, "name": "x"})
    assert checkpoint.latest_step(tmp_path) == 10 and checkpoint.all_steps(tmp_path) == [3, 10]
    out, extra = checkpoint.restore(tmp_path, state)
    assert extra == {"pos": 9, "name": "x"}
    np.testing.assert_array_equal(out["p"]["a"], [1.0, 2.0, 3.0])
    assert out["p"]["b"].dtype == jnp.bfloat16 and int(out["step"]) == 6
    out, extra = checkpoint.restore(tmp_path, state, step=3)
    np.testing.assert_array_equal(out["p"]["a"], [0.0, 1.0, 2.0])
    assert extra == {"pos": 7} and checkpoint.restore_extra(tmp_path) == {"pos": 9, "name": "x"}
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path, 3, state)
    with pytest.raises(FileNotFoundError, match="step 4"):
        checkpoint.restore(tmp_path, state, step=4)
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.save(tmp_path, 11, state, {"bad": np.zeros(2)})
    assert checkpoint.all_steps(tmp_path) == [3, 10]  # the failed save left nothing behind


def test_checkpoint_max_to_keep(tmp_path):
    for s in range(4):
        checkpoint.save(tmp_path, s, {"x": jnp.float32(s)}, max_to_keep=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]


def test_metrics_writer_jsonl_appends_and_tensorboard(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsWriter(path, tensorboard_dir=tmp_path / "tb") as w:
        w.write(1, {"loss": jnp.float32(1.5), "n": np.int32(3), "bad": float("nan"), "tag": "a", "ok": True})
    with MetricsWriter(path) as w:  # a resumed run appends
        w.write(2, {"loss": 0.5})
    assert read_metrics(path) == [
        {"step": 1, "loss": 1.5, "n": 3, "bad": None, "tag": "a", "ok": True},
        {"step": 2, "loss": 0.5},
    ]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    w = MetricsWriter(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="scalars"):
        w.write(0, {"v": np.zeros(3)})
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(0, {"v": 1.0})


# --------------------------------------------------------------------------- schedules / optimizer


def test_schedules_hand_computed():
    cos = make_schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_ratio=0.1), 100)
    assert float(cos(0)) == 0.0
    assert float(cos(5)) == pytest.approx(0.5)  # halfway through 10 warmup steps
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    const = make_schedule(OptimConfig(learning_rate=2.0, schedule="constant", warmup_steps=4), 100)
    assert [float(const(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    floor = make_schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_ratio=0.0, end_lr_ratio=0.1), 10)
    assert float(floor(0)) == pytest.approx(1.0) and float(floor(10)) == pytest.approx(0.1)
    lin = make_schedule(OptimConfig(learning_rate=1.0, schedule="linear", warmup_ratio=0.0), 4)
    assert [float(lin(s)) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize(
    "kw",
    [dict(schedule="step"), dict(learning_rate=0.0), dict(warmup_ratio=1.0), dict(max_grad_norm=0.0), dict(weight_decay=-1.0)],
)
def test_optim_config_validation(kw):
    with pytest.raises(ValueError):
        OptimConfig(**kw)


def test_train_config_validation():
    with pytest.raises(ValueError, match="multiple of grad_accum_steps"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        TrainConfig(batch_size=8).total_steps(5)
    assert TrainConfig(batch_size=8, num_epochs=3).total_steps(20) == 6
    assert TrainConfig(batch_size=8, num_epochs=3, max_steps=4).total_steps(20) == 4


def test_optimizer_first_step_clipping_and_freezing():
    """Adam's first update is -lr * sign(g) (bias-corrected m/sqrt(v) = g/|g|) whatever the
    clip, so the clip is checked where it shows: the first moment, m1 = (1 - b1) * clip(g).
    Frozen leaves do not move, hold no Adam moments and take no part in the clip's norm."""
    import optax

    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    grads = {"a": jnp.array([30.0, -40.0]), "b": jnp.array([5.0])}  # |g| = sqrt(2525); |g_a| = 50
    cfg = OptimConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0, eps=0.0)
    tx = make_optimizer(cfg, 10)
    upd, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["a"], [-0.1, 0.1], rtol=1e-5)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["a"], 0.1 * np.array([30.0, -40.0]) / np.sqrt(2525.0), rtol=1e-6)
    np.testing.assert_allclose(mu["b"], 0.1 * np.array([5.0]) / np.sqrt(2525.0), rtol=1e-6)
    # without clipping the moment is the raw gradient's
    loose = make_optimizer(dataclasses.replace(cfg, max_grad_norm=None), 10)
    np.testing.assert_allclose(optax.tree_utils.tree_get(loose.update(grads, loose.init(params), params)[1], "mu")["a"],
                               [3.0, -4.0], rtol=1e-6)
    tx = make_optimizer(cfg, 10, trainable_mask={"a": True, "b": False})
    state = tx.init(params)
    upd, new_state = tx.update(grads, state, params)
    np.testing.assert_allclose(upd["a"], [-0.1, 0.1], rtol=1e-5)
    np.testing.assert_array_equal(upd["b"], [0.0])
    mu = optax.tree_utils.tree_get(new_state, "mu")
    np.testing.assert_allclose(mu["a"], [0.06, -0.08], rtol=1e-6)  # clipped by |g_a| = 50 alone
    # mu and nu of "a" only, plus the step counters of Adam and of the schedule
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 + 2 + 1 + 1


def test_weight_decay_skips_vectors():
    params = {"mat": jnp.ones((2, 2)), "vec": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(OptimConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.0, weight_decay=0.5), 10)
    upd, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(upd["mat"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(upd["vec"], [0.0, 0.0])


# --------------------------------------------------------------------------- trainer


def test_step_compiles_once_and_accumulation_matches_full_batch():
    """Averaging 2 micro-batch gradients of a per-example-mean loss equals one full batch."""
    traces = []

    def loss(params, batch):
        traces.append(1)
        return toy_loss(params, batch)

    tx = make_optimizer(OptimConfig(learning_rate=0.05, schedule="constant", warmup_ratio=0.0), 10)
    data = toy_data(8)
    full = {k: v[None] for k, v in data.items()}  # [1, 8, ...]
    split = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in data.items()}  # [2, 4, ...]
    step = make_train_step(loss, tx)
    s1 = init_state(toy_params(), tx)
    for _ in range(3):
        s1, m1 = step(s1, full)
    assert len(traces) == 1  # traced once for three calls
    s2 = init_state(toy_params(), tx)
    step2 = make_train_step(loss, tx)
    for _ in range(3):
        s2, m2 = step2(s2, split)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s2.params)
    assert int(s2.step) == 3 and set(m2) == {"loss", "abs_err", "grad_norm"}


def test_train_learns_evaluates_and_logs(tmp_path):
    data, held = toy_data(64, 0), toy_data(32, 1)
    params = toy_params()
    cfg = toy_cfg(optim=OptimConfig(learning_rate=0.1, warmup_ratio=0.1), num_epochs=10)
    res = train(toy_loss, params, data, cfg, eval_fn=toy_eval, eval_data=held, metrics_path=tmp_path / "m.jsonl")
    # caller's params are not donated away
    np.testing.assert_array_equal(params["w"], np.zeros(4))
    steps = [h["step"] for h in res.eval_history]
    assert steps == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80]  # start + each epoch end
    assert res.eval_history[-1]["mse"] < 0.01 * res.eval_history[0]["mse"]
    assert res.eval_history[0]["count"] == 32
    np.testing.assert_allclose(res.params["w"], W_TRUE, atol=0.1)
    recs = read_metrics(tmp_path / "m.jsonl")
    train_steps = [r["step"] for r in recs if "train/loss" in r]
    assert train_steps == list(range(2, 81, 2))
    assert all(np.isfinite(r["train/grad_norm"]) for r in recs if "train/loss" in r)
    assert any("time/steps_per_s" in r for r in recs)
    # the logged lr is the one used by that update: update 2 (index 1) of 8 warmup steps
    assert recs[0]["step"] == 0 and "eval/mse" in recs[0]
    assert next(r for r in recs if r.get("step") == 2 and "train/lr" in r)["train/lr"] == pytest.approx(0.1 * 1 / 8)


def test_eval_pads_last_batch_with_zero_weight():
    data = toy_data(10)
    params = {"w": jnp.asarray(W_TRUE), "b": jnp.float32(0.0)}  # residual = -1 everywhere
    out = evaluate(params, toy_eval, data, batch_size=4)  # 4 + 4 + 2 (+2 padding rows)
    assert out["count"] == 10 and out["mse"] == pytest.approx(1.0)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_permutation(0, 1, 50), epoch_permutation(0, 1, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, epoch_permutation(0, 2, 50))
    assert sorted(a) == list(range(50))


def test_resume_after_k_steps_is_bit_exact(tmp_path):
    """Pre-empt after 7 updates (mid-epoch, mid-warmup), resume: identical params,
    optimizer state and eval history to an uninterrupted run; with accumulation and
    frozen parameters too."""
    data, held = toy_data(64), toy_data(16, 1)
    cfg = toy_cfg(grad_accum_steps=2, checkpoint_every=5)
    mask = {"w": True, "b": False}
    kw = dict(eval_fn=toy_eval, eval_data=held, trainable_mask=mask)
    full = train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "full", **kw)
    first = train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "ck", stop_at=7, **kw)
    assert int(first.state.step) == 7 and checkpoint.latest_step(tmp_path / "ck") == 7
    resumed = train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", **kw)
    assert int(resumed.state.step) == 24
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full.eval_history == resumed.eval_history
    assert float(resumed.params["b"]) == 0.0  # frozen
    assert min(r["step"] for r in read_metrics(tmp_path / "m.jsonl")) > 7  # resumed run logs only new steps
    # A finished run resumed again does nothing and returns the final state.
    again = train(toy_loss, toy_params(), data, cfg, ckpt_dir=tmp_path / "ck", **kw)
    np.testing.assert_array_equal(again.params["w"], full.params["w"])
    # Resuming under settings that change the run is refused; logging settings may change.
    with pytest.raises(ValueError, match="other training settings.*optim"):
        train(toy_loss, toy_params(), data, dataclasses.replace(cfg, optim=OptimConfig(learning_rate=0.1)), ckpt_dir=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match="total_steps"):
        train(toy_loss, toy_params(), toy_data(128), cfg, ckpt_dir=tmp_path / "ck", **kw)
    train(toy_loss, toy_params(), data, dataclasses.replace(cfg, log_every=5), ckpt_dir=tmp_path / "ck", **kw)


def _wide_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["x"][:, :8]) ** 2), {}


@pytest.mark.parametrize("mode,shard", [(dict(data_parallel=True), None), (dict(fsdp=True), (2, 8)),
                                        (dict(fsdp=True, fsdp_axis_size=4), (4, 8))])
def test_data_parallel_over_8_devices_matches_one_device(mode, shard):
    """Data parallel, FSDP (params and Adam moments split over the 8 devices) and hybrid
    FSDP on a 2 x 4 ("data", "fsdp") mesh (split over 4, replicated over 2) all train
    like one device."""
    if jax.device_count() < 8:
        pytest.fail("tests/conftest.py should provide 8 CPU devices")
    data = {"x": np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)}
    params = {"w": jnp.zeros((16, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}
    cfg = toy_cfg(num_epochs=1)
    one = train(_wide_loss, params, data, cfg)
    many = train(_wide_loss, params, data, dataclasses.replace(cfg, **mode))
    w, mu = many.params["w"], many.state.opt_state[1][0].mu["w"]
    assert len(w.sharding.device_set) == 8
    for x in (w, mu):
        shapes = {s.data.shape for s in x.addressable_shards}
        assert shapes == {(16, 8) if shard is None else shard}, shapes
    assert np.abs(np.asarray(one.params["w"])).sum() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params, many.params)


def test_train_data_errors():
    with pytest.raises(ValueError, match="different leading sizes"):
        train(toy_loss, toy_params(), {"x": np.zeros((8, 4)), "y": np.zeros(7)}, toy_cfg())
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(toy_loss, toy_params(), toy_data(4), toy_cfg())

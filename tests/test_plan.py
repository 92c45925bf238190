"""`rubrax plan`: its numbers are those of the program the run compiles; memory is linear
in the sequence length; a recipe that cannot fit is refused before any weights load."""

import json

import jax
import numpy as np
import pytest

from rubrax import plan
from rubrax.models import ModelConfig, init_params
from rubrax.rl.batch import RolloutBatch
from rubrax.rl.state import TrainState
from rubrax.rl.step import RLConfig, Trainer, model_logits_fn
from rubrax.sharding import make_mesh, shard_batch
from rubrax.train.optim import OptimConfig, make_optimizer

CFG = ModelConfig.tiny(hidden_size=128, intermediate_size=256, vocab_size=512, remat="full", attention="blockwise",
                       attention_block=32)


def _batch(rows: int, width: int, completion: int) -> RolloutBatch:
    rng = np.random.default_rng(0)
    T = width + completion
    loss_mask = np.zeros((rows, T), np.int32)
    loss_mask[:, width:] = 1
    return RolloutBatch(tokens_BxT=rng.integers(3, 500, (rows, T)).astype(np.int32), mask_BxT=np.ones((rows, T), np.int32),
                        loss_mask_BxT=loss_mask, behaviour_logp_BxT=-np.ones((rows, T), np.float32),
                        rewards_B=rng.random(rows).astype(np.float32), valid_B=np.ones(rows, bool), prompt_width=width)


def test_plan_equals_the_compiled_run():
    """The planner, from abstract shapes, reports exactly what XLA reports for the update
    the Trainer builds from real params; its state columns are the real shards' bytes."""
    rl, optim = RLConfig(group_size=4, kl_coef=0.01, grad_accum=2), OptimConfig()
    mesh = make_mesh(jax.devices()[:8])
    p = plan.plan_update(CFG, rl, optim, rows=32, width=16, completion=48, mesh=mesh, fsdp=True, total_steps=5,
                         platform="cpu")
    params = init_params(CFG, jax.random.PRNGKey(0))
    tx = make_optimizer(optim, 5)
    state = TrainState.create(params, tx, seed=0)
    trainer = Trainer(rl, model_logits_fn(CFG), tx, state, params, mesh=mesh, fsdp=True)
    placed, ref = trainer.place_state(state), trainer.place_ref(params)
    lowered = trainer.update_fn.lower(placed, shard_batch(_batch(32, 16, 48), mesh), ref)
    m = lowered.compile(compiler_options=plan._CPU_COMPILE_OPTIONS).memory_analysis()
    assert p.temporaries == m.temp_size_in_bytes
    assert p.peak == m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    shard = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    assert (p.params, p.optimizer, p.reference) == (shard(placed.params), shard(placed.opt_state), shard(ref))
    assert p.params * 8 == sum(x.nbytes for x in jax.tree.leaves(params))  # FSDP: an eighth each
    assert p.model_flops > 0 and p.tokens == 32 * 64


def test_update_memory_grows_linearly_with_length():
    """Fixed rows, T = 1k / 2k / 4k: each doubling adds about twice the previous increase
    (linear; the materialised attention of before was quadratic: 4x)."""
    rl, optim = RLConfig(group_size=2), OptimConfig()
    mesh = make_mesh(jax.devices()[:1])
    peak = {T: plan.plan_update(CFG, rl, optim, rows=2, width=64, completion=T - 64, mesh=mesh, fsdp=False,
                                total_steps=1, platform="cpu").peak for T in (1024, 2048, 4096)}
    ratio = (peak[4096] - peak[2048]) / (peak[2048] - peak[1024])
    assert 1.7 < ratio < 2.3, (peak, ratio)


def test_refused_before_weights_load(tmp_path, monkeypatch, capsys):
    from rubrax.rl import cli, recipe

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the fit check")

    monkeypatch.setattr(recipe, "load_model", no_weights)
    with pytest.raises(SystemExit) as err:
        cli.main(["--config", "experiments/configs/grpo_tiny.json", "--out", str(tmp_path / "run"),
                  "--device-memory", "0.0001"])
    message = str(err.value)
    assert "will not fit" in message and "experiments/configs/grpo_tiny.json" in message
    for knob in ("rows per device", "rematerialisation", "dtype", "devices"):
        assert knob in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_plan_on_more_devices_than_this_process_has():
    """16 devices > the 8 this test process has: planned in a subprocess with 16 fake CPU
    devices; FSDP halves each device's params relative to 8 devices."""
    with open("experiments/configs/grpo_tiny.json") as f:
        config = json.load(f)
    config["loop"] = {**config["loop"], "fsdp": True, "prompts_per_step": 16}
    p16 = plan.plan_recipe(config, devices=16, source="tiny16")
    p8 = plan.plan_recipe(config, devices=8, source="tiny8")
    assert p16.devices == 16 and p8.devices == 8 and p16.source == "tiny16"
    assert p16.programs[0].params < p8.programs[0].params
    assert p16.fits and "update" in p16.table()


def _supervised_data(task: str, n: int, T: int) -> dict:
    rng = np.random.default_rng(1)
    shape = (n, T) if task == "sft" else (n, 2, T)
    data = {"tokens": rng.integers(3, 500, shape).astype(np.int32), "mask": np.ones(shape, np.int32)}
    if task == "sft":
        data["loss_mask"] = np.ones(shape, np.int32)
    return data


@pytest.mark.parametrize("task", ["sft", "reward-model"])
def test_supervised_plan_equals_the_compiled_run(task):
    """SFT and BT recipes plan the supervised trainer's own step: the planner's numbers
    (abstract shapes) equal XLA's for the step the trainer compiles from real params and a
    real batch, on 8 devices with FSDP; params and Adam state are the real shards' bytes."""
    import functools

    from rubrax.rewards import bradley_terry as bt
    from rubrax.train import trainer as tr
    from rubrax.train.optim import make_schedule
    from rubrax.train.sft import sft_loss

    config = {"task": task, "model": "tiny", "preset": "tiny", "max_length": 64,
              "model_settings": {"remat": "full", "attention": "blockwise", "attention_block": 32},
              "train": {"batch_size": 16, "grad_accum_steps": 2, "fsdp": True, "max_steps": 3}}
    p = plan.plan_recipe(config, devices=8, source="sup")
    (step_plan,) = p.programs
    assert p.devices == 8 and p.settings["task"] == task
    assert p.settings["rows_per_device" if task == "sft" else "pairs_per_device"] == 1

    recipe = plan.parse_supervised(config, "sup")
    cfg, model = recipe.train, ModelConfig.tiny(remat="full", attention="blockwise", attention_block=32)
    if task == "sft":
        params, loss, mask = init_params(model, jax.random.PRNGKey(0)), functools.partial(sft_loss, config=model), None
    else:
        params = bt.init_params(model, jax.random.PRNGKey(0))
        loss = functools.partial(bt.pair_loss, config=model, bt=recipe.bt)
        mask = bt.trainable_mask(params)
    tx = make_optimizer(cfg.optim, 3, mask)
    sharder = tr._Sharder(cfg)
    state = sharder.init_state(params, tx)
    step = tr.make_train_step(loss, tx, mask, make_schedule(cfg.optim, 3), state_shardings=sharder.state_shardings)
    batch = sharder.batch(tr._train_batch(_supervised_data(task, 32, 64), cfg, 0, 32), axis=1)
    m = step.lower(state, batch).compile(compiler_options=plan._CPU_COMPILE_OPTIONS).memory_analysis()
    assert step_plan.temporaries == m.temp_size_in_bytes
    assert step_plan.peak == m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    shard = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    assert (step_plan.params, step_plan.optimizer) == (shard(state.params), shard(state.opt_state))
    # FSDP: an eighth each (BT: but for its scalar bias, replicated)
    assert step_plan.params * 8 == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(params)), rel=1e-3)
    assert step_plan.tokens == 16 * 64 * (1 if task == "sft" else 2) and step_plan.model_flops > 0


def test_supervised_memory_grows_linearly_with_length():
    """SFT at fixed rows, max_length 1k / 2k / 4k: linear, as the RL update."""
    def peak(T):
        config = {"task": "sft", "model": "tiny", "preset": "tiny", "max_length": T,
                  "model_settings": {"remat": "full", "attention": "blockwise", "attention_block": 32},
                  "train": {"batch_size": 2}}
        return plan.plan_recipe(config, devices=1).programs[0].peak

    peaks = {T: peak(T) for T in (1024, 2048, 4096)}
    ratio = (peaks[4096] - peaks[2048]) / (peaks[2048] - peaks[1024])
    assert 1.7 < ratio < 2.3, (peaks, ratio)


def test_supervised_config_errors_name_the_key():
    base = {"task": "sft", "model": "smollm2"}
    for bad, words in (({"task": "dpo"}, "task='dpo'"), ({"train": {"batch_sise": 4}}, "train: unknown TrainConfig"),
                       ({"max_length": 1}, "max_length"), ({"model_settings": {"dtype": "int3"}}, "model_settings"),
                       ({"preset": "huge"}, "preset='huge'"), ({"colour": 1}, "unknown key(s) ['colour']")):
        with pytest.raises(ValueError) as err:
            plan.parse_supervised({**base, **bad}, "my.json")
        assert "my.json" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("task", ["sft", "reward-model"])
def test_train_cli_refused_before_weights_load(task, tmp_path, monkeypatch):
    """`rubrax train sft|reward-model --model smollm2 --device-memory G`: the SmolLM2 plan
    (from its metadata) does not fit in G, so the run stops, naming the knobs, before any
    weights load and before anything is written under --out but its lock's run.json."""
    from rubrax.cli import main as rubrax_main
    from rubrax.train import cli

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the fit check")

    monkeypatch.setattr(cli, "load_model", no_weights)
    if task == "sft":
        rec = {"prompt": "say yes", "response": "yes"}
    else:
        rec = {"prompt": "say yes", "chosen": "yes", "rejected": "no"}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(rec) + "\n" for _ in range(20)))
    with pytest.raises(SystemExit) as err:
        rubrax_main(["train", task, "--train", str(tmp_path / "data.jsonl"), "--model", "smollm2", "--out",
                     str(tmp_path / "run"), "--dtype", "bfloat16", "--remat", "full", "--device-memory", "0.01",
                     "--no-progress"])
    message = str(err.value)
    assert f"rubrax train {task} --model smollm2: will not fit" in message
    for knob in ("rows per device", "rematerialisation", "dtype", "devices"):
        assert knob in message
    assert "dtype=bfloat16" in message and "remat=full" in message
    assert not (tmp_path / "run" / "checkpoints").exists()

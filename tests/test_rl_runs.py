"""Issue 13 for RL runs: exact resume after kill -9 (1), rewards that hang (2), inputs
fingerprinted (3), settings that lose work (4), rewards that always fail (5), one writer
per run folder (6), corrupt checkpoints (7), config errors that say where (8).
Each test fails on cbabf30 (the commit before these fixes)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rubrax.models import ModelConfig, init_params
from rubrax.policy import SampleConfig
from rubrax.rewards.base import RewardBatch, RewardFnBase
from rubrax.rl.hooks import reward_eval_hook
from rubrax.rl.loop import LoopConfig, train
from rubrax.rl.prompts import load_prompts
from rubrax.rl.reward_runner import RewardsAllInvalid
from rubrax.rl.step import RLConfig
from rubrax.rl.toy import TargetWordReward, toy_prompts, toy_tokenizer
from rubrax.runs import InputsChanged, RunLocked
from rubrax.sharding import make_mesh
from rubrax.train.metrics import read_metrics
from rubrax.train.optim import OptimConfig

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "rl_run_worker.py")
ROOT = os.path.dirname(HERE)
G = 4
TOK = toy_tokenizer()
CONFIG = ModelConfig.tiny(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          max_position_embeddings=64, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
                          pad_token_id=TOK.pad_token_id)
SAMPLE = SampleConfig(max_new_tokens=6, n=G, prompt_bucket=8)
GREEDY = SampleConfig(max_new_tokens=6, n=1, temperature=0.0)
ONE_DEVICE = make_mesh(jax.devices()[:1])


def run(steps, *, reward=None, optim=None, hooks=(), params=None, **loop_kw):
    loop = LoopConfig(**{"total_steps": steps, "prompts_per_step": 2, "max_prompt_tokens": 8, "progress": False, **loop_kw})
    params = init_params(CONFIG, jax.random.PRNGKey(0)) if params is None else params
    return train(params=params, model_config=CONFIG, tokenizer=TOK,
                 reward_fn=reward or TargetWordReward(target="yes"), prompts=toy_prompts(16), rl=RLConfig(group_size=G),
                 sample=SAMPLE, optim=optim or OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0),
                 loop=loop, eval_hooks=hooks, mesh=ONE_DEVICE)


def lines(path):
    """metrics.jsonl records without their time fields."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)]


# --------------------------------------------------------------------------- (1) exact resume, kill -9


def _worker(out, opts, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, WORKER, str(out), json.dumps(opts)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


_REFERENCE: dict[str, list] = {}


def _reference(tmp_path_factory, opts):
    key = json.dumps(opts, sort_keys=True)
    if key not in _REFERENCE:
        out = tmp_path_factory.mktemp("ref")
        _finish(_worker(out, dict(opts)))
        _REFERENCE[key] = lines(out / "metrics.jsonl")
    return _REFERENCE[key]


def _kill_at_random(out, opts, rng, n_lines):
    """Starts a run and SIGKILLs it once metrics.jsonl has a random number of lines (+ a random delay)."""
    target = rng.randrange(0, n_lines)
    proc = _worker(out, dict(opts))
    path = out / "metrics.jsonl"
    while proc.poll() is None:
        have = sum(1 for _ in open(path)) if path.exists() else 0
        if have >= target:
            time.sleep(rng.uniform(0, 0.6))
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("overlap, every, seed", [("sync", 1, 0), ("sync", 10, 1), ("one_step_off_policy", 1, 2),
                                                  ("one_step_off_policy", 10, 3)])
def test_kill9_at_random_moments_then_rerun_equals_uninterrupted(tmp_path, tmp_path_factory, overlap, every, seed):
    opts = {"overlap": overlap, "checkpoint_every": every, "total_steps": 6, "eval": True, "eval_every": 3}
    ref = _reference(tmp_path_factory, opts)
    assert len(ref) == 6 + 2 and "eval/reward_mean" in ref[-1] and ref[-1]["step"] == 6  # final eval included
    rng = random.Random(seed)
    for _ in range(2 if every == 1 else 1):  # kills at random moments, then a rerun to the end
        _kill_at_random(tmp_path, opts, rng, len(ref))
    _finish(_worker(tmp_path, dict(opts)))
    assert lines(tmp_path / "metrics.jsonl") == ref
    if seed == 0:
        _finish(_worker(tmp_path, dict(opts)))  # a complete run: nothing done, nothing duplicated
        assert lines(tmp_path / "metrics.jsonl") == ref


@pytest.mark.slow
def test_killed_in_the_final_eval_reruns_only_the_eval(tmp_path, tmp_path_factory):
    opts = {"overlap": "sync", "checkpoint_every": 10, "total_steps": 6, "eval": True, "eval_every": 3}
    ref = _reference(tmp_path_factory, opts)
    proc = _worker(tmp_path, {**opts, "kill_in_final_eval": True})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert lines(tmp_path / "metrics.jsonl") == ref[:-1]  # the final eval line is missing
    _finish(_worker(tmp_path, dict(opts)))
    assert lines(tmp_path / "metrics.jsonl") == ref


# --------------------------------------------------------------------------- (2) hanging rewards


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hang_sync", "hang_async"])
def test_hanging_reward_with_eval_ends_the_process(tmp_path, kind):
    """Bound: each step and each eval batch waits at most reward_timeout_s (1 s) for its judges;
    once train() returns the process exits within 5 s; the whole run within 240 s."""
    t0 = time.time()
    proc = _worker(tmp_path, {"reward": kind, "reward_timeout_s": 1.0, "eval": True, "total_steps": 3})
    out = _finish(proc, timeout=240)
    returned = float(out.split("returned")[1])
    assert time.time() - returned < 5 and time.time() - t0 < 240
    recs = read_metrics(tmp_path / "metrics.jsonl")
    train_recs, final = recs[:-1], recs[-1]
    assert [r["step"] for r in train_recs] == [0, 1, 2]
    # rows of prompts p2, p5, p12, p15 hang: each is a timed-out group of G rows, never a 0 reward
    assert sum(r["reward_timeouts"] for r in train_recs) % G == 0 and all(r["reward_exceptions"] == 0 for r in train_recs)
    assert final["eval/reward_timeouts"] == 4 and final["eval/reward_invalid"] == 4  # h2 hangs: its batch of 4 times out


# --------------------------------------------------------------------------- (6) one writer


@pytest.mark.slow
def test_second_run_on_a_locked_folder_fails_fast_and_the_first_is_unharmed(tmp_path, tmp_path_factory):
    opts = {"overlap": "sync", "checkpoint_every": 1, "total_steps": 6, "eval": True, "eval_every": 3}
    ref = _reference(tmp_path_factory, opts)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    first = _worker(tmp_path, dict(opts))
    while not (tmp_path / "run.json").exists() and first.poll() is None:  # recorded under the lock
        time.sleep(0.02)
    t0 = time.perf_counter()
    with pytest.raises(RunLocked, match=f"in use by process {first.pid}"):
        run(6, out_dir=str(tmp_path), checkpoint_every=1, params=params)
    assert time.perf_counter() - t0 < 5 and first.poll() is None  # before any compilation
    _finish(first)
    assert lines(tmp_path / "metrics.jsonl") == ref


# --------------------------------------------------------------------------- (3) fingerprints


def test_resume_with_changed_inputs_refuses_naming_them(tmp_path):
    run(2, out_dir=str(tmp_path), checkpoint_every=1)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(InputsChanged, match=r"optim.learning_rate: 0.01 -> 0.02.*--restart"):
        run(2, out_dir=str(tmp_path), optim=OptimConfig(learning_rate=2e-2, schedule="constant", warmup_ratio=0.0))
    with pytest.raises(InputsChanged, match="reward: \"target_word\" -> \"other\""):
        run(2, out_dir=str(tmp_path), reward=_Named("other"))
    with pytest.raises(InputsChanged, match=r"loop.total_steps: 2 -> 3.*--allow-changed"):
        run(3, out_dir=str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == before  # refusals wrote nothing
    out = run(3, out_dir=str(tmp_path), allow_changed=True)  # safe: continue to step 3
    assert [h["step"] for h in out.history] == [2] and int(out.state.step) == 3
    out = run(2, out_dir=str(tmp_path), restart=True, optim=OptimConfig(learning_rate=2e-2, schedule="constant", warmup_ratio=0.0))
    assert [h["step"] for h in out.history] == [0, 1] and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


class _Named(RewardFnBase):
    def __init__(self, name):
        self.name = name

    def __call__(self, prompts, completions, **columns):
        return RewardBatch(np.ones(len(completions), np.float32), np.ones(len(completions), bool))


# --------------------------------------------------------------------------- (5) rewards that always fail


def test_always_raising_reward_is_counted_and_stops_the_run(tmp_path):
    def raises(prompts, completions):
        raise RuntimeError("judge exploded")

    with pytest.raises(RewardsAllInvalid, match=r"3 consecutive steps \(0..2; timeouts=0, exceptions=8.*judge exploded"):
        run(10, reward=raises, out_dir=str(tmp_path), max_invalid_steps=3)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1] and all(r["reward_exceptions"] == 2 * G for r in recs)


@pytest.mark.parametrize("bad", [lambda n: [1.0] * (n - 1), lambda n: ["0.5"] * n, lambda n: {"score": 1.0}])
def test_malformed_reward_is_masked_counted_and_the_final_eval_survives(bad):
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return bad(len(completions)) if len(calls) % 2 else [float("yes" in c.split()) for c in completions]

    held = load_prompts(toy_prompts(4, seed=1), TOK, max_prompt_tokens=8)
    hook = reward_eval_hook(held, lambda prompts, completions: bad(len(completions)), TOK, CONFIG, GREEDY, max_prompt_tokens=8, timeout_s=5)
    out = run(2, reward=reward, hooks=[hook])
    train_recs, final = out.history[:-1], out.history[-1]
    # chunks are groups: every other call of the 2 x 2 per step is malformed
    assert [r["reward_malformed"] for r in train_recs] == [G, G] and [r["reward_invalid"] for r in train_recs] == [G, G]
    assert all(np.isfinite(r["loss"]) for r in train_recs)
    assert final["step"] == 2 and final["eval/reward_malformed"] == 4 and final["eval/reward_invalid"] == 4
    assert math.isnan(final["eval/reward_mean"])


# --------------------------------------------------------------------------- (4) settings that lose work or do nothing


@pytest.mark.parametrize("field, value", [("keep_checkpoints", 0), ("keep_checkpoints", -2), ("total_steps", True),
                                          ("checkpoint_every", 2.5), ("reward_timeout_s", math.inf), ("max_invalid_steps", 0),
                                          ("seed", -1), ("prompts_per_step", "4")])
def test_loop_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"LoopConfig.{field}"):
        LoopConfig(**{"total_steps": 3, "prompts_per_step": 2, "out_dir": "x", field: value})


@pytest.mark.parametrize("field, value", [("kl_coef", math.nan), ("entropy_coef", math.nan), ("adv_eps", math.nan),
                                          ("kl_coef", math.inf), ("temperature", math.inf), ("group_size", True), ("ppo_epochs", 1.0)])
def test_rl_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"RLConfig.{field}"):  # (recompute: a temperature may differ from 1)
        RLConfig(**{"group_size": 4, "behaviour_logprobs": "recompute", field: value})


def test_batch_that_cannot_divide_into_minibatches_fails_before_sampling(tmp_path):
    rl = RLConfig(group_size=G, num_minibatches=3)
    loop = LoopConfig(total_steps=2, prompts_per_step=2, max_prompt_tokens=8, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="8 rollouts .* 3 minibatches"):
        train(params=None, model_config=CONFIG, tokenizer=TOK, reward_fn=TargetWordReward(target="yes"), prompts=toy_prompts(4),
              rl=rl, sample=SAMPLE, optim=OptimConfig(), loop=loop)
    assert not (tmp_path / "run").exists()


def test_max_prompt_tokens_too_small_names_the_source_not_every_prompt():
    records = [{"prompt": f"a long secret prompt number {i} " * 5} for i in range(50)]
    with pytest.raises(ValueError) as err:
        load_prompts(records, TOK, max_prompt_tokens=1)
    assert "secret" not in str(err.value) and len(str(err.value)) < 200 and "50 of them longer" in str(err.value)


# --------------------------------------------------------------------------- (7) corrupt checkpoints


def test_corrupt_latest_checkpoint_resumes_from_the_previous_good_one(tmp_path, caplog):
    full = run(4, out_dir=str(tmp_path / "full"), checkpoint_every=2)
    run(4, out_dir=str(tmp_path / "cut"), checkpoint_every=2)
    bad = tmp_path / "cut" / "checkpoints" / "4" / "extra" / "metadata"
    bad.write_text("{")
    (tmp_path / "cut" / "checkpoints" / "9").mkdir()  # a stray step folder is no checkpoint
    out = run(4, out_dir=str(tmp_path / "cut"), checkpoint_every=2)
    assert f"{bad}: not valid JSON" in caplog.text and "falling back to the previous checkpoint, step 2" in caplog.text
    assert [h["step"] for h in out.history] == [2, 3]  # redone from step 2
    assert lines(tmp_path / "cut" / "metrics.jsonl") == lines(tmp_path / "full" / "metrics.jsonl")
    for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(out.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- (8) config errors that say where


@pytest.mark.parametrize("sets, message", [
    (["rl=5"], "--set rl=5: 'rl' is a section"),
    (["reward=name"], "--set reward=name: 'reward' is a section"),
    (["eval_sample=[1]"], "eval_sample: must be an object of SampleConfig fields, got [1]"),
    (["tiny_model.hidden_sise=8"], "tiny_model: unknown ModelConfig field(s) ['hidden_sise']"),
    (["reward.kwargs.targett=yes"], "reward 'target_word': "),
    (["rl.num_minibatches=3"], "does not divide into 3 minibatches"),
    (["loop.keep_checkpoints=0"], "LoopConfig.keep_checkpoints must be >= 1"),
    (["loop.total_steps=true"], "LoopConfig.total_steps must be an integer"),
    (["optim.learning_rate=Infinity"], "OptimConfig.learning_rate must be a finite number"),
])
def test_rl_cli_config_errors_name_file_and_key(tmp_path, capsys, sets, message):
    from rubrax.cli import main

    config = os.path.join(ROOT, "experiments", "configs", "grpo_tiny.json")
    args = ["rl", "train", "--config", config, "--out", str(tmp_path / "run"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "grpo_tiny.json" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rl_cli_invalid_json_names_the_line(tmp_path, capsys):
    from rubrax.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "tiny",\n "rl": {"group_size": 8,}\n}')
    assert main(["rl", "train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err

"""The gold monitor inside `train()` on the toy task, with a gold reward that knows the
proxy over-optimises: the proxy pays for every "yes", gold for saying "yes" in half of
the words. As the policy learns to say only "yes", gold rises, peaks and falls."""

import jax
import numpy as np
import pytest

from test_rl_loop import CONFIG, G, SAMPLE, TOK

from rubrax.models import init_params
from rubrax.policy import SampleConfig
from rubrax.rl.loop import LoopConfig, train
from rubrax.rl.monitor import GoldMonitor, GoldMonitorConfig
from rubrax.rl.prompts import load_prompts
from rubrax.rl.step import RLConfig
from rubrax.rl.toy import HalfTargetWordReward, TargetWordReward, toy_prompts
from rubrax.sharding import make_mesh
from rubrax.train import checkpoint
from rubrax.train.metrics import read_metrics
from rubrax.train.optim import OptimConfig

EVAL_SAMPLE = SampleConfig(max_new_tokens=6, n=8, prompt_bucket=8)


def run(tmp_path, steps=24, config=GoldMonitorConfig(), every=2):
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    held = load_prompts(toy_prompts(8, seed=9), TOK, max_prompt_tokens=8)
    monitor = GoldMonitor(held, HalfTargetWordReward(target="yes"), TargetWordReward(target="yes"), TOK, CONFIG, EVAL_SAMPLE,
                          max_prompt_tokens=8, ref_params=params, out_dir=str(tmp_path), config=config)
    result = train(params=params, model_config=CONFIG, tokenizer=TOK, reward_fn=TargetWordReward(target="yes"),
                   prompts=toy_prompts(64), rl=RLConfig(group_size=G, kl_coef=1e-3), sample=SAMPLE,
                   optim=OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0),
                   loop=LoopConfig(total_steps=steps, prompts_per_step=4, max_prompt_tokens=8, eval_every=every, progress=False,
                                   out_dir=str(tmp_path), tensorboard=False),
                   eval_hooks=[monitor], mesh=make_mesh(jax.devices()[:1]))
    evals = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval/gold" in r]
    return monitor, result, evals


@pytest.mark.slow
def test_gold_monitor_sees_over_optimisation_and_keeps_the_best_params(tmp_path):
    monitor, result, evals = run(tmp_path / "full")
    steps = [r["step"] for r in evals]
    gold = np.array([r["eval/gold"] for r in evals])
    proxy = np.array([r["eval/proxy"] for r in evals])
    peak = int(np.argmax(gold))
    assert steps == list(range(2, 25, 2))
    assert 0 < peak < len(evals) - 1 and gold[-1] < gold[peak] - 0.2  # gold rose, peaked, fell
    assert proxy[-1] > proxy[peak] + 0.2  # while the proxy kept rising
    assert evals[-1]["eval/gold_peak_step"] == steps[peak] and evals[-1]["eval/gold_best"] == pytest.approx(gold[peak])
    assert evals[-1]["eval/kl"] > evals[0]["eval/kl"] > 0  # k1 KL to the reference grows
    # The best-by-gold checkpoint holds the peak's params: re-evaluated (same keys), same gold.
    best_dir = str(tmp_path / "full" / "best_gold")
    assert checkpoint.all_steps(best_dir) == [steps[peak]]
    best, extra = checkpoint.restore(best_dir, jax.device_get(result.state.params))
    assert extra == {"step": steps[peak], "gold": pytest.approx(gold[peak])}
    assert monitor.evaluate(0, best)["gold"] == pytest.approx(gold[peak], abs=1e-6)

    # Early stop: two evaluations past gold's peak with the proxy above it ends the run there.
    stopped, result2, evals2 = run(tmp_path / "stop", config=GoldMonitorConfig(patience=2))
    assert [r["eval/gold"] for r in evals2] == pytest.approx(list(gold[: peak + 3]))  # same run up to the stop
    assert stopped.stop_requested and int(result2.state.step) == steps[peak + 2]
    assert checkpoint.latest_step(str(tmp_path / "stop" / "checkpoints")) == steps[peak + 2]

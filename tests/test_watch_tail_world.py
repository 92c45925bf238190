"""Over-optimisation watched in the tail world, where the gold reward is known: the gold
monitor reproduces the BT off-policy arm's gold peak, and the theory's forecast from base
samples equals the testbed's own theory link. One cpu-preset seed (base SFT + the
off-policy BT model) serves both tests."""

import dataclasses

import numpy as np
import pytest

from rubrax.eval.winrate import pearson
from rubrax.forecast import forecast, forecast_from_scores
from rubrax.rl.monitor import GoldMonitor
from rubrax.sim.experiment import build_proxies, build_seed, run_rl_arm, theory_rows
from rubrax.sim.presets import get_preset
from rubrax.sim.rewards import GoldReward

ARM = "bt_off_policy"


@pytest.fixture(scope="module")
def tail_world():
    cfg = dataclasses.replace(get_preset("cpu"), arms=("gold", ARM), seeds=(0,), rl_steps=20, eval_every=2)
    ctx = build_seed(cfg, 0, log=lambda msg: None)
    proxies, _ = build_proxies(ctx, cfg, log=lambda msg: None)
    return cfg, ctx, proxies


@pytest.mark.slow
def test_gold_monitor_reproduces_the_bt_off_policy_over_optimisation(tail_world, tmp_path):
    """The monitor, fed the world's gold on the world's prompts every 2 steps (and the
    base policy at step 0), finds gold's peak where the testbed's per-step record has it
    (within the evaluation interval), sees gold fall while the BT proxy rises, and its
    gold follows the recorded curve."""
    cfg, ctx, proxies = tail_world
    monitor = GoldMonitor(ctx.prompts, GoldReward(ctx.world), proxies[ARM], ctx.tokenizer, ctx.model_config,
                          dataclasses.replace(cfg.sample, n=32), max_prompt_tokens=ctx.prompt_tokens_PxW.shape[1],
                          ref_params=ctx.base_params)
    rows = run_rl_arm(ctx, cfg, ARM, proxies[ARM], lambda msg: None, tmp_path, eval_hooks=[monitor])
    recorded = {r["step"]: r["gold"] for r in rows}  # steps 0..19 (training rollouts) and 20 (final evaluation)
    testbed_peak = max(recorded, key=recorded.get)
    peak, history = monitor.tracker.peak, monitor.tracker.history
    assert [h["step"] for h in history] == list(range(0, 21, 2))
    assert abs(peak["step"] - testbed_peak) <= cfg.eval_every, (peak, recorded)
    assert history[-1]["gold"] < peak["gold"] - 0.1 and history[-1]["proxy"] > peak["proxy"] + 1.0  # over-optimised
    corr = pearson([h["gold"] for h in history], [recorded[h["step"]] for h in history])
    assert corr > 0.8, ([(h["step"], h["gold"]) for h in history], recorded)


@pytest.mark.slow
def test_forecast_equals_the_tail_world_theory_link(tail_world):
    """rubrax.forecast over the base samples and the reward functions gives the numbers
    of the tail-world report's theory rows (Proposition 1), per arm and beta."""
    cfg, ctx, proxies = tail_world
    expected = theory_rows(ctx, cfg, proxies)
    assert {r["arm"] for r in expected} == {"gold", ARM}
    n = ctx.base_gold_PxN.shape[1]
    for arm, proxy in proxies.items():
        want = [r for r in expected if r["arm"] == arm]
        got = forecast(GoldReward(ctx.world), proxy, ctx.prompt_texts, ctx.base_samples, columns={"prompt_id": ctx.prompt_ids},
                       n_betas=cfg.eval.theory_betas, label=arm)
        assert len(got) == len(want) == cfg.eval.theory_betas
        for g, w in zip(got, want):
            for key in ("beta", "kl", "win_rate", "gold"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (arm, key)
        # From the testbed's own float64 gold scores: the same numbers exactly.
        out = proxy([t for t in ctx.prompt_texts for _ in range(n)], [s for rs in ctx.base_samples for s in rs],
                    prompt_id=[p for p in ctx.prompt_ids for _ in range(n)])
        exact = forecast_from_scores(ctx.base_gold_PxN, out.scores.astype(np.float64).reshape(-1, n), out.valid.reshape(-1, n),
                                     n_betas=cfg.eval.theory_betas, label=arm)
        assert [{"seed": 0, "arm": arm, **{k: r[k] for k in ("beta", "kl", "win_rate", "gold")}} for r in exact] == want

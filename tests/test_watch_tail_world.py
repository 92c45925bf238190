"""Over-optimisation watched in the tail world, where the gold reward is known: the
theory's forecast from base samples equals the testbed's own theory link."""

import dataclasses

import numpy as np
import pytest

from rubrax.forecast import forecast, forecast_from_scores
from rubrax.sim.experiment import build_proxies, build_seed, theory_rows
from rubrax.sim.presets import get_preset
from rubrax.sim.rewards import GoldReward


@pytest.fixture(scope="module")
def tail_world():
    cfg = dataclasses.replace(get_preset("tiny"), arms=("gold", "bt_off_policy"))
    ctx = build_seed(cfg, 0, log=lambda msg: None)
    proxies, _ = build_proxies(ctx, cfg, log=lambda msg: None)
    return cfg, ctx, proxies


@pytest.mark.slow
def test_forecast_equals_the_tail_world_theory_link(tail_world):
    """rubrax.forecast over the base samples and the reward functions gives the numbers
    of the tail-world report's theory rows (Proposition 1), per arm and beta."""
    cfg, ctx, proxies = tail_world
    expected = theory_rows(ctx, cfg, proxies)
    assert {r["arm"] for r in expected} == {"gold", "bt_off_policy"}
    columns = {"prompt_id": ctx.prompt_ids}
    for arm, proxy in proxies.items():
        want = [r for r in expected if r["arm"] == arm]
        got = forecast(GoldReward(ctx.world), proxy, ctx.prompt_texts, ctx.base_samples, columns=columns,
                       n_betas=cfg.eval.theory_betas, label=arm)
        assert len(got) == len(want) == cfg.eval.theory_betas
        for g, w in zip(got, want):
            assert g["label"] == arm
            for key in ("beta", "kl", "win_rate", "gold"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (arm, key)
        # From the testbed's own float64 gold scores: the same numbers exactly.
        n = ctx.base_gold_PxN.shape[1]
        out = proxy([t for t in ctx.prompt_texts for _ in range(n)],
                    [s for rs in ctx.base_samples for s in rs], prompt_id=[p for p in ctx.prompt_ids for _ in range(n)])
        exact = forecast_from_scores(ctx.base_gold_PxN, out.scores.astype(np.float64).reshape(-1, n), out.valid.reshape(-1, n),
                                     n_betas=cfg.eval.theory_betas, label=arm)
        assert [{k: r[k] for k in w} for r, w in zip(({"arm": arm, "seed": 0, **e} for e in exact), want)] == want

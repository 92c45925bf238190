"""The tail-world report's summary logic on hand-computed curves: the peak is the max of a
centred 3-step moving average (and its step the window's centre), final is the last
update's fresh samples, spread is the standard deviation over seeds (ddof=1)."""

import math

import pytest

from rubrax.sim.report import per_seed_summary, table1


def curve(seed, wins, final_win, *, arm="x", final_kl=0.5):
    rows = [{"seed": seed, "arm": arm, "step": s, "win_rate": w, "gold": 0.1 * s, "proxy": 0.2 + 0.01 * s, "kl": 0.1 * s,
             "length": 10, "final": False} for s, w in enumerate(wins)]
    rows.append({"seed": seed, "arm": arm, "step": len(wins), "win_rate": final_win, "gold": 0.9, "proxy": 0.3, "kl": final_kl,
                 "length": 12, "final": True})
    return rows


def test_peak_is_the_max_of_the_centred_moving_average():
    # seed 0: raw max 0.9 at step 2, but the 3-step means are 0.667, 0.700, 0.733, 0.567:
    # the peak is 0.733, the window of steps 2..4, centred on step 3.
    # seed 1: means 0.5, 0.6, 0.7, 0.8: peak 0.8 centred on step 4.
    curves = curve(0, [0.5, 0.6, 0.9, 0.6, 0.7, 0.4], 0.45) + curve(1, [0.5, 0.5, 0.5, 0.8, 0.8, 0.8], 0.7, final_kl=math.nan)
    curves = curves[::-1]  # the order of the rows does not matter
    s0, s1 = per_seed_summary(curves)
    assert (s0["seed"], s1["seed"]) == (0, 1)
    assert s0["peak_win_rate"] == pytest.approx((0.9 + 0.6 + 0.7) / 3) and s0["peak_step"] == 3
    assert s1["peak_win_rate"] == pytest.approx(0.8) and s1["peak_step"] == 4
    assert (s0["start_win_rate"], s0["final_win_rate"], s0["final_gold"], s0["final_kl"]) == (0.5, 0.45, 0.9, 0.5)
    assert s0["start_proxy"] == pytest.approx(0.2) and s0["peak_proxy"] == pytest.approx(0.25) and s0["final_proxy"] == 0.3

    (row,) = table1([s0, s1], ["x", "absent"])  # an arm without runs gets no row
    assert row["seeds"] == 2
    assert row["final_win_rate_mean"] == pytest.approx(0.575)
    assert row["final_win_rate_sd"] == pytest.approx(0.25 / math.sqrt(2))  # sample sd of two seeds
    assert (row["final_win_rate_min"], row["final_win_rate_max"]) == (0.45, 0.7)
    assert row["peak_win_rate_mean"] == pytest.approx((2.2 / 3 + 0.8) / 2)
    assert row["peak_win_rate_sd"] == pytest.approx((0.8 - 2.2 / 3) / math.sqrt(2))
    assert row["peak_step_mean"] == pytest.approx(3.5)
    # a NaN (seed 1's KL) is left out of the mean; one value has spread 0
    assert row["final_kl_mean"] == pytest.approx(0.5) and row["final_kl_sd"] == 0.0


def test_curves_shorter_than_the_window_use_the_raw_points():
    (s,) = per_seed_summary(curve(0, [0.4, 0.6], 0.5))
    assert s["peak_win_rate"] == pytest.approx(0.6) and s["peak_step"] == 1

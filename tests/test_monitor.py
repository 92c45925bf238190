"""The gold monitor: peak tracking, early stop, resume (host logic)."""

import math

import pytest

from rubrax.rl.monitor import GoldMonitorConfig, GoldTracker

# Gold peaks at step 30 and falls while the proxy keeps rising: over-optimisation.
STEPS = [10, 20, 30, 40, 50, 60]
GOLD = [0.10, 0.30, 0.50, 0.40, 0.35, 0.30]
PROXY = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60]


def feed(tracker, n=len(STEPS), proxy=PROXY):
    return [tracker.observe(s, gold=g, proxy=p, kl=0.1 * i) for i, (s, g, p) in enumerate(zip(STEPS[:n], GOLD, proxy))]


def test_peak_and_early_stop_after_patience_evaluations_past_the_peak():
    t = GoldTracker(GoldMonitorConfig(patience=2))
    out = feed(t)
    assert [o["new_best"] for o in out] == [True, True, True, False, False, False]
    assert [o["stop"] for o in out] == [False, False, False, False, True, True]  # 2 evaluations after step 30
    assert t.peak == {"step": 30, "gold": 0.5, "proxy": 0.3, "kl": pytest.approx(0.2)}
    assert t.figures() == {"gold": 0.3, "proxy": 0.6, "kl": pytest.approx(0.5), "gold_best": 0.5, "gold_peak_step": 30.0}


def test_no_stop_without_patience_or_when_the_proxy_fell_too():
    assert not any(o["stop"] for o in feed(GoldTracker()))
    falling = [0.1, 0.2, 0.3, 0.25, 0.2, 0.1]  # proxy below its value at gold's peak: no reward hacking
    assert not any(o["stop"] for o in feed(GoldTracker(GoldMonitorConfig(patience=1)), proxy=falling))


def test_min_delta_keeps_the_first_of_near_ties_and_nan_gold_is_ignored():
    t = GoldTracker(GoldMonitorConfig(min_delta=0.01))
    t.observe(1, gold=0.5, proxy=0.1)
    assert not t.observe(2, gold=0.505, proxy=0.2)["new_best"]
    assert t.observe(3, gold=0.52, proxy=0.3)["new_best"]
    t.observe(4, gold=math.nan, proxy=0.4)
    assert t.peak["step"] == 3


def test_resume_reads_the_history_and_reevaluated_steps_replace_it(tmp_path):
    path = str(tmp_path / "gold_monitor.json")
    first = GoldTracker(GoldMonitorConfig(patience=2), path)
    feed(first, n=4)
    again = GoldTracker(GoldMonitorConfig(patience=2), path)  # the resumed run
    assert again.history == first.history and again.peak["step"] == 30
    assert again.observe(50, gold=0.35, proxy=0.5)["stop"]  # the patience count survived
    again.observe(40, gold=0.9, proxy=0.5)  # resumed from an earlier checkpoint: step 40 again
    assert [r["step"] for r in again.history] == [10, 20, 30, 40] and again.peak["step"] == 40
    with pytest.raises(ValueError, match="patience"):
        GoldMonitorConfig(patience=0)


def test_criteria_log_counts_verdicts_per_prompt_and_criterion(tmp_path):
    import json
    import types

    from rubrax.rl.monitor import CriteriaLog

    infos = [{"prompt_id": "p", "verdicts": {"c1": "yes", "c2": "no"}}, {"prompt_id": "p", "verdicts": {"c1": "yes", "c2": "unknown"}},
             {"prompt_id": "q", "verdicts": {"c1": "no"}}, {"error": "timeout"}]
    log = CriteriaLog(str(tmp_path))
    out = log(types.SimpleNamespace(step=3, infos=tuple(infos)))
    assert out == {"rubric/pass_rate": 2 / 4, "rubric/saturated_frac": 1 / 3}  # p/c1 met by every sample
    assert log(types.SimpleNamespace(step=4, infos=({"scores": 1},))) == {}  # a reward without verdicts
    rows = [json.loads(x) for x in open(tmp_path / "criteria.jsonl")]
    assert rows == [{"step": 3, "prompt_id": "p", "criterion": "c1", "yes": 2, "no": 0, "unknown": 0},
                    {"step": 3, "prompt_id": "p", "criterion": "c2", "yes": 0, "no": 1, "unknown": 1},
                    {"step": 3, "prompt_id": "q", "criterion": "c1", "yes": 0, "no": 1, "unknown": 0}]

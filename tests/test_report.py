"""`rubrax report`: figures and report.md from a train() run folder and a tail-world folder."""

import json

import numpy as np
import pytest

from rubrax.cli import main as rubrax_main
from rubrax.report import criterion_rates, load_run, saturated, write_report


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _png_ok(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].std()) > 0.01  # not blank


@pytest.fixture
def train_run(tmp_path):
    """20 steps: the proxy rises throughout, held-out gold peaks at step 10 then falls;
    criterion c1 of p0 saturates, c2 never does; a forecast is present."""
    run = tmp_path / "run"
    rows = []
    for s in range(20):
        rows.append({"step": s, "reward_mean": s / 20, "kl": 0.1 * s, "response_len_mean": 10 + s, "zero_var_frac": 0.5 - s / 50,
                     "reward_invalid": s % 3, "reward_invalid_frac": (s % 3) / 16})
        if s % 5 == 0:
            rows.append({"step": s, "eval/gold": 0.5 - abs(s - 10) / 40, "eval/proxy": s / 20, "eval/kl": 0.1 * s})
    rows.append({"step": 20, "reward_mean": 0.97, "kl": 2.0})
    _write(run / "metrics.jsonl", rows)
    _write(run / "criteria.jsonl", [{"step": s, "prompt_id": "p0", "criterion": c, "yes": y, "no": 8 - y, "unknown": 0}
                                    for s in range(20) for c, y in (("c1", min(8, s)), ("c2", 2))])
    _write(run / "forecast.jsonl", [{"label": "proxy", "kl": k, "win_rate": 0.5 + 0.2 * k - 0.1 * k * k, "gold": 0.1} for k in np.linspace(0, 2, 9)])
    (run / "metrics.jsonl").open("a").write('{"step": 21, "reward_me')  # killed mid-write
    return run


def test_report_of_a_train_run(train_run, capsys):
    assert rubrax_main(["report", str(train_run)]) == 0
    assert capsys.readouterr().out.strip() == f"report={train_run / 'report' / 'report.md'} figures=6 skipped=0"
    out = train_run / "report"
    for name in ("reward_gold_vs_step", "reward_gold_vs_kl", "length_vs_step", "groups_and_invalid", "criteria_pass_rates", "forecast"):
        assert _png_ok(out / f"{name}.png"), name
    md = (out / "report.md").read_text()
    # held-out gold 0.25, 0.375, 0.5, 0.375 at steps 0..15; held-out proxy 0.75 at step 15
    # > 0.5 at gold's peak: over-optimised.
    assert "| run | 20 | 0.000 -> 0.970 | 0.250 -> 0.375 | 0.500 (10) |" in md and md.count("| yes |") == 1
    assert "predicted win rate peaks at 0.600 at KL 1.00" in md and "peaks then falls" in md
    assert "1 saturated" in md and "- p0/c1" in md and "p0/c2" not in md


def test_criteria_rates_and_saturation_by_hand():
    rows = [{"step": 0, "prompt_id": "p", "criterion": "a", "yes": 1, "no": 3}, {"step": 0, "prompt_id": "p", "criterion": "a", "yes": 1, "no": 1},
            {"step": 4, "prompt_id": "p", "criterion": "a", "yes": 4, "no": 0}, {"step": 4, "prompt_id": "p", "criterion": "b", "yes": 0, "no": 0, "unknown": 4}]
    rates = criterion_rates(rows)
    assert set(rates) == {("p", "a")}  # b has no known verdict
    np.testing.assert_allclose(rates[("p", "a")][1], [2 / 6, 1.0])
    assert saturated(rates) == [("p", "a")]


def test_report_of_a_tail_world_run(tmp_path):
    """Two arms over two seeds (means per step), the final evaluation row left out, the
    theory rows (one per beta) as the forecast."""
    run = tmp_path / "sim"
    for seed in (0, 1):
        for arm, peak in (("gold", 4), ("bt_off_policy", 2)):
            rows = [{"seed": seed, "arm": arm, "step": s, "gold": 0.4 - 0.05 * abs(s - peak) + 0.01 * seed, "proxy": 0.1 * s,
                     "win_rate": 0.5 + 0.02 * s, "kl": 0.2 * s, "length": 12.0} for s in range(5)]
            rows.append({**rows[-1], "final": True, "gold": 9.0})
            _write(run / "arms" / f"seed{seed}_{arm}.jsonl", rows)
        _write(run / "arms" / f"seed{seed}_theory.jsonl", [{"seed": seed, "arm": a, "beta": b, "kl": 1 / b, "win_rate": 0.5 + 0.1 / b, "gold": 0.3}
                                                           for a in ("gold", "bt_off_policy") for b in (1.0, 2.0, 4.0)])
        _write(run / "arms" / f"seed{seed}_agreement.jsonl", [{"seed": seed, "arm": "gold"}])
        _write(run / "arms" / f"seed{seed}_sft_great.jsonl", [{"seed": seed, "arm": "sft_great", "step": s, "gold": 0.2, "proxy": None,
                                                               "win_rate": 0.6, "kl": 1.0, "length": 9.0} for s in (0, 5)])
    (run / "report.md").write_text("the tail world's own report")
    data = load_run(str(run))
    assert data.kind == "sim" and sorted(c.name for c in data.arms) == ["bt_off_policy", "gold", "sft_great"]
    arm = {c.name: c for c in data.arms}["bt_off_policy"]
    np.testing.assert_allclose(arm.train["gold"][1], [0.305, 0.355, 0.405, 0.355, 0.305])  # seed means, no final row
    assert [r["kl"] for r in data.forecast["gold"]] == [0.25, 0.5, 1.0]
    md_path, figures = write_report(str(run))
    assert (run / "report.md").read_text() == "the tail world's own report"  # left alone
    assert all(_png_ok(p) for p in figures.values() if p) and figures["forecast against the measured path"]
    md = open(md_path).read()
    assert "| bt_off_policy | 4 | 0.000 -> 0.400 | 0.305 -> 0.305 | 0.405 (2) |" in md
    assert "| sft_great | 5 | n/a | 0.200 -> 0.200 |" in md  # no proxy: n/a, not a crash


def test_report_errors_name_the_folder(tmp_path, capsys):
    assert rubrax_main(["report", str(tmp_path / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err
    _write(tmp_path / "bad" / "metrics.jsonl", [{"step": 0}])
    (tmp_path / "bad" / "metrics.jsonl").open("a").write("{oops\n{\"step\": 1}\n")
    assert rubrax_main(["report", str(tmp_path / "bad")]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_train_grpo_gold_preset_forecasts_monitors_and_reports(tmp_path):
    """experiments/configs/grpo_tiny_gold.json end to end: the forecast is written before
    training, the gold monitor logs held-out gold every 2 steps (peaking, then falling while
    the proxy rises), and `rubrax report` draws every figure but the criteria map."""
    import os

    from rubrax.rl.cli import main as train_main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    assert train_main(["--config", os.path.join(root, "experiments", "configs", "grpo_tiny_gold.json"), "--out", str(out)]) == 0
    forecast = [json.loads(x) for x in open(out / "forecast.jsonl")]
    assert len(forecast) == 32 and all(0.5 <= r["win_rate"] <= 1.0 for r in forecast)
    path, figures = write_report(str(out))
    assert [t for t, p in figures.items() if p is None] == ["per-criterion pass rates"]
    assert all(_png_ok(p) for p in figures.values() if p)
    assert "| yes |" in open(path).read()  # gold fell after its peak while the proxy rose
    assert os.path.isdir(out / "best_gold")

"""rubrax.forecast: Proposition 1 from base-sample scores, from grades files, and the CLI."""

import json

import numpy as np
import pytest

from rubrax.cli import main as rubrax_main
from rubrax.forecast import forecast, forecast_from_grades, forecast_from_scores


def test_forecast_by_hand_on_one_prompt_of_two_samples():
    """Two base samples, gold (0, 1), proxy (0, 1): at beta the tilted weights are
    (1, e^{1/beta}) / Z, so win rate = (1/4 + 3/4 e^{1/b}) / Z (mid-rank CDF: 1/4, 3/4),
    gold = e^{1/b} / Z and KL = (1/b) e^{1/b} / Z - log(Z / 2)."""
    rows = forecast_from_scores([[0.0, 1.0]], [[0.0, 1.0]], betas=[0.5, 2.0])
    for r in rows:
        e = np.exp(1 / r["beta"])
        z = 1 + e
        assert r["win_rate"] == pytest.approx((0.25 + 0.75 * e) / z, rel=1e-5)
        assert r["gold"] == pytest.approx(e / z, rel=1e-5)
        assert r["kl"] == pytest.approx((1 / r["beta"]) * e / z - np.log(z / 2), rel=1e-4)
    assert forecast_from_scores([[0.0, 1.0]], [[0.3, 0.3]]) == []  # a constant proxy predicts nothing


def test_forecast_from_reward_functions_and_from_grades_files_agree(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gold, proxy = rng.random((3, 6)), rng.random((3, 6))
    proxy[1, 2] = np.nan  # a failed proxy judgement: dropped
    samples = [[f"p{i}-r{j}" for j in range(6)] for i in range(3)]
    table = {s: (gold[i, j], proxy[i, j]) for i, row in enumerate(samples) for j, s in enumerate(row)}

    def reward(which):
        from rubrax.rewards.base import RewardBatch

        def fn(prompts, completions, **columns):
            x = np.array([table[c][which] for c in completions])
            return RewardBatch(np.nan_to_num(x), np.isfinite(x))

        return fn

    want = forecast_from_scores(gold, np.nan_to_num(proxy), np.isfinite(proxy), n_betas=8)
    got = forecast(reward(0), reward(1), ["q"] * 3, samples, n_betas=8)
    assert [r["win_rate"] for r in got] == pytest.approx([r["win_rate"] for r in want])
    for name, k in (("gold", 0), ("proxy", 1)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for s, v in table.items():
                valid = bool(np.isfinite(v[k]))
                f.write(json.dumps({"prompt_id": s.split("-")[0], "response_id": s, "score": v[k] if valid else None, "valid": valid}) + "\n")
    from_files = forecast_from_grades(str(tmp_path / "gold.jsonl"), str(tmp_path / "proxy.jsonl"), n_betas=8)
    assert [r["kl"] for r in from_files] == pytest.approx([r["kl"] for r in want])
    run = tmp_path / "run"
    run.mkdir()
    assert rubrax_main(["forecast", "--gold", str(tmp_path / "gold.jsonl"), "--proxy", str(tmp_path / "proxy.jsonl"), "--out", str(run), "--betas", "8"]) == 0
    assert capsys.readouterr().out.startswith(f"forecast={run / 'forecast.jsonl'} peak_win_rate=")
    assert len((run / "forecast.jsonl").read_text().splitlines()) == 8
    (tmp_path / "short.jsonl").write_text(json.dumps({"prompt_id": "p0", "response_id": "p0-r0", "score": 0.1}) + "\n")
    assert rubrax_main(["forecast", "--gold", str(tmp_path / "gold.jsonl"), "--proxy", str(tmp_path / "short.jsonl"), "--out", str(run)]) == 2
    assert "grade different responses" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_id": "p0", "response_id": "x", "score": "high"}) + "\n")
    assert rubrax_main(["forecast", "--gold", str(tmp_path / "bad.jsonl"), "--proxy", str(tmp_path / "bad.jsonl"), "--out", str(run)]) == 2
    assert "bad.jsonl:1: field 'score'" in capsys.readouterr().err

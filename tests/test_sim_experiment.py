"""A few-step run of every arm of the tail-world experiment (tiny preset), the report
it writes, resuming, and `rubrax sim run` end to end."""

import csv
import json

import numpy as np
import pytest

from rubrax.sim.experiment import mid_cdf, run_experiment
from rubrax.sim.presets import ARM_LABELS, ARMS, get_preset
from rubrax.sim.report import per_seed_summary, write_report


def test_mid_cdf_counts_ties_half():
    base = np.sort(np.array([0.1, 0.2, 0.2, 0.5]))
    assert mid_cdf(base, np.array([0.2, 0.0, 0.6, 0.3])) == pytest.approx([(1 + 3) / 8, 0.0, 1.0, 3 / 4])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "tiny"
    cfg = get_preset("tiny")
    logs = []
    results = run_experiment(cfg, out, log=logs.append)
    return cfg, out, results, logs


def test_every_arm_runs_and_is_tracked(tiny_run):
    cfg, out, results, _ = tiny_run
    curves = results["curves"]
    assert {r["arm"] for r in curves} == set(ARMS)
    for arm in ARMS:
        rows = sorted((r for r in curves if r["arm"] == arm), key=lambda r: r["step"])
        finals = [r for r in rows if r.get("final")]
        assert len(finals) == 1 and finals[0]["step"] == (cfg.sft.great_steps if arm == "sft_great" else cfg.rl_steps)
        for r in rows:
            assert 0.0 <= r["win_rate"] <= 1.0 and np.isfinite(r["gold"]) and np.isfinite(r["kl"])
        if arm != "sft_great":
            assert len(rows) == cfg.rl_steps + 1
            assert all(np.isfinite(r["proxy"]) for r in rows)
            # the first rollouts come from the base policy itself: KL 0, win rate near 1/2
            assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    regions = {(r["arm"], r["region"]) for r in results["agreement"]}
    assert ("rubric_4_great_diverse", "high") in regions and ("bt_off_policy", "low") in regions
    theory_arms = {r["arm"] for r in results["theory"]}
    assert "gold" in theory_arms and "rubric_initial" in theory_arms
    gold_th = sorted((r for r in results["theory"] if r["arm"] == "gold"), key=lambda r: r["kl"])
    # Proposition 1 with the gold reward itself as proxy: tilting can only help
    assert gold_th[-1]["win_rate"] > 0.6 and gold_th[0]["win_rate"] == pytest.approx(0.5, abs=0.05)


def test_report_files_and_tables(tiny_run):
    cfg, out, results, _ = tiny_run
    path = write_report(out, cfg, results, command="pytest", commit="abc123")
    text = path.read_text()
    for arm in ARMS:
        assert ARM_LABELS[arm] in text
    for name in ("curves.csv", "table1.csv", "table2.csv", "theory.csv", "config.json", "seeds.json", "commit.txt",
                 "fig4_winrate_vs_step.png", "fig4_winrate_vs_kl.png", "theory_vs_rl.png", "proxy_vs_gold.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "commit.txt").read_text().strip() == "abc123"
    assert json.loads((out / "config.json").read_text())["rl_steps"] == cfg.rl_steps
    with open(out / "table1.csv") as f:
        t1 = {r["arm"]: r for r in csv.DictReader(f)}
    summary = {r["arm"]: r for r in per_seed_summary(results["curves"])}
    assert float(t1["gold"]["final_win_rate_mean"]) == pytest.approx(summary["gold"]["final_win_rate"])
    assert len(list((out / "rubrics").glob("*.jsonl"))) == 5


def test_rerun_resumes_without_recomputing(tiny_run):
    cfg, out, results, _ = tiny_run
    logs = []
    again = run_experiment(cfg, out, log=logs.append)
    assert any("already complete" in line for line in logs)
    assert again["curves"] == results["curves"]


def test_cli_sim_run_resumes_and_prints_report_path(tiny_run, capsys):
    """`rubrax sim run` on the finished tiny run: nothing recomputed, report written, path printed."""
    from rubrax.cli import main

    _, out, _, _ = tiny_run
    rc = main(["sim", "run", "--preset", "tiny", "--out", str(out.parent), "--run", out.name])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("already complete" in line for line in lines)
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert (out / "report.md").exists()


def _report_without_wall_time(out, cfg, results):
    text = write_report(out, cfg, results, command="rubrax sim run --preset tiny", commit="same").read_text()
    return [line for line in text.splitlines() if "wall time" not in line]


@pytest.mark.slow
def test_sigkill_inside_an_arm_then_rerun_gives_the_uninterrupted_report(tiny_run, tmp_path):
    """`rubrax sim run --preset tiny` killed (SIGKILL) after the first checkpoint of an RL
    arm, then rerun: the arm resumes from its checkpoint (not from scratch) and the rows,
    tables and report equal those of the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, _, results, _ = tiny_run
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rubrax.cli", "sim", "run", "--preset", "tiny", "--out", str(tmp_path), "--run", "killed"]
    ckpts = run / "runs" / "seed0_gold" / "checkpoints"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 900
    while not (ckpts / "1").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first RL checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "arms" / "seed0_gold.jsonl").exists()  # killed inside the arm
    steps_logged = len((run / "runs" / "seed0_gold" / "metrics.jsonl").read_text().splitlines())
    assert 1 <= steps_logged < cfg.rl_steps
    rc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert rc.returncode == 0, rc.stderr[-2000:]
    logged = [json.loads(line)["step"] for line in (run / "runs" / "seed0_gold" / "metrics.jsonl").read_text().splitlines()]
    assert logged.count(0) == 1 and sorted(set(logged)) == list(range(cfg.rl_steps))  # resumed, not restarted
    again = run_experiment(cfg, run, log=lambda _: None)  # reads what the rerun wrote
    for key in ("curves", "agreement", "theory"):
        assert again[key] == results[key], key
    (tmp_path / "uninterrupted").mkdir()
    assert _report_without_wall_time(run, cfg, again) == _report_without_wall_time(tmp_path / "uninterrupted", cfg, results)

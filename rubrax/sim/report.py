"""The tail-world report: tables, figures and CSVs under results/<run>/.

    report.md                      the analogues of the paper's Table 1, Figure 4, Table 2
                                   and the theory link, with the numbers they rest on
    curves.csv                     per (seed, arm, step): gold, win_rate, proxy, kl, length
    table1.csv                     per arm: final and peak win rate, mean and spread over seeds
    table2.csv                     per (arm, region): agreement with gold preferences
    theory.csv                     per (seed, arm, beta): Proposition 1's prediction
    fig4_winrate_vs_step.png, fig4_winrate_vs_kl.png, theory_vs_rl.png, proxy_vs_gold.png
    config.json, seeds.json, commit.txt

Definitions (also printed in report.md):
* final win rate: on fresh samples after the last update (step = rl_steps);
* peak win rate: the maximum over steps of the 3-step moving average of the per-step
  win rate (smoothing keeps the max of a noisy curve from being pure noise);
* spread: standard deviation over seeds (and min..max).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rubrax.sim.presets import ARM_LABELS, SimConfig

CURVE_FIELDS = ("seed", "arm", "step", "gold", "win_rate", "win_rate_se", "proxy", "proxy_invalid", "kl", "length", "final")


def git_commit(repo: str | Path | None = None) -> str:
    """HEAD's commit (plus '-dirty' when the tree has changes), or 'unknown' outside git."""
    cwd = str(repo or Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})


def _fmt(mean: float, sd: float) -> str:
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if not math.isnan(x)], float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _by(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping[str, Any]]]:
    out: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _moving_average(x: np.ndarray, k: int = 3) -> np.ndarray:
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def per_seed_summary(curves: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (seed, arm): start/final/peak win rate, gold, proxy, KL."""
    out = []
    for (seed, arm), rows in sorted(_by(curves, "seed", "arm").items()):
        rows = sorted(rows, key=lambda r: (r["step"], bool(r.get("final"))))
        final = [r for r in rows if r.get("final")][-1]
        steps = [r for r in rows if not r.get("final")] or rows
        win = np.array([r["win_rate"] for r in steps])
        ma = _moving_average(win)
        i_peak = int(np.argmax(ma))
        peak_step = steps[i_peak + (len(win) - len(ma)) // 2]["step"] if len(ma) else steps[0]["step"]
        proxy = np.array([r["proxy"] for r in steps], float)
        out.append({
            "seed": seed, "arm": arm, "start_win_rate": float(win[0]), "final_win_rate": final["win_rate"],
            "peak_win_rate": float(ma.max()), "peak_step": int(peak_step), "final_gold": final["gold"],
            "start_gold": steps[0]["gold"], "final_kl": final["kl"], "start_proxy": float(proxy[0]),
            "final_proxy": final["proxy"], "peak_proxy": float(np.nanmax(proxy)) if np.isfinite(proxy).any() else math.nan,
            "final_length": final["length"],
        })
    return out


def table1(summary: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    by_arm = _by(summary, "arm")
    for arm in arms:
        rs = by_arm.get((arm,), [])
        if not rs:
            continue
        row: dict[str, Any] = {"arm": arm, "label": ARM_LABELS.get(arm, arm), "seeds": len(rs)}
        for key in ("final_win_rate", "peak_win_rate", "final_gold", "final_kl", "start_proxy", "final_proxy", "peak_step", "final_length"):
            m, s = _mean_sd([r[key] for r in rs])
            row[f"{key}_mean"], row[f"{key}_sd"] = m, s
        fw = [r["final_win_rate"] for r in rs]
        row["final_win_rate_min"], row["final_win_rate_max"] = min(fw), max(fw)
        rows.append(row)
    return rows


def table2(agreement: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    by = _by(agreement, "arm", "region")
    for arm in arms:
        row: dict[str, Any] = {"arm": arm, "label": ARM_LABELS.get(arm, arm)}
        for region in ("high", "low"):
            rs = by.get((arm, region), [])
            m, s = _mean_sd([r["agreement"] for r in rs])
            row[f"{region}_mean"], row[f"{region}_sd"] = m, s
            row[f"{region}_pairs"] = sum(r["pairs"] for r in rs)
            row[f"{region}_ties"] = float(np.mean([r["proxy_ties"] for r in rs])) if rs else math.nan
        if rs or not math.isnan(row["high_mean"]):
            rows.append(row)
    return rows


def theory_vs_rl(theory: Sequence[Mapping[str, Any]], curves: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (seed, arm): how Proposition 1's prediction compares with the GRPO run.

    The prediction is a curve win(KL) for KL in [0, KL_max], KL_max <= log n (the
    empirical base cannot express more). For every RL step whose KL falls in (0, KL_max]
    the predicted win rate at that KL is interpolated and compared with the observed one
    (`mean_error` = mean observed - predicted, `points` = how many steps). Also the
    predicted peak (win rate, KL) next to the observed peak.
    """
    out = []
    th = _by(theory, "seed", "arm")
    cv = _by(curves, "seed", "arm")
    for r in summary:
        pts = th.get((r["seed"], r["arm"]))
        if not pts:
            continue
        pts = sorted(pts, key=lambda p: p["kl"])
        kl = np.array([p["kl"] for p in pts])
        win = np.array([p["win_rate"] for p in pts])
        steps = [c for c in cv.get((r["seed"], r["arm"]), []) if 0 < c["kl"] <= kl.max()]
        err = [c["win_rate"] - float(np.interp(c["kl"], kl, win)) for c in steps]
        out.append({"seed": r["seed"], "arm": r["arm"], "max_predictable_kl": float(kl.max()), "points": len(err),
                    "mean_error": float(np.mean(err)) if err else math.nan,
                    "mean_abs_error": float(np.mean(np.abs(err))) if err else math.nan,
                    "predicted_peak_win_rate": float(win.max()), "predicted_peak_kl": float(kl[int(np.argmax(win))]),
                    "observed_peak_win_rate": r["peak_win_rate"], "observed_final_win_rate": r["final_win_rate"],
                    "final_kl": r["final_kl"]})
    return out


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() > 0 and ry.std() > 0 else math.nan


# ----------------------------------------------------------------------------- figures


def _colors(arms: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _curve_mean(curves: Sequence[Mapping[str, Any]], arm: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    by_step = _by([r for r in curves if r["arm"] == arm and not (r.get("final") and r["arm"] != "sft_great")], "step")
    steps = np.array(sorted(s for (s,) in by_step))
    vals = [[r[key] for r in by_step[(s,)]] for s in steps]
    return steps, np.array([np.nanmean(v) for v in vals]), np.array([np.nanstd(v) for v in vals])


def figures(out: Path, curves: Sequence[Mapping[str, Any]], theory: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(arms)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms:
        s, m, sd = _curve_mean(curves, arm, "win_rate")
        if len(s):
            style = "--" if arm.startswith("bt") else (":" if arm in ("gold", "sft_great") else "-")
            ax.plot(s, m, style, color=colors[arm], label=ARM_LABELS.get(arm, arm))
            ax.fill_between(s, m - sd, m + sd, color=colors[arm], alpha=0.12)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set(xlabel="RL step (SFT arm: SFT step)", ylabel="gold win rate vs base policy", title="Win rate along training (mean ± sd over seeds)")
    ax.legend(fontsize=7, loc="best")
    paths.append(out / "fig4_winrate_vs_step.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms:
        s, m, _ = _curve_mean(curves, arm, "win_rate")
        _, k, _ = _curve_mean(curves, arm, "kl")
        if len(s):
            style = "--" if arm.startswith("bt") else (":" if arm in ("gold", "sft_great") else "-")
            ax.plot(k, m, style + "o", ms=2, color=colors[arm], label=ARM_LABELS.get(arm, arm))
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set(xlabel="KL(policy || base) per response (nats, k1 estimate)", ylabel="gold win rate vs base", title="Win rate against KL")
    ax.legend(fontsize=7, loc="best")
    paths.append(out / "fig4_winrate_vs_kl.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)

    proxy_arms = [a for a in arms if any(r["arm"] == a for r in theory)]
    if proxy_arms:
        cols = min(5, len(proxy_arms))
        rows_n = -(-len(proxy_arms) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
        for ax, arm in zip(axes.flat, proxy_arms):
            for (seed,), pts in sorted(_by([r for r in theory if r["arm"] == arm], "seed").items()):
                pts = sorted(pts, key=lambda p: p["kl"])
                ax.plot([p["kl"] for p in pts], [p["win_rate"] for p in pts], "-", color="k", lw=1, alpha=0.6,
                        label="theory (Prop. 1 on base samples)" if seed == min(r["seed"] for r in theory) else None)
            for (seed,), rs in sorted(_by([r for r in curves if r["arm"] == arm], "seed").items()):
                rs = sorted(rs, key=lambda r: (r["step"], bool(r.get("final"))))
                ax.plot([r["kl"] for r in rs], [r["win_rate"] for r in rs], "o-", ms=2, lw=0.8, color=colors[arm], alpha=0.8,
                        label="GRPO run" if seed == min(r["seed"] for r in curves) else None)
            ax.axhline(0.5, color="gray", lw=0.5)
            ax.set_title(ARM_LABELS.get(arm, arm), fontsize=8)
            ax.set_xlabel("KL (nats)", fontsize=7); ax.set_ylabel("win rate", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(proxy_arms):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("Theory link: tilted policy predicted from base samples vs the RL curve", fontsize=9)
        paths.append(out / "theory_vs_rl.png")
        fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)

    rl_arms = [a for a in arms if a != "sft_great"]
    cols = min(5, len(rl_arms))
    rows_n = -(-len(rl_arms) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    for ax, arm in zip(axes.flat, rl_arms):
        s, g, _ = _curve_mean(curves, arm, "gold")
        _, p, _ = _curve_mean(curves, arm, "proxy")
        ax.plot(s, g, color="k", label="gold")
        ax2 = ax.twinx()
        ax2.plot(s, p, color=colors[arm], ls="--", label="proxy")
        ax.set_title(ARM_LABELS.get(arm, arm), fontsize=8)
        ax.tick_params(labelsize=6); ax2.tick_params(labelsize=6, colors=colors[arm])
    for ax in list(axes.flat)[len(rl_arms):]:
        ax.axis("off")
    fig.suptitle("Gold (black, left axis) and proxy (colour, right axis) reward along RL", fontsize=9)
    paths.append(out / "proxy_vs_gold.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=120); plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- report.md


def _findings(t1: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], tvr: Sequence[Mapping[str, Any]]) -> list[str]:
    by = {r["arm"]: r for r in t1}
    lines = []
    if "bt_off_policy" in by:
        rs = [r for r in summary if r["arm"] == "bt_off_policy"]
        drops = [r["peak_win_rate"] - r["final_win_rate"] for r in rs]
        proxy_up = [r["final_proxy"] - r["start_proxy"] for r in rs]
        gold_d = [r["final_gold"] - r["start_gold"] for r in rs]
        lines.append(
            "BT on off-policy great pairs: per seed, proxy change start->final "
            + ", ".join(f"{d:+.3f}" for d in proxy_up) + "; gold change start->final "
            + ", ".join(f"{d:+.3f}" for d in gold_d) + "; win-rate drop peak->final "
            + ", ".join(f"{100 * d:+.1f} pts" for d in drops) + "."
        )
    if "rubric_4_great_diverse" in by and "rubric_initial" in by:
        a, b = by["rubric_4_great_diverse"], by["rubric_initial"]
        diff = a["final_win_rate_mean"] - b["final_win_rate_mean"]
        spread = max(a["final_win_rate_sd"], b["final_win_rate_sd"])
        per_seed = {}
        for r in summary:
            if r["arm"] in ("rubric_4_great_diverse", "rubric_initial"):
                per_seed.setdefault(r["seed"], {})[r["arm"]] = r["final_win_rate"]
        paired = [v["rubric_4_great_diverse"] - v["rubric_initial"] for v in per_seed.values() if len(v) == 2]
        lines.append(
            f"4 great & diverse pairs vs initial rubric, final win rate: {100 * a['final_win_rate_mean']:.1f}% vs "
            f"{100 * b['final_win_rate_mean']:.1f}% (difference {100 * diff:+.1f} pts; seed sd up to {100 * spread:.1f} pts; "
            f"paired per-seed differences " + ", ".join(f"{100 * d:+.1f}" for d in paired) + " pts)."
        )
    ok = [r for r in tvr if r["points"]]
    if ok:
        err = np.array([r["mean_error"] for r in ok])
        lines.append(
            f"Theory link, along the RL path where KL <= log n: observed minus predicted win rate averages "
            f"{100 * err.mean():+.1f} pts over {len(ok)} runs (mean |error| {100 * np.mean([r['mean_abs_error'] for r in ok]):.1f} pts, "
            f"{sum(r['points'] for r in ok)} steps)."
        )
    arms = sorted({r["arm"] for r in tvr})
    if len(arms) >= 3:
        pred = [np.mean([r["predicted_peak_win_rate"] for r in tvr if r["arm"] == a]) for a in arms]
        obs = [np.mean([r["observed_peak_win_rate"] for r in tvr if r["arm"] == a]) for a in arms]
        fin = [np.mean([r["observed_final_win_rate"] for r in tvr if r["arm"] == a]) for a in arms]
        lines.append(
            f"Across the {len(arms)} proxies, Spearman correlation of the predicted peak win rate with the observed "
            f"peak win rate: {_spearman(pred, obs):.2f}; with the observed final win rate: {_spearman(pred, fin):.2f}."
        )
    return lines


def write_report(
    out_dir: str | Path, cfg: SimConfig, results: Mapping[str, Any], *, command: str = "", commit: str | None = None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves, agreement, theory, base = results["curves"], results["agreement"], results["theory"], results["base"]
    arms = [a for a in cfg.arms if any(r["arm"] == a for r in curves)]
    summary = per_seed_summary(curves)
    t1 = table1(summary, arms)
    t2 = table2(agreement, arms)
    tvr = theory_vs_rl(theory, curves, summary)
    commit = commit or git_commit()

    _write_csv(out / "curves.csv", sorted(curves, key=lambda r: (r["seed"], arms.index(r["arm"]) if r["arm"] in arms else 99, r["step"])), CURVE_FIELDS)
    _write_csv(out / "table1.csv", t1, list(t1[0]) if t1 else ["arm"])
    _write_csv(out / "table2.csv", t2, list(t2[0]) if t2 else ["arm"])
    _write_csv(out / "theory.csv", theory, ["seed", "arm", "beta", "kl", "win_rate", "gold"])
    _write_csv(out / "theory_vs_rl.csv", tvr, list(tvr[0]) if tvr else ["arm"])
    _write_csv(out / "per_seed.csv", summary, list(summary[0]) if summary else ["arm"])
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    (out / "seeds.json").write_text(json.dumps({"seeds": list(cfg.seeds), "world_seeds": [cfg.world.seed + s for s in cfg.seeds]}))
    (out / "commit.txt").write_text(commit + "\n")
    figs = figures(out, curves, theory, arms)

    md = [f"# Tail world: the paper's comparison on a synthetic task ({cfg.name} preset)", ""]
    md += [f"- command: `{command}`" if command else "", f"- git commit: `{commit}`",
           f"- seeds: {list(cfg.seeds)} (each replicates the whole pipeline: world draw, base policy, data, rubrics, reward models, RL)",
           f"- wall time: {results.get('elapsed_s', float('nan')):.0f} s", ""]
    if base:
        md += ["## Base policy", "",
               "| seed | mean gold | advanced requirements met | P(any excellent requirement met) |", "|---|---|---|---|"]
        md += [f"| {b['seed']} | {b['gold_mean']:.3f} | {100 * b['advanced_frac']:.1f}% | {100 * b['excellent_any']:.2f}% |" for b in base]
        md += [""]
    md += ["## Table 1 analogue: gold win rate against the base policy (%)", "",
           f"GRPO (rubrax.rl.loop.train), {cfg.rl_steps} steps x {cfg.world.n_prompts} prompts x {cfg.rl.group_size} rollouts, "
           f"lr {cfg.optim.learning_rate}, "
           f"KL coef {cfg.rl.kl_coef}, identical for every RL arm. SFT arm: {cfg.sft.great_steps} SFT steps on great responses. "
           "Win rate = P(policy sample's gold > base sample's gold), ties half. mean ± sd over seeds.", "",
           "| arm | final win rate | peak win rate (step) | final gold | final KL | proxy start -> final | final length |",
           "|---|---|---|---|---|---|---|"]
    for r in t1:
        proxy = "-" if math.isnan(r["final_proxy_mean"]) else f"{r['start_proxy_mean']:.3f} -> {r['final_proxy_mean']:.3f}"
        md.append(
            f"| {r['label']} | {_fmt(r['final_win_rate_mean'], r['final_win_rate_sd'])} | "
            f"{_fmt(r['peak_win_rate_mean'], r['peak_win_rate_sd'])} ({r['peak_step_mean']:.0f}) | "
            f"{r['final_gold_mean']:.3f} | {r['final_kl_mean']:.2f} | {proxy} | {r['final_length_mean']:.1f} |"
        )
    md += ["", "Final = fresh samples after the last update; peak = max over steps of the 3-step moving average "
           "of the per-step win rate (on that step's rollouts).", ""]
    md += ["## Figure 4 analogue", "", "![win rate vs step](fig4_winrate_vs_step.png)", "",
           "![win rate vs KL](fig4_winrate_vs_kl.png)", "", "![proxy vs gold](proxy_vs_gold.png)", ""]
    md += ["## Table 2 analogue: agreement with gold preferences (%)", "",
           "Pairs drawn within the high-gold half and within the low-gold half of a pool of base, good and great "
           "responses per prompt (exact gold order; `rubrax.eval.agreement`, a proxy tie earns no credit).", "",
           "| proxy | high-reward pairs | low-reward pairs | ties (high / low) |", "|---|---|---|---|"]
    for r in t2:
        md.append(f"| {r['label']} | {_fmt(r['high_mean'], r['high_sd'])} | {_fmt(r['low_mean'], r['low_sd'])} | "
                  f"{100 * r['high_ties']:.0f}% / {100 * r['low_ties']:.0f}% |")
    md += ["", "## Theory link", "",
           "For each proxy, `rubrax.theory.tilted_from_samples(gold, proxy, beta)` on the base samples predicts the "
           "tilted policy's win rate and KL (Proposition 1); the GRPO run's (KL, win rate) path is drawn beside it. "
           "The empirical base can only express KL up to log n.", "", "![theory vs RL](theory_vs_rl.png)", "",
           "| arm | seed | predicted peak win rate (at KL) | observed peak | observed final (at KL) | "
           "observed - predicted, steps with KL <= log n (steps) |", "|---|---|---|---|---|---|"]
    for r in sorted(tvr, key=lambda r: (arms.index(r["arm"]) if r["arm"] in arms else 99, r["seed"])):
        err = "n/a" if math.isnan(r["mean_error"]) else f"{100 * r['mean_error']:+.1f} ({r['points']})"
        md.append(f"| {ARM_LABELS.get(r['arm'], r['arm'])} | {r['seed']} | {100 * r['predicted_peak_win_rate']:.1f} ({r['predicted_peak_kl']:.2f}) | "
                  f"{100 * r['observed_peak_win_rate']:.1f} | {100 * r['observed_final_win_rate']:.1f} ({r['final_kl']:.1f}) | {err} |")
    md += ["", "## Findings (computed from the tables above)", ""]
    md += [f"- {line}" for line in _findings(t1, summary, tvr)]
    md += ["", "## Files", ""] + [f"- `{p.name}`" for p in figs] + [
        "- `curves.csv`, `per_seed.csv`, `table1.csv`, `table2.csv`, `theory.csv`, `theory_vs_rl.csv`",
        "- `config.json`, `seeds.json`, `commit.txt`, `arms/` (raw per-arm rows), `rubrics/` (every rubric, JSONL)", ""]
    path = out / "report.md"
    path.write_text("\n".join(line for line in md if line is not None))
    return path

"""`rubrax report RUN [--out DIR]`: PNG figures and a short report.md from a run folder.

Reads any of (whatever is there; a figure whose data is missing is skipped and named):
  RUN/metrics.jsonl    a `rubrax.rl.loop.train` run: training metrics per step
                       (reward_mean, kl, response_len_mean, zero_var_frac, reward_invalid,
                       per-criterion "rubric/..." rates) and "eval/..." records (the gold
                       monitor's eval/gold, eval/proxy, eval/kl; eval/win_rate)
  RUN/arms/*.jsonl     a tail-world run (`rubrax sim run`): per-arm curves (proxy, gold,
                       win rate, KL, length per step) and the theory rows (the forecast)
  RUN/forecast.jsonl   the theory's forecast (`rubrax.forecast.write_forecast`)
  RUN/criteria.jsonl   per-criterion verdict counts per step (`rubrax.rl.monitor.CriteriaLog`;
                       a tail-world run has one per rubric arm under RUN/runs/seed<s>_<arm>/)

Figures: reward (proxy) and gold against step and against KL, with gold's peak marked;
response length against step; the zero-variance group fraction and the invalid-reward
rate; per-criterion pass rates over training (saturated criteria are the ties rubric
refinement targets); the forecast (predicted win rate against KL) beside the measured
path. Writes into DIR (default RUN/report/, so a tail-world run's own report.md stays).
Host side: numpy and matplotlib, no jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIM_EXTRA = ("agreement", "theory", "base")
SATURATED = 0.95  # a criterion met this often over the last quarter of training is saturated


@dataclasses.dataclass
class Curves:
    """One arm of a run: `train[key]` and `eval[key]` are (steps, values) arrays.

    Canonical keys: train "reward" (training reward = proxy), "gold" (tail world: gold of
    the training rollouts), "kl", "length", "zero_var_frac", "invalid_frac", "win_rate";
    eval "gold", "proxy", "kl", "win_rate", "reward_mean".
    """

    name: str
    train: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    eval: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    # True when the training KL is the update's per-token mean (no per-sequence seq_kl
    # logged): not on the scale of eval/kl or of the theory's sequence-level KL.
    kl_per_token: bool = False


@dataclasses.dataclass
class RunData:
    kind: str  # "train" | "sim"
    arms: list[Curves]
    forecast: dict[str, list[dict[str, Any]]]  # label -> rows {kl, win_rate, gold} sorted by kl
    criteria: list[dict[str, Any]]  # rows {step, prompt_id, criterion, yes, no, unknown}


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (line_no, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                break  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
    return rows


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of `key`, last record per step winning (a resumed run rewrites steps)."""
    by_step = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            by_step[int(r["step"])] = float(v)
    if not by_step:
        return None
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def load_train_run(run: str) -> Curves:
    """The curves of a train() run folder's metrics.jsonl."""
    rows = _read_jsonl(os.path.join(run, "metrics.jsonl"))
    c = Curves(os.path.basename(os.path.normpath(run)))
    seq_kl = _series(rows, "seq_kl")
    if seq_kl is not None:
        c.train["kl"] = seq_kl
    c.kl_per_token = seq_kl is None and _series(rows, "kl") is not None
    for canon, key in (("reward", "reward_mean"), ("kl", "kl" if seq_kl is None else "seq_kl"), ("length", "response_len_mean"),
                       ("zero_var_frac", "zero_var_frac"), ("invalid_frac", "reward_invalid_frac"),
                       ("is_log_ratio_abs_mean", "is_log_ratio_abs_mean")):
        s = _series(rows, key)
        if s is not None:
            c.train[canon] = s
    if "invalid_frac" not in c.train:  # older runs log the count only
        s, rows_per_step = _series(rows, "reward_invalid"), _rows_per_step(run)
        if s is not None and rows_per_step:
            c.train["invalid_frac"] = (s[0], s[1] / rows_per_step)
    for key in {k for r in rows for k in r if k.startswith("eval/")}:
        s = _series(rows, key)
        if s is not None:
            c.eval[key.removeprefix("eval/")] = s
    for key in {k for r in rows for k in r if k.startswith("rubric/")}:
        c.train[key] = _series(rows, key)
    return c


def _rows_per_step(run: str) -> int | None:
    """P * G from the run's recipe (config.json / checkpoint extra), when one is there."""
    for name in ("config.json", "recipe.json"):
        path = os.path.join(run, name)
        if os.path.exists(path):
            try:
                cfg = json.load(open(path))
                return int(cfg["loop"]["prompts_per_step"]) * int(cfg["rl"]["group_size"])
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                return None
    return None


def load_sim_run(run: str) -> tuple[list[Curves], dict[str, list[dict[str, Any]]]]:
    """Per-arm curves (means over seeds per step; the final evaluation row is left out)
    and the theory rows (means over seeds per beta index) of a tail-world run."""
    curves: dict[str, list[dict]] = defaultdict(list)
    theory: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run, "arms", "seed*_*.jsonl"))):
        arm = re.sub(r"^seed\d+_", "", os.path.basename(path)[:-6])
        if arm == "theory":
            for r in _read_jsonl(path):
                theory[r["arm"]].append(r)
        elif arm not in SIM_EXTRA:
            # As the testbed's own report: an RL arm's final evaluation (more samples, after
            # the last step) is not a point of its curve; the SFT arm's evaluations all are.
            curves[arm] += [r for r in _read_jsonl(path) if not r.get("final") or arm == "sft_great"]
    arms = []
    for arm, rows in curves.items():
        c = Curves(arm)
        for canon, key in (("reward", "proxy"), ("gold", "gold"), ("kl", "kl"), ("length", "length"), ("win_rate", "win_rate")):
            steps, values = _mean_by_step(rows, key)
            if len(steps):  # the SFT arm has no proxy
                c.train[canon] = steps, values
        c.train.update(_sim_update_metrics(run, arm))
        arms.append(c)
    forecast = {arm: _mean_theory(rows) for arm, rows in theory.items()}
    return arms, forecast


def _sim_update_metrics(run: str, arm: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """zero_var_frac / invalid_frac of a tail-world arm's train() runs (RUN/runs/seed<s>_<arm>/
    metrics.jsonl), means over seeds per step."""
    rows = []
    for path in glob.glob(os.path.join(run, "runs", f"seed*_{arm}", "metrics.jsonl")):
        rows += [r for r in _read_jsonl(path) if "zero_var_frac" in r]
    out = {}
    for canon, key in (("zero_var_frac", "zero_var_frac"), ("invalid_frac", "reward_invalid_frac")):
        steps, values = _mean_by_step(rows, key)
        if len(steps):
            out[canon] = steps, values
    return out


def _mean_by_step(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    by: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None and math.isfinite(float(r[key])):
            by[int(r["step"])].append(float(r[key]))
    steps = np.array(sorted(by))
    return steps, np.array([np.mean(by[s]) for s in steps])


def _mean_theory(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Seed means per beta index (every seed uses the same number of betas)."""
    per_seed: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        per_seed[r.get("seed", 0)].append(r)
    k = min(len(v) for v in per_seed.values())
    out = [{key: float(np.mean([v[i][key] for v in per_seed.values()])) for key in ("kl", "win_rate", "gold")} for i in range(k)]
    return sorted(out, key=lambda r: r["kl"])


def load_run(run: str) -> RunData:
    """Everything `rubrax report` reads from a run folder (see the module docstring)."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"rubrax report: no run folder {run}")
    forecast: dict[str, list[dict]] = {}
    if os.path.exists(os.path.join(run, "metrics.jsonl")):
        kind, arms = "train", [load_train_run(run)]
    elif glob.glob(os.path.join(run, "arms", "seed*_*.jsonl")):
        kind, (arms, forecast) = "sim", load_sim_run(run)
    else:
        raise FileNotFoundError(f"rubrax report: {run} has neither metrics.jsonl nor arms/seed*_*.jsonl")
    path = os.path.join(run, "forecast.jsonl")
    if os.path.exists(path):
        for r in _read_jsonl(path):
            forecast.setdefault(str(r.get("label", "forecast")), []).append(r)
        forecast = {k: sorted(v, key=lambda r: r["kl"]) for k, v in forecast.items()}
    path = os.path.join(run, "criteria.jsonl")
    criteria = _read_jsonl(path) if os.path.exists(path) else []
    for path in sorted(glob.glob(os.path.join(run, "runs", "seed*_*", "criteria.jsonl"))):  # tail world: per arm
        arm = os.path.basename(os.path.dirname(path))
        criteria += [{**r, "prompt_id": f"{arm}:{r['prompt_id']}"} for r in _read_jsonl(path)]
    return RunData(kind, arms, forecast, criteria)


# ----------------------------------------------------------------------------- numbers


def gold_peak(c: Curves) -> tuple[int, float] | None:
    """(step, value) of the highest gold: the gold monitor's eval/gold if present, else the
    training rollouts' gold (tail world)."""
    s = c.eval.get("gold") or c.train.get("gold")
    if s is None or not len(s[0]):
        return None
    i = int(np.nanargmax(s[1]))
    return int(s[0][i]), float(s[1][i])


def criterion_rates(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(prompt_id, criterion) -> (steps, pass rate yes / (yes + no)) from criteria.jsonl rows."""
    acc: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        cell = acc[(str(r["prompt_id"]), str(r["criterion"]))][int(r["step"])]
        cell[0] += int(r.get("yes", 0))
        cell[1] += int(r.get("yes", 0)) + int(r.get("no", 0))
    out = {}
    for key, by_step in acc.items():
        steps = np.array(sorted(s for s in by_step if by_step[s][1]))
        if len(steps):
            out[key] = steps, np.array([by_step[s][0] / by_step[s][1] for s in steps])
    return out


def saturated(rates: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, str]]:
    """Criteria passed >= SATURATED of the time over the last quarter of their steps."""
    out = []
    for key, (steps, r) in rates.items():
        late = r[steps >= steps.min() + 0.75 * (steps.max() - steps.min())]
        if len(late) and late.mean() >= SATURATED:
            out.append(key)
    return sorted(out)


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _mark_peak(ax, c: Curves, color) -> None:
    peak = gold_peak(c)
    if peak is not None:
        ax.axvline(peak[0], color=color, lw=0.8, ls=":")
        ax.annotate(f"gold peak @ {peak[0]}", (peak[0], peak[1]), fontsize=7, color=color,
                    xytext=(3, 3), textcoords="offset points")


def fig_reward_gold(data: RunData, out: str, x: str) -> str | None:
    """Proxy (training reward; held-out proxy as markers) and gold against step (x="step")
    or KL (x="kl"); one panel each, drawn only where there is data."""
    plt = _plt()
    panels = []
    for title, train_key, eval_key in (("proxy (training reward)", "reward", "proxy"), ("gold", "gold", "gold")):
        lines = []
        for c, color in zip(data.arms, _colors(len(data.arms))):
            for src, key, style, label in ((c.train, train_key, "-", c.name), (c.eval, eval_key, "o--", f"{c.name} (held-out)")):
                if x == "kl" and src is c.train and c.kl_per_token and "kl" in c.eval:
                    continue  # a per-token KL would share the axis with per-sequence ones
                xs = _x_values(src, src.get(key), x)
                if xs is not None:
                    lines.append((xs, src[key][1], style, color, label, c))
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for xs, ys, style, color, label, c in lines:
            ax.plot(xs, ys, style, color=color, label=label, ms=3, lw=1.2)
        if title == "gold" and x == "step":
            for c, color in zip(data.arms, _colors(len(data.arms))):
                _mark_peak(ax, c, color)
        ax.set_xlabel("RL step" if x == "step" else "KL(pi || pi0) per sequence"
                      + (" (training: per-token mean)" if any(c.kl_per_token and "kl" not in c.eval for c in data.arms) else ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, out, f"reward_gold_vs_{x}.png")


def _x_values(src: Mapping[str, tuple[np.ndarray, np.ndarray]], s, x: str) -> np.ndarray | None:
    """The x of series s: its steps, or the KL logged at those steps (same source)."""
    if s is None:
        return None
    if x == "step":
        return s[0]
    kl = src.get("kl")
    if kl is None:
        return None
    lookup = dict(zip(kl[0].tolist(), kl[1].tolist()))
    xs = np.array([lookup.get(int(t), np.nan) for t in s[0]])
    return xs if np.isfinite(xs).any() else None


def fig_lines(data: RunData, out: str, keys: Sequence[tuple[str, str]], name: str) -> str | None:
    """One panel per (key, title) of training curves against step."""
    plt = _plt()
    present = [(k, t) for k, t in keys if any(k in c.train for c in data.arms)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        for c, color in zip(data.arms, _colors(len(data.arms))):
            if key in c.train:
                ax.plot(*c.train[key], color=color, label=c.name, lw=1.2)
        if key.endswith("_frac"):  # a rate: its scale starts at 0 (an all-zero curve reads as 0, not as noise)
            top = max(float(np.nanmax(c.train[key][1])) for c in data.arms if key in c.train)
            ax.set_ylim(0, max(0.05, 1.1 * top))
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, name)


def fig_criteria(data: RunData, out: str, max_rows: int = 40, max_cols: int = 25) -> str | None:
    """Heat map of per-criterion pass rates: rows are criteria (by their late pass rate,
    highest first), columns are step bins (at most max_cols, pooling the verdicts of a bin:
    one step's few samples per prompt are noisy)."""
    rates = criterion_rates(data.criteria)
    if not rates:
        return None
    plt = _plt()
    steps = np.array(sorted({int(s) for st, _ in rates.values() for s in st}))
    edges = np.unique(np.linspace(steps[0], steps[-1] + 1, min(max_cols, len(steps)) + 1).astype(int))
    counts = _binned_counts(data.criteria, edges)
    late = lambda k: float(np.nanmean(counts[k][0][-max(1, len(edges) // 4):] / np.maximum(counts[k][1][-max(1, len(edges) // 4):], 1)))
    keys = sorted(counts, key=lambda k: -late(k))[:max_rows]
    grid = np.array([np.where(counts[k][1] > 0, counts[k][0] / np.maximum(counts[k][1], 1), np.nan) for k in keys])
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.22 * len(keys)))
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                   extent=(edges[0] - 0.5, edges[-1] - 0.5, len(keys) - 0.5, -0.5))
    sat = set(saturated(rates))
    ax.set_yticks(range(len(keys)), [f"{'* ' if k in sat else ''}{k[0]}/{k[1]}" for k in keys], fontsize=6)
    ax.set_xlabel("RL step")
    ax.set_title("per-criterion pass rate (* = saturated: the ties refinement targets)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, out, "criteria_pass_rates.png")


def _binned_counts(rows: Sequence[Mapping[str, Any]], edges: np.ndarray) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(prompt_id, criterion) -> (yes per step bin, known verdicts per step bin)."""
    out: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for r in rows:
        key = (str(r["prompt_id"]), str(r["criterion"]))
        yes, known = out.setdefault(key, (np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)))
        b = int(np.clip(np.searchsorted(edges, int(r["step"]), side="right") - 1, 0, len(edges) - 2))
        yes[b] += int(r.get("yes", 0))
        known[b] += int(r.get("yes", 0)) + int(r.get("no", 0))
    return {k: v for k, v in out.items() if v[1].sum() > 0}


def fig_forecast(data: RunData, out: str) -> str | None:
    """Predicted win rate and expected gold against KL (lines) beside the run's measured
    (KL, win rate) and (KL, gold) paths (points; held-out evaluations when there are)."""
    if not data.forecast:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted(set(data.forecast) | {c.name for c in data.arms})
    color = dict(zip(names, _colors(len(names))))
    for ax, key, ylabel in ((axes[0], "win_rate", "win rate vs base"), (axes[1], "gold", "expected gold")):
        for label, rows in data.forecast.items():
            ax.plot([r["kl"] for r in rows], [r[key] for r in rows], "-", color=color[label], lw=1.5, label=f"{label}: forecast")
        for c in data.arms:
            src = c.eval if key in c.eval else c.train
            xs = _x_values(src, src.get(key), "kl")
            if xs is None or (src is c.train and c.kl_per_token):
                continue
            target = c.name if c.name in data.forecast else (next(iter(data.forecast)) if len(data.forecast) == 1 else c.name)
            ax.plot(xs, src[key][1], "o", ms=3, color=color[target], alpha=0.7, label=f"{c.name}: measured")
        if key == "win_rate":
            ax.axhline(0.5, color="gray", lw=0.6, ls=":")
        ax.set_xlabel("KL(pi || pi0) per sequence")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Proposition 1 forecast from base samples vs the run (the forecast's KL is at most log n)")
    return _save(fig, out, "forecast.png")


# ----------------------------------------------------------------------------- report.md


def _first_last(s: tuple[np.ndarray, np.ndarray] | None) -> str:
    return "n/a" if s is None or not len(s[1]) else f"{s[1][0]:.3f} -> {s[1][-1]:.3f}"


def _value_at(s: tuple[np.ndarray, np.ndarray] | None, step: int) -> float:
    if s is None or not len(s[0]):
        return math.nan
    return float(s[1][int(np.argmin(np.abs(s[0] - step)))])


def arm_summary(c: Curves) -> dict[str, Any]:
    """The numbers of one arm's line in report.md."""
    gold = c.eval.get("gold") or c.train.get("gold")
    proxy = c.eval.get("proxy") or c.train.get("reward")  # at the evaluations of gold, when there are
    peak = gold_peak(c)
    row = {"arm": c.name, "steps": int(max((s[0].max() for s in c.train.values() if s is not None and len(s[0])), default=0)),
           "proxy": _first_last(c.train.get("reward")), "gold": _first_last(gold), "kl": _first_last(c.train.get("kl") or c.eval.get("kl")),
           "length": _first_last(c.train.get("length")), "gold_peak_step": None, "gold_peak": math.nan, "overoptimised": False}
    if peak is not None:
        row["gold_peak_step"], row["gold_peak"] = peak
        drop = peak[1] - gold[1][-1]
        rise = proxy[1][-1] - _value_at(proxy, peak[0]) if proxy is not None else math.nan
        row["overoptimised"] = bool(drop > 0 and rise > 0)
        row["gold_drop_after_peak"], row["proxy_rise_after_peak"] = float(drop), float(rise)
    for key in ("zero_var_frac", "invalid_frac"):
        if key in c.train:
            row[key] = float(np.mean(c.train[key][1]))
    return row


def _forecast_lines(data: RunData) -> list[str]:
    lines = []
    for label, rows in data.forecast.items():
        best = max(rows, key=lambda r: r["win_rate"])
        last = rows[-1] if rows[-1]["kl"] >= rows[0]["kl"] else rows[0]
        shape = "peaks then falls" if best["win_rate"] > max(r["win_rate"] for r in rows if r["kl"] >= 0.98 * last["kl"]) + 0.01 else "keeps rising"
        lines.append(f"- {label}: predicted win rate peaks at {best['win_rate']:.3f} at KL {best['kl']:.2f} "
                     f"(max predictable KL {max(r['kl'] for r in rows):.2f}: {shape})")
    return lines


def write_markdown(data: RunData, run: str, out: str, figures: Mapping[str, str | None]) -> str:
    lines = [f"# Run report: {os.path.basename(os.path.normpath(run))}", "",
             f"Source: `{run}` ({'tail-world run' if data.kind == 'sim' else 'rubrax.rl.loop.train run'}).", "",
             "| arm | steps | proxy first -> last | gold first -> last | gold peak (step) | KL | length | zero-var groups | invalid | over-optimised |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data.arms:
        r = arm_summary(c)
        peak = "n/a" if r["gold_peak_step"] is None else f"{r['gold_peak']:.3f} ({r['gold_peak_step']})"
        fmt = lambda k: f"{r[k]:.3f}" if k in r else "n/a"
        lines.append(f"| {r['arm']} | {r['steps']} | {r['proxy']} | {r['gold']} | {peak} | {r['kl']} | {r['length']} | "
                     f"{fmt('zero_var_frac')} | {fmt('invalid_frac')} | {'yes' if r['overoptimised'] else 'no'} |")
    lines += ["", "Over-optimised: gold ended below its peak while the proxy ended above its value at gold's peak "
              "(a flag on the curves as logged: on short, noisy runs read the figures).", ""]
    if data.forecast:
        lines += ["## Forecast (Proposition 1 on base samples)", "", *_forecast_lines(data), ""]
    rates = criterion_rates(data.criteria)
    if rates:
        sat = saturated(rates)
        lines += ["## Rubric criteria", "", f"{len(rates)} criteria tracked; {len(sat)} saturated (passed >= "
                  f"{SATURATED:.0%} over the last quarter of training): these ties are what refinement targets.", ""]
        lines += [f"- {pid}/{cid}" for pid, cid in sat[:30]] + [""]
    lines += ["## Figures", ""]
    for title, path in figures.items():
        lines.append(f"- {title}: " + (f"![{title}]({os.path.basename(path)})" if path else "not drawn (no data in this run)"))
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_report(run: str, out: str | None = None) -> tuple[str, dict[str, str | None]]:
    """Figures and report.md for a run folder; returns (report.md path, {title: png or None})."""
    data = load_run(run)
    out = out or os.path.join(run, "report")
    os.makedirs(out, exist_ok=True)
    figures = {
        "reward and gold against step": fig_reward_gold(data, out, "step"),
        "reward and gold against KL": fig_reward_gold(data, out, "kl"),
        "response length against step": fig_lines(data, out, [("length", "response length (tokens / words)")], "length_vs_step.png"),
        "zero-variance groups and invalid rewards": fig_lines(
            data, out, [("zero_var_frac", "zero-variance group fraction"), ("invalid_frac", "invalid-reward rate")], "groups_and_invalid.png"),
        "per-criterion pass rates": fig_criteria(data, out),
        "forecast against the measured path": fig_forecast(data, out),
    }
    return write_markdown(data, run, out, figures), figures


def main(args: argparse.Namespace) -> int:
    try:
        path, figures = write_report(args.run, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    drawn = [p for p in figures.values() if p]
    print(f"report={path} figures={len(drawn)} skipped={len(figures) - len(drawn)}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="figures and report.md from a run folder (metrics.jsonl or a tail-world run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (train_grpo --out, or rubrax sim run's folder)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    p.set_defaults(func=main)

"""report.md: the Table 1 analogue of a run and its training curves (PNG).

Table columns: the arm, its pool and number of RTD pairs, the mean number of criteria of
its rubrics, the last training reward and KL, the held-out win rate against the base
policy with its bootstrap interval, the position-flip rate of the judge (share of items
whose verdict changed with the display order), and the HealthBench-style score when one
was computed. Curves: training reward and KL against the RL step, one line per arm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "reward_mean" in r]


def _eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The eval hook's rows (eval/win_rate at a step), with step shifted to the plot's convention."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{**r, "step": r["step"] - 1} for r in rows if "eval/win_rate" in r]


def _mean_criteria(path: Path) -> float | None:
    from rubrax.data.rubrics import load_rubrics

    if not path.exists():
        return None
    rubrics = load_rubrics(path)
    return sum(len(r.criteria) for r in rubrics.values()) / max(1, len(rubrics))


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _plot(curves: dict[str, list[dict[str, Any]]], key: str, path: Path, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rows in curves.items():
        ax.plot([r["step"] + 1 for r in rows], [r.get(key) for r in rows], marker="o", label=arm)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_rows(ctx: Any) -> list[dict[str, Any]]:
    out = ctx.out
    wins = _read_json(out / "winrate" / "summary.json") or {}
    hb = _read_json(out / "healthbench" / "summary.json") or {}
    rows = [{"arm": "base policy", "healthbench": (hb.get("base") or {}).get("score")}]
    for arm in ctx.cfg.arms:
        m = _metrics(out / "runs" / arm.name)
        w = wins.get(arm.name, {})
        rows.append({
            "arm": arm.name, "pool": arm.pool, "pairs": arm.pairs, "criteria": _mean_criteria(ctx.rubric_path(arm)),
            "reward": m[-1]["reward_mean"] if m else None, "kl": m[-1].get("kl") if m else None,
            "win_rate": w.get("win_rate"), "ci_low": w.get("ci_low"), "ci_high": w.get("ci_high"), "n": w.get("n"),
            "flip_rate": w.get("flip_rate"), "healthbench": (hb.get(arm.name) or {}).get("score"),
        })
    return rows


def write_report(ctx: Any) -> Path:
    out = ctx.out
    rows = table_rows(ctx)
    lines = ["# Chasing the Tail: results", "", f"Config: `{ctx.cfg.source}`. Win rates are against the base policy on the held-out "
             "prompts (pairwise judge, both display orders, 95% bootstrap interval).", "",
             "| arm | pool | pairs | criteria | train reward | KL | win rate % [95% CI] | n | flip rate | HealthBench |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wr = "-" if r.get("win_rate") is None else f"{100 * r['win_rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        lines.append(f"| {r['arm']} | {r.get('pool') or '-'} | {r.get('pairs', '-')} | {_fmt(r.get('criteria'), '.1f')} | {_fmt(r.get('reward'))} | "
                     f"{_fmt(r.get('kl'), '.4f')} | {wr} | {r.get('n') or '-'} | {_fmt(r.get('flip_rate'), '.2f')} | {_fmt(r.get('healthbench'))} |")
    curves = {arm.name: _metrics(out / "runs" / arm.name) for arm in ctx.cfg.arms}
    if any(curves.values()):
        _plot(curves, "reward_mean", out / "curve_reward.png", "training reward (rubric score)")
        _plot(curves, "kl", out / "curve_kl.png", "KL to the base policy")
        lines += ["", "![training reward](curve_reward.png)", "", "![KL](curve_kl.png)"]
    wins = {arm.name: _eval_rows(out / "runs" / arm.name) for arm in ctx.cfg.arms}
    if any(wins.values()):
        _plot(wins, "eval/win_rate", out / "curve_winrate.png", "held-out win rate vs the base")
        lines += ["", "![held-out win rate](curve_winrate.png)"]
    cost = _read_json(out / "cost.json")
    if cost:
        lines += ["", f"Endpoint cost so far: ${cost['total_usd']:.4f}" + ("" if cost["complete"] else " (+ endpoints without a price)")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    return path

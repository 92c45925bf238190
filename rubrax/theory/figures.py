"""The paper's Figure 2 (win rate vs KL under misspecified rewards), as CSV + PNG.

    figure2a: win rate vs KL in [0, 8] for the maps correct, reversed, top 25% / 50%
              wrong, worst 50% / 90% wrong (tilted policy, Theorem 1).
    figure2b: win rate vs KL in [0, 4] when only the top c = 10%, 20%, ..., 100% of
              responses are ranked correctly and the rest worst-case (reversed):
              worst_wrong(1 - c), and the correct map for c = 100%.
    figure2_bon_vs_tilted: best-of-n (KL = log n - (n-1)/n) against the tilted policy
              on the same KL axis, for correct, top 25% wrong and worst 50% wrong.

All numbers are computed in float64 (`jax.enable_x64`). `figure2_data` is the pure
computation (timed by benchmarks/theory.py); `write_figure2` writes the files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rubrax.theory import misspec
from rubrax.theory.best_of_n import best_of_n_uniform
from rubrax.theory.tilted import beta_for_kl, tilted

__all__ = ["Curve", "figure2_data", "write_figure2"]

KL_MAX_A = 8.0
KL_MAX_B = 4.0
POINTS = 321


@dataclasses.dataclass(frozen=True)
class Curve:
    """One curve of a figure: win rate against KL for a method (tilted or best-of-n)."""

    figure: str
    label: str
    method: str  # "tilted" | "best_of_n"
    c: float | None  # the map's parameter (None for correct / reversed)
    kl: np.ndarray
    param: np.ndarray  # beta for tilted, n for best-of-n
    win_rate: np.ndarray


def _maps_2a() -> list[tuple[str, float | None, Any]]:
    return [
        ("correct", None, misspec.correct()),
        ("reversed", None, misspec.reversed()),
        ("top 25% wrong", 0.25, misspec.top_wrong(0.25)),
        ("top 50% wrong", 0.5, misspec.top_wrong(0.5)),
        ("worst 50% wrong", 0.5, misspec.worst_wrong(0.5)),
        ("worst 90% wrong", 0.9, misspec.worst_wrong(0.9)),
    ]


def _tilted_curves(figure: str, maps, kl_max: float, points: int) -> list[Curve]:
    kl = jnp.linspace(0.0, kl_max, points)
    beta = beta_for_kl(kl)
    out = []
    for label, c, f in maps:
        win = tilted(f, beta).win_rate
        out.append(Curve(figure, label, "tilted", c, np.asarray(kl), np.asarray(beta), np.asarray(win)))
    return out


def figure2_data(points: int = POINTS) -> list[Curve]:
    """Every curve of Figures 2a, 2b and best-of-n vs tilted (computed in the current precision)."""
    curves = _tilted_curves("figure2a", _maps_2a(), KL_MAX_A, points)
    maps_b = []
    for k in range(1, 11):
        c = k / 10
        f = misspec.correct() if k == 10 else misspec.worst_wrong(round(1 - c, 10))
        maps_b.append((f"top {k * 10}% correct", c, f))
    curves += _tilted_curves("figure2b", maps_b, KL_MAX_B, points)

    bon_maps = [m for m in _maps_2a() if m[0] in ("correct", "top 25% wrong", "worst 50% wrong")]
    curves += _tilted_curves("figure2_bon_vs_tilted", bon_maps, KL_MAX_A, points)
    # Largest n with log n - (n-1)/n <= KL_MAX_A is ~e^{KL_MAX_A + 1}.
    n = np.unique(np.round(np.geomspace(1, np.exp(KL_MAX_A + 1) - 1, 160)))
    n = n[np.log(n) - (n - 1) / n <= KL_MAX_A]
    n_j = jnp.asarray(n, jnp.result_type(float))
    for label, c, f in bon_maps:
        stats = best_of_n_uniform(f, n_j)
        curves.append(Curve("figure2_bon_vs_tilted", label, "best_of_n", c, np.asarray(stats.kl), n,
                            np.asarray(stats.win_rate)))
    return curves


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_csv(path: pathlib.Path, curves: list[Curve]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["curve", "method", "c", "kl", "beta", "n", "win_rate"])
            for cv in curves:
                for kl, p, win in zip(cv.kl, cv.param, cv.win_rate):
                    beta, n = (repr(float(p)), "") if cv.method == "tilted" else ("", str(int(p)))
                    w.writerow([cv.label, cv.method, "" if cv.c is None else cv.c, repr(float(kl)), beta, n,
                                repr(float(win))])
    _atomic_write(path, write)


def _plot(path: pathlib.Path, curves: list[Curve], title: str, kl_max: float, colormap: bool) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    ax = fig.add_subplot()
    labels = list(dict.fromkeys(cv.label for cv in curves))
    if colormap:
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        colors = {lab: cmap(i / max(1, len(labels) - 1)) for i, lab in enumerate(labels)}
    else:
        colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for cv in curves:
        style = "-" if cv.method == "tilted" else "--"
        name = cv.label if cv.method == "tilted" else f"{cv.label} (best-of-n)"
        ax.plot(cv.kl, cv.win_rate, style, color=colors[cv.label], label=name, lw=1.6)
    ax.set_xlim(0, kl_max)
    ax.set_ylim(0, 1)
    ax.set_xlabel("KL(π || π0)")
    ax.set_ylabel("win rate vs π0 (gold)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1, loc="lower left")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _summary(curves: list[Curve]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cv in curves:
        i = int(np.argmax(cv.win_rate))
        out[f"{cv.figure}/{cv.method}/{cv.label}"] = {
            "peak_win_rate": float(cv.win_rate[i]), "peak_kl": float(cv.kl[i]),
            "final_win_rate": float(cv.win_rate[-1]), "final_kl": float(cv.kl[-1]),
        }
    return out


def write_figure2(out_root: str | os.PathLike) -> list[pathlib.Path]:
    """Write Figure 2a, 2b and best-of-n vs tilted (CSV + PNG) and summary.json under out_root/figure2/."""
    out = pathlib.Path(out_root) / "figure2"
    out.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(True):
        curves = figure2_data()
    paths = []
    specs = [
        ("figure2a", "Figure 2a: tilted policy under misspecified rewards", KL_MAX_A, False),
        ("figure2b", "Figure 2b: only the top c ranked correctly", KL_MAX_B, True),
        ("figure2_bon_vs_tilted", "Best-of-n (dashed) vs tilted policy (solid)", KL_MAX_A, False),
    ]
    for name, title, kl_max, colormap in specs:
        sel = [cv for cv in curves if cv.figure == name]
        _write_csv(out / f"{name}.csv", sel)
        _plot(out / f"{name}.png", sel, title, kl_max, colormap)
        paths += [out / f"{name}.csv", out / f"{name}.png"]
    summary = out / "summary.json"
    _atomic_write(summary, lambda tmp: tmp.write_text(json.dumps(_summary(curves), indent=2) + "\n"))
    paths.append(summary)
    return paths

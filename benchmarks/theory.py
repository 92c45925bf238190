"""Benchmark rubrax.theory against straightforward peers, measured in the same run.

1. The full Figure 2 grid (2a, 2b, best-of-n vs tilted; 19 tilted curves x 321 KL
   points + 3 best-of-n curves, float64), after compilation, vs scipy.integrate.quad
   on the same integrals (given the kinks as break points). quad is timed on every
   `--quad-stride`-th point of each curve and scaled to the full grid; the largest
   difference between the two is printed as a check.
2. tilted_from_samples on 10^6 samples x 64 betas (float32), vs a vectorised numpy
   implementation of the same estimator (float32, one beta at a time).

    python benchmarks/theory.py [--repeats 3] [--quad-stride 8]

The last line is `key=value` pairs (seconds; speedups are peer time / rubrax time).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate

from rubrax.theory import misspec, tilted_from_samples
from rubrax.theory.figures import figure2_data


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _np_map(label: str):
    """(f, break points) in plain numpy for a curve label of figures.figure2_data."""
    if label == "correct" or label == "top 100% correct":
        return (lambda u: u), []
    if label == "reversed":
        return (lambda u: 1 - u), []
    pct = int(label.split("%")[0].split()[-1]) / 100
    if label.startswith("top") and label.endswith("wrong"):
        return (lambda u: u if u <= 1 - pct else 2 - pct - u), [1 - pct]
    c = pct if label.startswith("worst") else round(1 - pct, 10)  # "top k% correct" = worst (1-k) wrong
    return (lambda u: c - u if u <= c else u), [c]


def _quad_win(f, pts, method: str, param: float) -> float:
    """Win rate (= expected gold) of the tilted policy (param = beta) or best-of-n (param = n)."""
    if method == "tilted":
        if np.isinf(param):
            return 0.5
        pts = sorted(set(pts + [max(0.0, 1 - 30 * param), max(0.0, 1 - 3 * param)]))
        dens = lambda u: np.exp((f(u) - 1) / param)  # noqa: E731 - max f = 1 for these maps
    else:
        dens = lambda u: param * f(u) ** (param - 1)  # noqa: E731
    kw = dict(points=[p for p in pts if 0 < p < 1] or None, limit=400, epsabs=0, epsrel=1e-10)
    num = integrate.quad(lambda u: u * dens(u), 0, 1, **kw)[0]
    den = integrate.quad(dens, 0, 1, **kw)[0]
    return num / den


def bench_grid(repeats: int, stride: int) -> tuple[float, float, float]:
    with jax.enable_x64(True):
        curves = figure2_data()  # compiles
        t_rubrax = _best_time(lambda: figure2_data(), repeats)
    n_points = sum(len(cv.kl) for cv in curves)
    timed, t_quad, max_diff = 0, 0.0, 0.0
    for cv in curves:
        f, pts = _np_map(cv.label)
        for i in range(0, len(cv.kl), stride):
            t0 = time.perf_counter()
            ref = _quad_win(f, list(pts), cv.method, float(cv.param[i]))
            t_quad += time.perf_counter() - t0
            timed += 1
            max_diff = max(max_diff, abs(ref - float(cv.win_rate[i])))
    return t_rubrax, t_quad * n_points / timed, max_diff


def _numpy_samples(gold, proxy, betas):
    order = np.argsort(gold, kind="stable")
    s = gold[order]
    cdf = (np.searchsorted(s, gold, "left") + np.searchsorted(s, gold, "right")) / (2 * gold.size)
    out = []
    for b in betas:
        x = proxy / b
        x = x - x.max()
        e = np.exp(x)
        z = e.sum()
        p = e / z
        out.append(((p * cdf).sum(), (p * gold).sum(), (p * x).sum() - np.log(z / gold.size)))
    return np.asarray(out)


def bench_samples(repeats: int) -> tuple[float, float, float]:
    key = jax.random.PRNGKey(0)
    gold = jax.random.uniform(key, (1_000_000,), jnp.float32)
    proxy = misspec.top_wrong(0.25)(gold)
    betas = jnp.geomspace(1e-3, 10.0, 64, dtype=jnp.float32)
    res = tilted_from_samples(gold, proxy, betas)  # compiles
    t_rubrax = _best_time(lambda: tilted_from_samples(gold, proxy, betas), repeats)
    g, p, b = np.asarray(gold), np.asarray(proxy), np.asarray(betas)
    t0 = time.perf_counter()
    ref = _numpy_samples(g, p, b)
    t_numpy = time.perf_counter() - t0
    diff = float(np.max(np.abs(ref[:, 0] - np.asarray(res.win_rate))))
    return t_rubrax, t_numpy, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quad-stride", type=int, default=8)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    grid_s, quad_s, grid_diff = bench_grid(args.repeats, args.quad_stride)
    print(f"figure 2 grid: rubrax {grid_s:.4f} s, scipy quad {quad_s:.2f} s (extrapolated), "
          f"max |win rate diff| {grid_diff:.2e}")
    samp_s, np_s, samp_diff = bench_samples(args.repeats)
    print(f"tilted_from_samples 1e6 x 64: rubrax {samp_s:.4f} s, numpy {np_s:.4f} s, "
          f"max |win rate diff| {samp_diff:.2e}")
    print(f"figure2_grid_s={grid_s:.4f} figure2_quad_s={quad_s:.3f} figure2_speedup_vs_quad={quad_s / grid_s:.1f} "
          f"figure2_max_diff={grid_diff:.1e} samples_1e6x64_s={samp_s:.4f} samples_numpy_s={np_s:.4f} "
          f"samples_speedup_vs_numpy={np_s / samp_s:.2f}")


if __name__ == "__main__":
    main()

"""`rubrax theory ...`: reward-tail theory from the command line.

    rubrax theory figure2 [--out results]        the paper's Figure 2 (CSV + PNG)
    rubrax theory tilted --map top_wrong --c 0.25 --kl 0.5 1 2 4
                                                 win rate of the tilted policy at given KLs
    rubrax theory predict scores.jsonl [--out curve.csv]
                                                 predicted over-optimisation curve (tilted
                                                 policy and best-of-n) from base samples
                                                 scored by a gold judge and a proxy

`predict` reads JSONL records {"prompt_id": ..., "gold": float, "proxy": float}
(field names configurable); a null score is a failed judge call (dropped and counted).
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
from collections import OrderedDict

from rubrax.data.records import iter_jsonl


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("theory", help="reward-tail theory: Figure 2, tilted policies, predicted curves")
    tsub = p.add_subparsers(dest="theory_command", metavar="THEORY_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    f2 = tsub.add_parser("figure2", help="write the paper's Figure 2a, 2b and best-of-n vs tilted (CSV + PNG)")
    f2.add_argument("--out", default="results", help="output root; files go to OUT/figure2/ (default: results)")
    f2.set_defaults(func=_figure2)

    t = tsub.add_parser("tilted", help="win rate / expected gold of the tilted policy at given KLs (Theorem 1)")
    t.add_argument("--map", default="correct", choices=["correct", "reversed", "top_wrong", "worst_wrong"])
    t.add_argument("--c", type=float, default=None, help="fraction c for top_wrong / worst_wrong, in (0, 1)")
    t.add_argument("--kl", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8])
    t.set_defaults(func=_tilted)

    pr = tsub.add_parser("predict", help="predict win rate vs KL from base samples scored by gold and proxy")
    pr.add_argument("scores", help="JSONL file: one record per scored base sample")
    pr.add_argument("--prompt-key", default="prompt_id")
    pr.add_argument("--gold-key", default="gold")
    pr.add_argument("--proxy-key", default="proxy")
    pr.add_argument("--out", default=None, help="CSV to write (default: print to stdout)")
    pr.set_defaults(func=_predict)


def _figure2(args: argparse.Namespace) -> int:
    from rubrax.theory.figures import write_figure2

    for path in write_figure2(args.out):
        print(path)
    return 0


def _tilted(args: argparse.Namespace) -> int:
    import jax

    # float64: the KL range then reaches ~700 (float32 stops near 85, where beta underflows).
    # A context, not jax.config.update: main() also runs in-process (tests, notebooks), and a
    # global switch would leak float64 into everything that runs after it.
    try:
        with jax.enable_x64(True):
            return _tilted_impl(args)
    except ValueError as err:  # a KL or c out of range: say so, no traceback
        print(f"rubrax theory tilted: {err}", file=sys.stderr)
        return 2


def _tilted_impl(args: argparse.Namespace) -> int:
    from rubrax.theory import beta_for_kl, misspec, tilted

    if args.map in ("top_wrong", "worst_wrong"):
        if args.c is None:
            raise SystemExit(f"rubrax theory tilted: --map {args.map} needs --c in (0, 1)")
        f = getattr(misspec, args.map)(args.c)
    else:
        f = getattr(misspec, args.map)()
    beta = beta_for_kl(args.kl)
    stats = tilted(f, beta)
    print("kl\tbeta\twin_rate")
    for kl, b, w in zip(args.kl, beta.tolist(), stats.win_rate.tolist()):
        print(f"{kl:g}\t{b:.6g}\t{w:.6f}")
    return 0


def _read_scores(path: pathlib.Path, prompt_key: str, gold_key: str, proxy_key: str):
    """Group records by prompt; returns OrderedDict prompt -> list of (gold, proxy) or None."""
    groups: OrderedDict = OrderedDict()
    for _, line_no, rec in iter_jsonl(path):
        for key in (prompt_key, gold_key, proxy_key):
            if key not in rec:
                raise ValueError(f"{path}:{line_no}: missing field {key!r}")
        pair = []
        for key in (gold_key, proxy_key):
            v = rec[key]
            if v is None:
                pair = None  # a failed judge call: dropped, counted
                break
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{path}:{line_no}: field {key!r} must be a finite number or null, got {v!r}")
            pair.append(float(v))
        groups.setdefault(str(rec[prompt_key]), []).append(tuple(pair) if pair else None)
    if not groups:
        raise ValueError(f"{path}: no records")
    return groups


def _predict(args: argparse.Namespace) -> int:
    try:
        return _predict_impl(args)
    except ValueError as err:  # bad input file: say where, no traceback
        print(f"rubrax theory predict: {err}", file=sys.stderr)
        return 2


def _predict_impl(args: argparse.Namespace) -> int:
    import numpy as np

    from rubrax.theory import best_of_n, best_of_n_unbiased, tilted_from_samples

    path = pathlib.Path(args.scores)
    groups = _read_scores(path, args.prompt_key, args.gold_key, args.proxy_key)
    m = max(len(v) for v in groups.values())
    gold = np.zeros((len(groups), m))
    proxy = np.zeros((len(groups), m))
    valid = np.zeros((len(groups), m), bool)
    for i, (pid, rows) in enumerate(groups.items()):
        for j, row in enumerate(rows):
            if row is not None:
                gold[i, j], proxy[i, j] = row
                valid[i, j] = True
        if not valid[i].any():
            raise ValueError(f"{path}: prompt {pid!r} has no valid (gold, proxy) pair")
    dropped = int((~valid).sum() - sum(m - len(v) for v in groups.values()))
    # Proxy scale sets the useful beta range: from 100x to 1/1000 of its spread.
    spread = float(np.ptp(proxy[valid])) or 1.0
    beta = spread * np.geomspace(1e2, 1e-3, 41)
    tilt = tilted_from_samples(gold, proxy, beta, valid=valid)
    m_min = int(valid.sum(-1).min())
    n = np.unique(np.round(np.geomspace(1, m_min, 12))).astype(int)
    bon = best_of_n(gold, proxy, n.astype(float), valid=valid)
    bon_gold = best_of_n_unbiased(gold, proxy, n.astype(float), valid=valid)
    rows = [("tilted", f"{b:.6g}", "", t_kl, t_w, t_g) for b, t_kl, t_w, t_g in
            zip(beta, tilt.kl.mean(-1).tolist(), tilt.win_rate.mean(-1).tolist(), tilt.expected_reward.mean(-1).tolist())]
    rows += [("best_of_n", "", str(k), b_kl, b_w, b_g) for k, b_kl, b_w, b_g in
             zip(n, bon.kl.mean(-1).tolist(), bon.win_rate.mean(-1).tolist(), bon_gold.mean(-1).tolist())]
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        w = csv.writer(out)
        w.writerow(["method", "beta", "n", "kl", "win_rate", "expected_gold"])
        for r in rows:
            w.writerow([r[0], r[1], r[2], f"{r[3]:.6g}", f"{r[4]:.6f}", f"{r[5]:.6g}"])
    finally:
        if args.out:
            out.close()
    t_best = int(np.argmax(tilt.win_rate.mean(-1)))
    print(f"# {len(groups)} prompts, up to {m} samples each, {dropped} failed scores dropped; "
          f"tilted peak win rate {float(tilt.win_rate.mean(-1)[t_best]):.4f} at KL "
          f"{float(tilt.kl.mean(-1)[t_best]):.3f}", file=sys.stderr)
    return 0

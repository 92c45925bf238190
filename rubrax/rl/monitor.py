"""Watching over-optimisation while it happens: the gold monitor and the criteria log.

The proxy (the training reward: a rubric, a BT score) keeps rising while true quality
peaks and falls (arXiv 2509.21500, Sec. 2). A real run cannot see its gold reward during
training, but it can afford a second, better reward on a few held-out prompts every N
steps: a stronger judge, human rubrics, a HealthBench-format rubric set, any reward
function. `GoldMonitor` is that evaluation, an eval hook of `rubrax.rl.loop.train`:

    every eval_every steps: sample the held-out prompts with the current policy, score
    the samples with gold and with the proxy, estimate KL(pi || pi_ref) on them, log
    eval/gold, eval/proxy, eval/kl, eval/gold_best, eval/gold_peak_step; when gold
    beats its best, save the params (out_dir/best_gold, one orbax checkpoint).

`GoldTracker` is the host-side bookkeeping (pure Python, resumable from its JSON file):
the peak of gold, and the optional early stop: with `patience` K, stop once the last K
evaluations all came after gold's peak without beating it (by more than min_delta)
while the proxy now stands above its value at the peak (training reward up, held-out
quality down). KL uses the k1 estimator sum_t log pi(y_t) - log pi_ref(y_t) of each
held-out sample (unbiased for samples of pi at temperature 1 without filters).

`CriteriaLog` writes the rubric reward's per-criterion verdicts of every training step
to criteria.jsonl, from which `rubrax report` draws which criteria saturate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MONITOR_FILE = "gold_monitor.json"
CRITERIA_FILE = "criteria.jsonl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoldMonitorConfig:
    """patience: K evaluations after gold's peak (with the proxy above its value at the
    peak) that end the run; None never stops. min_delta: the margin by which gold must
    beat its best to count as a new peak. keep_best: save the best-by-gold params."""

    patience: int | None = None
    min_delta: float = 0.0
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"GoldMonitorConfig.patience must be a positive int or None, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"GoldMonitorConfig.min_delta must be >= 0, got {self.min_delta}")


class GoldTracker:
    """Gold / proxy / KL per evaluation, gold's peak, and the early-stop rule (module doc).

    `path` (optional JSON file) is rewritten after every observation and read back at
    construction, so a resumed run keeps its peak and its patience count.
    """

    def __init__(self, config: GoldMonitorConfig = GoldMonitorConfig(), path: str | None = None):
        self.config, self.path = config, path
        self.history: list[dict[str, float]] = []
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.history = [dict(r) for r in json.load(f)["history"]]

    def _peak_index(self) -> int | None:
        best = None
        for i, r in enumerate(self.history):
            if math.isfinite(r["gold"]) and (best is None or r["gold"] > self.history[best]["gold"] + self.config.min_delta):
                best = i
        return best

    @property
    def peak(self) -> dict[str, float] | None:
        """The evaluation with the highest gold (the first, among near-ties within min_delta)."""
        i = self._peak_index()
        return None if i is None else self.history[i]

    def observe(self, step: int, *, gold: float, proxy: float = math.nan, kl: float = math.nan) -> dict[str, bool]:
        """Records one evaluation; returns {"new_best": gold's peak is this step, "stop"}."""
        if self.history and step <= self.history[-1]["step"]:  # re-evaluated after a resume
            self.history = [r for r in self.history if r["step"] < step]
        self.history.append({"step": int(step), "gold": float(gold), "proxy": float(proxy), "kl": float(kl)})
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"history": self.history, "config": dataclasses.asdict(self.config)}, f)
            os.replace(tmp, self.path)
        return {"new_best": self.peak is self.history[-1], "stop": self.should_stop()}

    def should_stop(self) -> bool:
        k, i = self.config.patience, self._peak_index()
        if k is None or i is None:
            return False
        since = len(self.history) - 1 - i
        proxy_now, proxy_peak = self.history[-1]["proxy"], self.history[i]["proxy"]
        return since >= k and proxy_now > proxy_peak

    def figures(self) -> dict[str, float]:
        """eval/... scalars of the latest evaluation."""
        last, peak = self.history[-1], self.peak
        out = {"gold": last["gold"], "proxy": last["proxy"], "kl": last["kl"]}
        if peak is not None:
            out.update({"gold_best": peak["gold"], "gold_peak_step": float(peak["step"])})
        return {k: v for k, v in out.items() if math.isfinite(v)}

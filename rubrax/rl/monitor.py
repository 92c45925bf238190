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


class GoldMonitor:
    """Eval hook of `train()`: gold and proxy of held-out samples, KL to the reference,
    gold's peak, the best-by-gold params (see the module docstring).

    prompts: a held-out `rubrax.rl.prompts.PromptSet`. gold_fn / proxy_fn: reward
    functions (names, callables or RewardFn objects; the proxy is usually the training
    reward). sample_cfg: how to decode them (temperature 1 without filters keeps the KL
    estimate unbiased; n > 1 averages over more samples). ref_params: the reference
    policy (None: no eval/kl). out_dir: where gold_monitor.json (the resumable history)
    and best_gold/ (the best-by-gold params, with {"step", "gold"}) go.
    evaluate_reference: before the first evaluation, evaluate ref_params as step 0 (the
    base policy, when training starts from it): gold may peak before any training step
    (logged as eval/gold_base). `stop_requested` turns True when the early-stop rule
    fires (train() then ends the run).
    """

    def __init__(self, prompts: Any, gold_fn: Any, proxy_fn: Any, tokenizer: Any, model_config: Any, sample_cfg: Any, *,
                 max_prompt_tokens: int, ref_params: Any = None, out_dir: str | None = None,
                 config: GoldMonitorConfig = GoldMonitorConfig(), seed: int = 0, batch_size: int = 64,
                 evaluate_reference: bool = True):
        from rubrax.rewards.base import as_reward_fn
        from rubrax.rl.rollouts import EvalSampler

        self.prompts, self.model_config, self.ref_params, self.out_dir = prompts, model_config, ref_params, out_dir
        self.gold_fn, self.proxy_fn, self.n = as_reward_fn(gold_fn), as_reward_fn(proxy_fn), sample_cfg.n
        self.generate = EvalSampler(prompts, tokenizer, model_config, sample_cfg, max_prompt_tokens, seed, batch_size)
        self.tracker = GoldTracker(config, os.path.join(out_dir, MONITOR_FILE) if out_dir else None)
        self.stop_requested = self.tracker.should_stop() if self.tracker.history else False
        self.evaluate_reference = evaluate_reference and ref_params is not None

    @property
    def best_dir(self) -> str | None:
        return os.path.join(self.out_dir, "best_gold") if self.out_dir else None

    def evaluate(self, step: int, params: Any) -> dict[str, float]:
        """Mean gold, proxy (valid samples of each) and KL of the held-out samples."""
        from rubrax.rl.reward_runner import reward_inputs

        gold, proxy, kl = [], [], []
        for ro in self.generate(step, params):
            texts, completions, columns = reward_inputs(self.prompts, ro, self.n)
            for fn, acc in ((self.gold_fn, gold), (self.proxy_fn, proxy)):
                rb = fn(texts, completions, **columns)
                acc.append(rb.scores[rb.valid])
            if self.ref_params is not None:
                kl.append(self._kl(ro, params))
        mean = lambda parts: float(np.concatenate(parts).mean()) if parts and sum(map(len, parts)) else math.nan
        return {"gold": mean(gold), "proxy": mean(proxy), "kl": mean(kl)}

    def _kl(self, ro: Any, params: Any) -> np.ndarray:
        """k1 per sample: sum over its tokens of log pi - log pi_ref (the sampler's logprobs
        are pi's, at temperature 1)."""
        import jax

        from rubrax import policy

        W = ro.prompt_tokens.shape[1]
        seq = np.concatenate([np.repeat(ro.prompt_tokens, self.n, 0), ro.tokens], axis=1)
        seq_mask = np.concatenate([np.repeat(ro.prompt_mask, self.n, 0), ro.mask], axis=1)
        ref_logp = np.asarray(jax.device_get(policy.logprobs(self.ref_params, seq, seq_mask, config=self.model_config)))[:, W:]
        return ((ro.logprobs - ref_logp) * ro.mask).sum(axis=1)

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        if self.evaluate_reference and not self.tracker.history:
            self._observe(0, self.ref_params)
        self._observe(step, params)
        out = self.tracker.figures()
        if self.tracker.history[0]["step"] == 0:
            out["gold_base"] = self.tracker.history[0]["gold"]
        return out

    def _observe(self, step: int, params: Any) -> None:
        scores = self.evaluate(step, params)
        verdict = self.tracker.observe(step, **scores)
        if verdict["new_best"] and self.tracker.config.keep_best and self.best_dir:
            from rubrax.train import checkpoint

            checkpoint.save(self.best_dir, step, params, {"step": int(step), "gold": scores["gold"]}, max_to_keep=1, overwrite=True)
        self.stop_requested = verdict["stop"]


class CriteriaLog:
    """Per-criterion verdict counts of the rubric reward, per training step, as JSONL rows
    {step, prompt_id, criterion, yes, no, unknown} (read by `rubrax report`).

    A step hook of `train()` (`step_hooks=[CriteriaLog(out_dir)]`): reads the "verdicts"
    ({criterion id: yes/no/unknown}) and "prompt_id" that `RubricReward` puts in each
    row's info; rewards without them add nothing. Logs rubric/pass_rate (known verdicts
    that are yes) and rubric/saturated_frac (criteria of the step's prompts that every
    sample of the group met: ties the reward cannot break). Multi-host: process 0 writes.
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, CRITERIA_FILE)

    def __call__(self, view: Any) -> dict[str, float]:
        import jax

        rows = self.rows(view.step, view.infos)
        if rows and jax.process_index() == 0:
            self._append(rows)
        known = [(r["yes"], r["yes"] + r["no"]) for r in rows if r["yes"] + r["no"]]
        if not known:
            return {}
        return {"rubric/pass_rate": sum(y for y, _ in known) / sum(n for _, n in known),
                "rubric/saturated_frac": float(np.mean([y == n for y, n in known]))}

    @staticmethod
    def rows(step: int, infos: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str], Counter] = {}
        for info in infos:
            verdicts = info.get("verdicts") if isinstance(info, Mapping) else None
            if not verdicts:
                continue
            for cid, v in verdicts.items():
                key = (str(info.get("prompt_id")), str(cid))
                counts.setdefault(key, Counter())[v if v in ("yes", "no") else "unknown"] += 1
        return [{"step": int(step), "prompt_id": pid, "criterion": cid, "yes": c["yes"], "no": c["no"], "unknown": c["unknown"]}
                for (pid, cid), c in counts.items()]

    def _append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(r)) + "\n" for r in rows)

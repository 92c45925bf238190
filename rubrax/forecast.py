"""The theory's forecast for a real run, before training (Proposition 1 on base samples).

Score n samples of the base policy per prompt with the gold reward r* (a stronger judge,
human rubrics, any reward function) and with the proxy r (the training reward), then for
a range of beta the tilted policy pi_r ∝ pi0 e^{r/beta} (the optimum of RFT with KL
coefficient beta) predicts, per prompt and averaged over prompts
(`rubrax.theory.tilted_from_samples`):

    win rate vs pi0   E[F0(r*) e^{r/beta}] / E[e^{r/beta}]      (F0: the base's gold CDF)
    expected gold     E[r* e^{r/beta}] / E[e^{r/beta}]
    KL(pi_r || pi0)   E[(r/beta) e^{r/beta}] / E[e^{r/beta}] - log E[e^{r/beta}]   (<= log n)

A proxy that errs among the best responses predicts a win rate that rises, peaks and
falls with KL (the paper's Finding I): the forecast says where over-optimisation starts
before any training. `rubrax report` draws it beside the run's measured (KL, gold) path.

Python: `sample_base` (the RL loop's sampler on the base params) then `forecast(gold_fn,
proxy_fn, prompts, samples)`. As a pipeline step over grading jobs: grade the same base
responses with the gold and the proxy (`rubrax rubrics grade`, or any file of
{prompt_id, response_id, score, valid}) and run
    rubrax forecast --gold gold_grades.jsonl --proxy proxy_grades.jsonl --out RUN

The betas span the proxy's own scale: beta_k = std(proxy) * logspace(-2.5, 1.5, K), the
grid the tail world's report uses (`rubrax.sim.experiment.theory_rows`), so the two give
the same numbers on the same samples (tested).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORECAST_FILE = "forecast.jsonl"


def beta_grid(proxy_PxN: np.ndarray, valid_PxN: np.ndarray, n_betas: int) -> np.ndarray:
    """std(valid proxy) * logspace(-2.5, 1.5, n_betas); empty when the proxy is constant."""
    scale = float(np.std(proxy_PxN[valid_PxN])) if valid_PxN.any() else 0.0
    return scale * np.logspace(-2.5, 1.5, n_betas) if scale > 0 else np.zeros(0)


def forecast_from_scores(gold_PxN: Any, proxy_PxN: Any, valid_PxN: Any = None, *, n_betas: int = 32,
                         betas: Sequence[float] | None = None, label: str = "proxy") -> list[dict[str, Any]]:
    """Rows {label, beta, kl, win_rate, gold} (prompt means) of the tilted policy, one per
    beta, from P x N base-sample scores; valid False drops a sample (a failed judge)."""
    from rubrax.theory import tilted_from_samples

    gold = np.asarray(gold_PxN, np.float64)
    proxy = np.asarray(proxy_PxN, np.float64)
    valid = np.ones(proxy.shape, bool) if valid_PxN is None else np.asarray(valid_PxN, bool)
    grid = beta_grid(proxy, valid, n_betas) if betas is None else np.asarray(betas, np.float64)
    if grid.size == 0:
        return []
    st = tilted_from_samples(gold, proxy, grid, valid=valid)
    win, kl, rew = (np.asarray(x).mean(axis=-1) for x in (st.win_rate, st.kl, st.expected_reward))
    return [{"label": label, "beta": float(b), "kl": float(k), "win_rate": float(w), "gold": float(r)}
            for b, w, k, r in zip(grid, win, kl, rew)]


def score_samples(reward_fn: Any, prompts: Sequence[str], samples_PxN: Sequence[Sequence[str]],
                  columns: Mapping[str, Sequence[Any]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores_PxN, valid_PxN) of n samples per prompt under one reward function;
    `columns` are per-prompt fields (e.g. prompt_id), repeated for each sample."""
    from rubrax.rewards.base import as_reward_fn

    fn = as_reward_fn(reward_fn)
    n = len(samples_PxN[0]) if samples_PxN else 0
    if any(len(s) != n for s in samples_PxN):
        raise ValueError("score_samples: every prompt needs the same number of samples")
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_columns = {k: [v for v in vals for _ in range(n)] for k, vals in (columns or {}).items()}
    out = fn(flat_prompts, [c for s in samples_PxN for c in s], **flat_columns)
    return out.scores.astype(np.float64).reshape(-1, n), out.valid.reshape(-1, n)


def forecast(gold_fn: Any, proxy_fn: Any, prompts: Sequence[str], samples_PxN: Sequence[Sequence[str]], *,
             columns: Mapping[str, Sequence[Any]] | None = None, n_betas: int = 32, label: str = "proxy") -> list[dict[str, Any]]:
    """The forecast from base samples (text): both rewards score every sample, a sample
    counts where both are valid. Raises ValueError when a prompt has no valid sample."""
    gold, gold_ok = score_samples(gold_fn, prompts, samples_PxN, columns)
    proxy, proxy_ok = score_samples(proxy_fn, prompts, samples_PxN, columns)
    return forecast_from_scores(np.where(gold_ok, gold, 0.0), np.where(proxy_ok, proxy, 0.0), gold_ok & proxy_ok,
                                n_betas=n_betas, label=label)


def sample_base(params: Any, prompts: Any, tokenizer: Any, model_config: Any, sample_cfg: Any, *,
                max_prompt_tokens: int, seed: int = 0, batch_size: int = 64) -> list[list[str]]:
    """sample_cfg.n completions per prompt of a PromptSet from the base policy `params`
    (the RL loop's eval sampler: same tokenisation and decoding as training)."""
    from rubrax.rl.rollouts import EvalSampler

    generate = EvalSampler(prompts, tokenizer, model_config, sample_cfg, max_prompt_tokens, seed, batch_size)
    n, out = sample_cfg.n, []
    for ro in generate(0, params):
        out += [list(ro.completions[i * n:(i + 1) * n]) for i in range(len(ro.indices))]
    return out


def write_forecast(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes forecast rows as JSONL (a run folder's forecast.jsonl, read by `rubrax report`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FORECAST_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(r)) + "\n" for r in rows)
    return path


def _read_scores(path: str) -> dict[tuple[str, str], float | None]:
    """{(prompt_id, response_id): score, or None when invalid} of a grades file."""
    from rubrax.data.rubrics import RubricFormatError, iter_jsonl

    out: dict[tuple[str, str], float | None] = {}
    for line, rec in iter_jsonl(path):
        for field in ("prompt_id", "response_id"):
            if not isinstance(rec.get(field), (str, int)) or isinstance(rec.get(field), bool):
                raise RubricFormatError(path, line, field, "missing or not a string")
        key = (str(rec["prompt_id"]), str(rec["response_id"]))
        if key in out:
            raise RubricFormatError(path, line, "response_id", f"duplicate (prompt_id, response_id) {key}")
        score, valid = rec.get("score"), rec.get("valid", True)
        if valid and (isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score)):
            raise RubricFormatError(path, line, "score", f"must be a finite number when valid, got {score!r}")
        out[key] = float(score) if valid else None
    return out


def forecast_from_grades(gold_path: str, proxy_path: str, *, n_betas: int = 32, label: str = "proxy") -> list[dict[str, Any]]:
    """The forecast from two grades files of the same base responses: a response counts
    where both scores are valid; prompts with fewer responses are padded with invalid ones."""
    gold, proxy = _read_scores(gold_path), _read_scores(proxy_path)
    missing = sorted(set(gold) ^ set(proxy))
    if missing:
        raise ValueError(f"{gold_path} and {proxy_path} grade different responses, e.g. {missing[:3]} ({len(missing)} in all)")
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for key in gold:
        by_prompt.setdefault(key[0], []).append(key)
    n = max(len(v) for v in by_prompt.values())
    shape = (len(by_prompt), n)
    g, p, ok = np.zeros(shape), np.zeros(shape), np.zeros(shape, bool)
    for i, keys in enumerate(by_prompt.values()):
        for j, key in enumerate(keys):
            if gold[key] is not None and proxy[key] is not None:
                g[i, j], p[i, j], ok[i, j] = gold[key], proxy[key], True
    return forecast_from_scores(g, p, ok, n_betas=n_betas, label=label)


def _main(args: Any) -> int:
    try:
        rows = forecast_from_grades(args.gold, args.proxy, n_betas=args.betas, label=args.label)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("error: the proxy is constant over the base samples: nothing to forecast", file=sys.stderr)
        return 2
    path = write_forecast(args.out, rows)
    best = max(rows, key=lambda r: r["win_rate"])
    print(f"forecast={path} peak_win_rate={best['win_rate']:.4f} peak_kl={best['kl']:.4f} max_kl={max(r['kl'] for r in rows):.4f}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("forecast", help="the theory's forecast (win rate vs KL) from gold and proxy grades of base samples")
    p.add_argument("--gold", required=True, help="gold grades JSONL {prompt_id, response_id, score, valid}")
    p.add_argument("--proxy", required=True, help="proxy grades JSONL of the same responses")
    p.add_argument("--out", required=True, help="run folder (writes forecast.jsonl there) or a file path")
    p.add_argument("--betas", type=int, default=32, help="number of KL coefficients (log-spaced over the proxy's scale)")
    p.add_argument("--label", default="proxy", help="name of the proxy in the report")
    p.set_defaults(func=_main)

"""`rubrax train sft|reward-model`: supervised training from JSONL or `datasets` records.

    rubrax train reward-model --train pairs.jsonl --model PATH --preset paper --out runs/bt
    rubrax train sft --train sft.jsonl --model tiny --preset tiny --out runs/sft

`--model` is an HF-format folder (config.json + safetensors + tokenizer files),
`smollm2` (the bundled SmolLM2-135M-Instruct, converted once into ~/.cache/rubrax), or
`tiny` (a random-init tiny model with a word-level tokenizer built from the data: for
CPU smoke runs). Everything lands in --out: checkpoints/ (a rerun with the same --out
resumes exactly where the last run stopped), metrics.jsonl, and the final model
(reward_model/ for BT, model/ in HF format for SFT). The last line printed is
`key=value` figures of the final held-out evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from rubrax.jaxcache import use_persistent_compilation_cache

TASKS = ("reward-model", "sft")


def add_arguments(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--train", required=True, help="training records: JSONL path, or a `datasets` name with --dataset")
    p.add_argument("--eval", default=None, help="held-out records (default: split --eval-fraction off --train)")
    p.add_argument("--dataset", action="store_true", help="--train/--eval name `datasets` datasets (load_dataset; offline)")
    p.add_argument("--split", default="train", help="dataset split with --dataset")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--model", default="tiny", help="HF-format folder, 'smollm2' or 'tiny'")
    p.add_argument("--preset", default="tiny", choices=("paper", "tiny"), help="training settings (rubrax.train.presets)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, final model)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + response)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--schedule", choices=("cosine", "constant", "linear"), default=None)
    p.add_argument("--warmup-ratio", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fsdp", action="store_true", help="shard params and optimizer state over all devices (FSDP)")
    p.add_argument("--fsdp-axis-size", type=int, default=None,
                   help="with --fsdp: hybrid sharding, params split within groups of this many devices (one node)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to --out/tb")
    if task == "reward-model":
        p.add_argument("--freeze-backbone", action="store_true", help="train the scalar head only")
        p.add_argument("--margin", type=float, default=0.0, help="margin m in -log sigmoid(r_c - r_r - m)")
        p.add_argument("--center-coef", type=float, default=0.0, help="reward-centring coefficient")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="supervised training: SFT and the Bradley-Terry reward model")
    sub = parser.add_subparsers(dest="train_task", metavar="TASK")
    for task in TASKS:
        p = sub.add_parser(task, help=f"train {'a Bradley-Terry reward model' if task == 'reward-model' else 'SFT'}")
        add_arguments(p, task)
        p.set_defaults(func=lambda args, task=task: run(task, args))
    def usage(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def train_config(task: str, args: argparse.Namespace):
    from rubrax.train.presets import preset

    cfg = preset(task, args.preset)
    optim = dataclasses.replace(
        cfg.optim,
        **{k: v for k, v in (("learning_rate", args.lr), ("schedule", args.schedule), ("warmup_ratio", args.warmup_ratio)) if v is not None},
    )
    overrides = {
        k: v
        for k, v in (
            ("num_epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("grad_accum_steps", args.grad_accum),
            ("max_steps", args.max_steps),
            ("seed", args.seed),
            ("fsdp", args.fsdp or None),
            ("fsdp_axis_size", args.fsdp_axis_size),
        )
        if v is not None
    }
    return dataclasses.replace(cfg, optim=optim, progress=not args.no_progress, **overrides)


def _records(name: str, args: argparse.Namespace, split: str) -> Any:
    if not args.dataset:
        return name
    import datasets

    return datasets.load_dataset(name, split=split)


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    import numpy as np

    if not 0 < fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_eval = max(1, int(round(fraction * len(items))))
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def load_model(model: str, texts: Sequence[str], seed: int, cfg: Any = None):
    """(params, config, tokenizer, tokenizer path or None) for --model; with cfg.fsdp a
    checkpoint's weights are read straight into their FSDP shards."""
    import jax

    if model == "tiny":
        from rubrax.models import ModelConfig, init_params
        from rubrax.sim.tokenizer import WordTokenizer

        words = sorted({w for t in texts for w in t.split()})
        tok = WordTokenizer(words)
        config = ModelConfig.tiny(
            vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
        )
        return init_params(config, jax.random.key(seed)), config, tok, None
    from rubrax import models

    path = models.smollm2_checkpoint() if model == "smollm2" else model
    shardings = None
    if cfg is not None and cfg.fsdp and jax.device_count() > 1:
        from rubrax import sharding

        mesh = sharding.make_mesh(fsdp_axis_size=cfg.fsdp_axis_size)
        shardings = lambda abstract: sharding.param_sharding(abstract, mesh, fsdp=True)
    params, config = models.load_pretrained(path, shardings=shardings)
    return params, config, models.load_tokenizer(path), os.fspath(path)


def run(task: str, args: argparse.Namespace) -> int:
    cfg = train_config(task, args)
    os.makedirs(args.out, exist_ok=True)
    if task == "reward-model":
        from rubrax.data.pairs import read_pairs as read
    else:
        from rubrax.data.sft import read_sft as read
    train_items = read(_records(args.train, args, args.split))
    if args.eval:
        eval_items = read(_records(args.eval, args, "test" if args.dataset else args.split))
    else:
        train_items, eval_items = _split(train_items, args.eval_fraction, cfg.seed)
    texts = [getattr(x, f) for x in train_items + eval_items for f in ("prompt", "chosen", "rejected", "response") if hasattr(x, f)]
    params, config, tok, tok_path = load_model(args.model, texts, cfg.seed, cfg)
    common = dict(
        ckpt_dir=os.path.join(os.path.abspath(args.out), "checkpoints"),
        metrics_path=os.path.join(args.out, "metrics.jsonl"),
        tensorboard_dir=os.path.join(args.out, "tb") if args.tensorboard else None,
    )
    if task == "reward-model":
        from rubrax.data.pairs import encode_pairs
        from rubrax.rewards import bradley_terry as bt

        bt_cfg = bt.BTConfig(margin=args.margin, center_coef=args.center_coef, freeze_backbone=args.freeze_backbone)
        import jax

        bt_params = bt.init_params(config, jax.random.key(cfg.seed), backbone=params)
        result = bt.train_reward_model(
            bt_params, config, encode_pairs(tok, train_items, max_length=args.max_length), cfg, bt_cfg,
            eval_pairs=encode_pairs(tok, eval_items, max_length=args.max_length), **common,
        )
        bt.save_reward_model(os.path.join(os.path.abspath(args.out), "reward_model"), result.params, config, tokenizer_path=tok_path)
    else:
        from rubrax.data.sft import encode_sft
        from rubrax.models import save_pretrained
        from rubrax.train.sft import train_sft

        result = train_sft(
            params, config, encode_sft(tok, train_items, max_length=args.max_length), cfg,
            eval_data=encode_sft(tok, eval_items, max_length=args.max_length), **common,
        )
        save_pretrained(result.params, config, os.path.join(args.out, "model"))
    final = result.eval_history[-1] if result.eval_history else {}
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0


def main(task: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of experiments/train_{reward_model,sft}.py."""
    use_persistent_compilation_cache()
    parser = argparse.ArgumentParser(prog=f"train_{task.replace('-', '_')}.py", description=__doc__.splitlines()[0])
    add_arguments(parser, task)
    return run(task, parser.parse_args(argv))



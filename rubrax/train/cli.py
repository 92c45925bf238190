"""`rubrax train sft|reward-model`: supervised training from JSONL or `datasets` records.

    rubrax train reward-model --train pairs.jsonl --model PATH --preset paper --out runs/bt
    rubrax train sft --train sft.jsonl --model tiny --preset tiny --out runs/sft

`--model` is an HF-format folder (config.json + safetensors + tokenizer files),
`smollm2` (the bundled SmolLM2-135M-Instruct, converted once into ~/.cache/rubrax), or
`tiny` (a random-init tiny model with a word-level tokenizer built from the data: for
CPU smoke runs). Everything lands in --out: checkpoints/ (a rerun with the same --out
resumes exactly where the last run stopped, metrics.jsonl cut back to its checkpoint),
metrics.jsonl, and the final model (reward_model/ for BT, model/ in HF format for SFT).
--out is locked while a run writes it, and its inputs are fingerprinted (run.json: the
settings, the data files' and model's hashes): a rerun with other inputs refuses, naming
them (--restart starts afresh; --allow-changed accepts changed eval/logging/checkpoint
cadence). The last line printed is `key=value` figures of the final held-out evaluation.
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
    from rubrax.runs import add_run_flags
    from rubrax.validate import arg_type

    pos_int, pos_float = arg_type("int", low=1), arg_type("float", low=0, open_low=True)
    add_run_flags(p)
    p.add_argument("--train", required=True, help="training records: JSONL path, or a `datasets` name with --dataset")
    p.add_argument("--eval", default=None, help="held-out records (default: split --eval-fraction off --train)")
    p.add_argument("--dataset", action="store_true", help="--train/--eval name `datasets` datasets (load_dataset; offline)")
    p.add_argument("--split", default="train", help="dataset split with --dataset")
    p.add_argument("--eval-fraction", type=arg_type("float", low=0, high=1, open_low=True, open_high=True), default=0.1)
    p.add_argument("--model", default="tiny", help="HF-format folder, 'smollm2' or 'tiny'")
    p.add_argument("--preset", default="tiny", choices=("paper", "tiny"), help="training settings (rubrax.train.presets)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, final model)")
    p.add_argument("--max-length", type=arg_type("int", low=2), default=512, help="tokens per sequence (prompt + response)")
    p.add_argument("--lr", type=pos_float, default=None, help="peak learning rate (overrides the preset)")
    p.add_argument("--epochs", type=pos_int, default=None)
    p.add_argument("--batch-size", type=pos_int, default=None)
    p.add_argument("--grad-accum", type=pos_int, default=None)
    p.add_argument("--max-steps", type=pos_int, default=None)
    p.add_argument("--schedule", choices=("cosine", "constant", "linear"), default=None)
    p.add_argument("--warmup-ratio", type=arg_type("float", low=0, high=1, open_high=True), default=None)
    p.add_argument("--seed", type=arg_type("int", low=0), default=None)
    p.add_argument("--fsdp", action="store_true", help="shard params and optimizer state over all devices (FSDP)")
    p.add_argument("--fsdp-axis-size", type=pos_int, default=None,
                   help="with --fsdp: hybrid sharding, params split within groups of this many devices (one node)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default float32; bfloat16 on accelerators, over float32 --param-dtype)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="master-weight (and Adam state) dtype (default float32)")
    p.add_argument("--remat", choices=("auto", "none", "full", "dots"), default=None,
                   help="what each decoder layer keeps for the backward pass (rubrax.models.config; default auto)")
    p.add_argument("--attention", choices=("auto", "einsum", "blockwise", "cudnn", "xla", "tpu_flash"), default=None,
                   help="attention implementation (default auto: per platform and length)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="memory per device for the fit check that runs before any weights load (`rubrax plan`; "
                        "default: the accelerators' own; on CPU the check runs only with this flag)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to --out/tb")
    if task == "reward-model":
        p.add_argument("--freeze-backbone", action="store_true", help="train the scalar head only")
        p.add_argument("--margin", type=arg_type("float"), default=0.0, help="margin m in -log sigmoid(r_c - r_r - m)")
        p.add_argument("--center-coef", type=arg_type("float", low=0), default=0.0, help="reward-centring coefficient")


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


_MODEL_FLAGS = ("dtype", "param_dtype", "remat", "attention")


def model_settings(args: argparse.Namespace) -> dict[str, str]:
    """The model settings the flags give (recipe "model_settings" keys; unset ones absent)."""
    return {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k, None) is not None}


def plan_config(task: str, args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """The supervised plan config (rubrax.plan.parse_supervised) of this command line:
    what the fit check compiles, exactly the run's model, settings and batch shapes."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("optim", "progress")}
    config = {"task": task, "model": args.model, "model_settings": model_settings(args), "preset": args.preset,
              "train": train, "optim": dataclasses.asdict(cfg.optim), "max_length": args.max_length}
    if task == "reward-model":
        config["bt"] = {"margin": args.margin, "center_coef": args.center_coef, "freeze_backbone": args.freeze_backbone}
    return config


def load_model(model: str, texts: Sequence[str], seed: int, cfg: Any = None, settings: dict | None = None):
    """(params, config, tokenizer, tokenizer path or None) for --model, with `settings`
    (model_settings: dtype, param_dtype, remat, attention) applied; with cfg.fsdp a
    checkpoint's weights are read straight into their FSDP shards."""
    import jax

    settings = dict(settings or {})
    if model == "tiny":
        from rubrax.models import ModelConfig, init_params
        from rubrax.models.tokenizer import WordTokenizer

        words = sorted({w for t in texts for w in t.split()})
        tok = WordTokenizer(words)
        config = ModelConfig.tiny(
            vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            **settings,
        )
        return init_params(config, jax.random.key(seed)), config, tok, None
    from rubrax import models

    path = models.smollm2_checkpoint() if model == "smollm2" else model
    shardings = None
    if cfg is not None and cfg.fsdp and jax.device_count() > 1:
        from rubrax import sharding

        mesh = sharding.make_mesh(fsdp_axis_size=cfg.fsdp_axis_size)
        shardings = lambda abstract: sharding.param_sharding(abstract, mesh, fsdp=True)
    dtypes = {k: settings.pop(k) for k in ("dtype", "param_dtype") if k in settings}
    params, config = models.load_pretrained(path, shardings=shardings, **dtypes)
    return params, config.replace(**settings), models.load_tokenizer(path), os.fspath(path)


_SAFE_ON_RESUME = ("train.log_every", "train.eval_every", "train.eval_batch_size", "train.checkpoint_every",
                   "train.keep_checkpoints", "train.eval_at_start")


def open_out(task: str, args: argparse.Namespace, cfg: Any) -> Any:
    """Locks --out and checks its fingerprint (rubrax.runs); returns the held lock."""
    from rubrax.runs import fingerprint, open_run

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "out", "no_progress", "restart", "allow_changed",
                                                                  "train", "eval", "model", "device_memory")
                and not (k in _MODEL_FLAGS and v is None)}  # unset model flags: as before they existed
    config = {"task": task, "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
              "args": settings, "model": args.model}
    files = {} if args.dataset else {name: path for name, path in (("train", args.train), ("eval", args.eval)) if path}
    if os.path.exists(args.model):  # a model folder (big weight files: by size and mtime)
        files["model"] = args.model
    if args.dataset:
        config["datasets"] = {"train": args.train, "eval": args.eval}
    outputs = [os.path.join(args.out, n) for n in ("checkpoints", "metrics.jsonl", "tb", "reward_model", "model")]
    return open_run(args.out, fingerprint(config, files), folder=True, outputs=outputs, safe=_SAFE_ON_RESUME,
                    restart=args.restart, allow_changed=args.allow_changed)


def run(task: str, args: argparse.Namespace) -> int:
    import sys

    from rubrax.runs import RunError

    try:
        cfg = train_config(task, args)
        lock = open_out(task, args, cfg)
    except (RunError, ValueError, FileNotFoundError) as err:  # bad settings, a missing file, a locked or changed --out
        print(f"rubrax train {task}: error: {err}", file=sys.stderr)
        return 2
    try:
        return _run_locked(task, args, cfg)
    finally:
        lock.release()


def _run_locked(task: str, args: argparse.Namespace, cfg: Any) -> int:
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
    from rubrax.plan import check_fits

    if args.model != "tiny":  # before any weights load (a tiny model's vocabulary comes from the data)
        check_fits(plan_config(task, args, cfg), source=f"rubrax train {task} --model {args.model}",
                   device_memory_gb=args.device_memory)
    params, config, tok, tok_path = load_model(args.model, texts, cfg.seed, cfg, model_settings(args))
    common = dict(
        ckpt_dir=os.path.join(os.path.abspath(args.out), "checkpoints"),
        metrics_path=os.path.join(args.out, "metrics.jsonl"),
        tensorboard_dir=os.path.join(args.out, "tb") if args.tensorboard else None,
    )
    if task == "reward-model":
        from rubrax.data.pairs import encode_pairs
        from rubrax.rewards import bradley_terry as bt
        from rubrax.train.reward_model import train_reward_model

        bt_cfg = bt.BTConfig(margin=args.margin, center_coef=args.center_coef, freeze_backbone=args.freeze_backbone)
        import jax

        bt_params = bt.init_params(config, jax.random.key(cfg.seed), backbone=params)
        result = train_reward_model(
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



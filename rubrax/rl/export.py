"""An RL run's policy as a Hugging Face folder: `rubrax rl export RUN [--step N] --out DIR`.

The run's orbax checkpoint holds the policy params (its TrainState) and, in its JSON
extra, the run config whose "model" names the base the run started from ("smollm2" or
an HF folder). The exported folder is what transformers and vLLM load:

    config.json, model.safetensors (float32, as trained; sharded with an index when large),
    tokenizer files + chat template (the base's, written by its tokenizer),
    generation_config.json (the base's, else bos/eos/pad from the model config),
    rubrax_export.json (run, step, base: where the weights came from).

Only the params are read (`rubrax.train.checkpoint.restore_item`): no optimizer or
trainer is rebuilt, so exporting a run needs no more memory than the params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

_GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class RunPolicy:
    """The policy of one checkpoint step of a run: params (numpy), model config, the base
    folder its tokenizer and generation config come from."""

    params: Any
    config: Any
    base_dir: Path
    step: int
    run_dir: Path


def base_model_dir(model: str) -> Path:
    """The HF folder a run's config "model" names ("smollm2" = the bundled checkpoint)."""
    from rubrax.models import smollm2_checkpoint

    if model == "smollm2":
        return smollm2_checkpoint()
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the run's base model {model!r} is not an HF folder with config.json (a 'tiny' run has no tokenizer to export)")
    return path


def load_run_policy(run_dir: str | os.PathLike, step: int | None = None, *, base: str | os.PathLike | None = None) -> RunPolicy:
    """Params of checkpoint `step` (default: the latest) of the RL run in `run_dir`.

    `base` overrides the base model recorded in the checkpoint (a run moved from another
    machine, or `train()` called without a run_config naming its model).
    """
    from rubrax.models.checkpoint import config_from_hf
    from rubrax.train import checkpoint

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir() or checkpoint.latest_step(ckpt_dir) is None:
        raise FileNotFoundError(f"{run_dir}: no RL checkpoint (expected {ckpt_dir}/<step>)")
    params, extra, step = checkpoint.restore_item(ckpt_dir, "params", step)
    model = base or extra.get("config", {}).get("model")
    if model is None:
        raise ValueError(f"{ckpt_dir}/{step}: the checkpoint does not name its base model; pass base=")
    base_dir = base_model_dir(os.fspath(model))
    config = config_from_hf(json.loads((base_dir / "config.json").read_text()), source=str(base_dir / "config.json"))
    if isinstance(params.get("layers"), list):  # an unstacked run: orbax gives the layer tuple back as a list
        params = {**params, "layers": tuple(params["layers"])}
    return RunPolicy(params, config, base_dir, step, run_dir)


def write_hf_folder(params: Any, config: Any, out_dir: str | os.PathLike, *, tokenizer: Any, base_dir: str | os.PathLike | None = None,
                    provenance: dict[str, Any] | None = None) -> Path:
    """config.json + safetensors + tokenizer files + chat template + generation config.

    `tokenizer`: a rubrax HFTokenizer (its transformers tokenizer writes its own files,
    chat template included). Written into a temporary folder renamed at the end, so an
    interrupted export never leaves a folder that looks complete.
    """
    from rubrax.models import save_pretrained

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(params, config, tmp)
    tokenizer.hf.save_pretrained(str(tmp))
    gen = Path(base_dir) / _GENERATION_CONFIG if base_dir else None
    if gen is not None and gen.exists():
        shutil.copy(gen, tmp / _GENERATION_CONFIG)
    else:
        eos = list(config.eos_token_ids)
        values = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": config.pad_token_id}
        (tmp / _GENERATION_CONFIG).write_text(json.dumps({k: v for k, v in values.items() if v is not None}, indent=2) + "\n")
    if provenance:
        (tmp / "rubrax_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_trained(params: Any, config: Any, tokenizer: Any, out_dir: str | os.PathLike, *, step: int) -> Path | None:
    """The end-of-training export of `LoopConfig.export_dir` (process 0 of a single-process run)."""
    import jax

    if jax.process_count() > 1:
        import logging

        logging.getLogger("rubrax.rl").warning("export_dir is single-process only: export with `rubrax rl export` after the run")
        return None
    if not hasattr(tokenizer, "hf"):
        raise ValueError(f"LoopConfig.export_dir needs a transformers tokenizer (rubrax HFTokenizer), got {type(tokenizer).__name__}")
    base = Path(tokenizer.hf.name_or_path) if os.path.isdir(str(tokenizer.hf.name_or_path)) else None
    params = jax.device_get(params)
    return write_hf_folder(params, config, out_dir, tokenizer=tokenizer, base_dir=base, provenance={"step": step, "base": os.fspath(base) if base else None})


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *, base: str | os.PathLike | None = None) -> Path:
    """Writes checkpoint `step` (default: latest) of an RL run as an HF folder at `out_dir`."""
    from rubrax.models import load_tokenizer

    policy = load_run_policy(run_dir, step, base=base)
    provenance = {"run": os.fspath(Path(run_dir).resolve()), "step": policy.step, "base": os.fspath(policy.base_dir)}
    return write_hf_folder(policy.params, policy.config, out_dir, tokenizer=load_tokenizer(policy.base_dir), base_dir=policy.base_dir,
                           provenance=provenance)

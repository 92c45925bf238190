"""One RL iteration (sample a group, reward it, update) in rubrax vs TRL's GRPOTrainer.

    python benchmarks/rl_step.py                          # tiny + SmolLM2-135M, CPU
    python benchmarks/rl_step.py --models tiny --iters 5

Same model architecture and shapes, same prompts, tokenizer (SmolLM2's), group size,
prompt padding (TRL pads a batch to its longest prompt; rubrax to a multiple of
--prompt-bucket, 8 by default, i.e. at least as wide),
completion length (stopping disabled on both sides so every completion has exactly
--new-tokens tokens), reward function, KL coefficient (0.01, so both run a reference
forward), AdamW, token-level loss ("dapo" in TRL, "token" here), grad clipping 1.0.
Each side runs in its own subprocess (clean peak-memory figures, no thread-pool
interference); the first iteration (compilation in rubrax, lazy set-up in TRL) is
excluded and the median of the rest is reported.

tiny: rubrax's ModelConfig.tiny shapes (2 layers, d=64) with the 49152-token
vocabulary; the torch side builds a LlamaForCausalLM of the same config (its own
random init: weights do not affect the speed with stopping disabled).
smollm2: SmolLM2-135M-Instruct from the bundled GGUF (converted once into
~/.cache/rubrax), loaded by both rubrax and transformers from the same folder.

TRL is only needed here (pip install trl); it is not a rubrax dependency.
Last line: `key=value` figures, `<model>_vs_trl` = TRL seconds / rubrax seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = ["say yes", "say the colour of the sky", "say one word", "say a number", "say hello", "say something nice"]


def reward_fn(prompts, completions, **_):
    return [sum(w.strip(".,!").lower() == "yes" for w in c.split()) / max(len(c.split()), 1) for c in completions]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- rubrax


def run_rubrax(args) -> dict:
    import jax
    import numpy as np

    from rubrax import models
    from rubrax.hostmem import release_host_memory
    from rubrax.policy import SampleConfig
    from rubrax.rewards.base import as_reward_fn
    from rubrax.rl.batch import make_batch
    from rubrax.rl.loop import LoopConfig, arrange_layers
    from rubrax.rl.prompts import load_prompts
    from rubrax.rl.reward_runner import reward_inputs
    from rubrax.rl.rollouts import RolloutSampler
    from rubrax.rl.state import TrainState
    from rubrax.rl.step import RLConfig, Trainer, model_logits_fn
    from rubrax.sharding import make_mesh
    from rubrax.train.optim import OptimConfig, make_optimizer

    path = models.smollm2_checkpoint()
    tok = models.load_tokenizer(path)
    if args.model == "tiny":
        config = models.ModelConfig.tiny(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                         bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=tok.eos_token_id)
        params = models.init_params(config, jax.random.PRNGKey(0))
    else:
        params, config = models.load_pretrained(path)
    params = arrange_layers(params, "auto")  # what train() does: per-layer buffers on CPU
    P, G, L = args.prompts, args.group, args.new_tokens
    records = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(P * (args.iters + 1))]
    prompts = load_prompts(records, tok, max_prompt_tokens=args.prompt_tokens, chat_template=False)
    rl = RLConfig(group_size=G, kl_coef=0.01, loss_aggregation="token")
    sample = SampleConfig(max_new_tokens=L, n=G, stop_token_ids=(), prompt_bucket=args.prompt_bucket)
    loop = LoopConfig(total_steps=args.iters + 1, prompts_per_step=P, max_prompt_tokens=args.prompt_tokens,
                      trim_prompts=True, progress=False)
    tx = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0), loop.total_steps)
    state = TrainState.create(params, tx, seed=0)
    ref = params  # the state gets its own copy; the reference shares the loaded buffers (as in train())
    trainer = Trainer(rl, model_logits_fn(config), tx, state, ref, mesh=make_mesh(jax.devices()[:1]))
    state, ref = trainer.place_state(state), trainer.place_ref(ref)
    sampler = RolloutSampler(prompts, tok, config, sample, np.asarray(state.key), prompts_per_step=P,
                             max_prompt_tokens=args.prompt_tokens, prompt_bucket=args.prompt_bucket)
    fn = as_reward_fn(reward_fn)
    times = []
    for step in range(loop.total_steps):
        t0 = time.perf_counter()
        ro = sampler(step, state.params)
        texts, completions, columns = reward_inputs(prompts, ro, G)
        rb = fn(texts, completions, **columns)
        batch = make_batch(ro.prompt_tokens, ro.prompt_mask, ro.tokens, ro.mask, ro.logprobs, rb.scores, rb.valid, group_size=G)
        release_host_memory()  # as train() does before each update
        state, metrics = trainer(state, batch, ref)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        assert int(ro.mask.sum()) == P * G * L, "completions must all have the full length"
    return {"s_per_iter": statistics.median(times[1:]), "first_s": times[0], "peak_rss_mb": peak_rss_mb(),
            "tokens_per_iter": P * G * L}


# --------------------------------------------------------------------------- TRL


def run_trl(args) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    path = _smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    if args.model == "tiny":
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        # TRL builds its reference model from the policy's path, so the tiny model gets one.
        path = tempfile.mkdtemp(prefix="rl_step_tiny_")
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    P, G, L = args.prompts, args.group, args.new_tokens
    data = datasets.Dataset.from_list([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(P * (args.iters + 1))])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=P * G, num_generations=G, max_completion_length=L,
            generation_kwargs={"min_new_tokens": L}, beta=0.01, loss_type="dapo", learning_rate=1e-6, max_grad_norm=1.0,
            max_steps=args.iters + 1, gradient_accumulation_steps=1, num_iterations=1, temperature=1.0,
            report_to="none", save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False, seed=0,
            shuffle_dataset=False, dataloader_num_workers=0, disable_dropout=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=data, processing_class=tok,
                              callbacks=[Clock()])
        trainer.train()
    return {"s_per_iter": statistics.median(times[1:]), "first_s": times[0], "peak_rss_mb": peak_rss_mb(),
            "tokens_per_iter": P * G * L}


def _smollm2_path() -> str:
    # The converted folder is made by rubrax (a subprocess, so this worker never imports jax).
    out = subprocess.run([sys.executable, "-c", "from rubrax.models import smollm2_checkpoint as s; print(s())"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return out


# --------------------------------------------------------------------------- driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16, help="max prompt width")
    p.add_argument("--prompt-bucket", type=int, default=8,
                   help="rubrax pads each batch's prompts to a multiple of this (TRL: to the longest prompt)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--worker", choices=("rubrax", "trl"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (run_rubrax if args.worker == "rubrax" else run_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)  # one device per side
    figures = {}
    print(f"one RL iteration: {args.prompts} prompts x {args.group} samples x {args.new_tokens} new tokens, "
          f"prompts padded to a multiple of {args.prompt_bucket} (rubrax) / the longest (TRL); "
          f"median of {args.iters} after 1 warm-up")
    for model in args.models.split(","):
        res = {}
        for side in ("rubrax", "trl"):
            cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--prompts", str(args.prompts), "--group",
                   str(args.group), "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--prompt-bucket", str(args.prompt_bucket), "--iters", str(args.iters)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{model}/{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            res[side] = json.loads(line[-1][len("RESULT "):])
            r = res[side]
            print(f"{model:8s} {side:6s} {r['s_per_iter']:8.3f} s/iter  first {r['first_s']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
        figures[f"{model}_vs_trl"] = res["trl"]["s_per_iter"] / res["rubrax"]["s_per_iter"]
        figures[f"{model}_rubrax_s"] = res["rubrax"]["s_per_iter"]
        figures[f"{model}_trl_s"] = res["trl"]["s_per_iter"]
        figures[f"{model}_rubrax_mb"] = res["rubrax"]["peak_rss_mb"]
        figures[f"{model}_trl_mb"] = res["trl"]["peak_rss_mb"]
    print(" ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

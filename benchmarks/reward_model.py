"""Bradley-Terry reward-model training throughput (pairs/s): rubrax vs PyTorch transformers.

Both sides train the same weights on the same random pairs, one AdamW update per step
with the same loss (-log sigmoid(r_chosen - r_rejected), reward read at the last real
token): rubrax's jitted `make_train_step` with `pair_loss`, and transformers'
`AutoModelForSequenceClassification` (num_labels=1) with torch.optim.AdamW. Before
timing, the initial rewards of both are compared (the head bias is 0 on both sides),
which checks that they compute the same model.

    python benchmarks/reward_model.py                      # tiny and SmolLM2-135M
    python benchmarks/reward_model.py --models tiny --pairs 16 --seq 64

Last line: `key=value` figures (pairs/s per model and framework, rubrax/torch ratio).
Times exclude compilation (rubrax) and the first step (both).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_pairs(vocab: int, pairs: int, seq: int, pad: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random pairs: tokens [P, 2, T], mask [P, 2, T], lengths in [T/2, T]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(pairs, 2, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, size=(pairs, 2))
    mask = (np.arange(seq)[None, None] < lengths[..., None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, pad).astype(np.int32)
    return tokens, mask


def rubrax_side(params, config, tokens, mask, steps: int, lr: float):
    import functools

    import jax

    from rubrax.rewards import bradley_terry as bt
    from rubrax.train.optim import OptimConfig, make_optimizer
    from rubrax.train.trainer import init_state, make_train_step

    tx = make_optimizer(OptimConfig(learning_rate=lr, schedule="constant", warmup_ratio=0.0, max_grad_norm=None), steps + 1)
    step = make_train_step(
        functools.partial(bt.pair_loss, config=config, bt=bt.BTConfig()), tx, bt.trainable_mask(params)
    )
    r0 = np.asarray(bt.score_pairs(params, tokens, mask, config=config))
    state = jax.jit(init_state, static_argnums=1)(params, tx)
    batch = {"tokens": tokens[None], "mask": mask[None]}
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return r0, steps * tokens.shape[0] / (time.perf_counter() - t), first


def torch_side(hf_dir, head_kernel, tokens, mask, steps: int, lr: float, pad: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1, torch_dtype=torch.float32)
    model.config.pad_token_id = pad
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(np.array(head_kernel, np.float32))[None])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    P, _, T = tokens.shape
    ids = torch.from_numpy(tokens.reshape(2 * P, T).astype(np.int64))
    att = torch.from_numpy(mask.reshape(2 * P, T).astype(np.int64))
    model.eval()  # no dropout; the same function as rubrax's
    with torch.no_grad():
        r0 = model(input_ids=ids, attention_mask=att).logits[:, 0].reshape(P, 2).numpy()

    def step():
        r = model(input_ids=ids, attention_mask=att).logits[:, 0].reshape(P, 2)
        loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return r0, steps * P / (time.perf_counter() - t), first


def bench(name: str, pairs: int, seq: int, steps: int, lr: float) -> dict[str, float]:
    import jax

    from rubrax.models import ModelConfig, load_pretrained, save_pretrained
    from rubrax.rewards import bradley_terry as bt

    tmp = None
    if name == "tiny":
        config = ModelConfig.tiny()
        backbone = None
    else:
        from rubrax.models.gguf import smollm2_checkpoint

        hf_dir = smollm2_checkpoint()
        backbone, config = load_pretrained(hf_dir)
    params = bt.init_params(config, jax.random.key(0), backbone=backbone)
    if name == "tiny":
        tmp = tempfile.TemporaryDirectory()
        hf_dir = tmp.name
        save_pretrained(params["backbone"], config, hf_dir)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    tokens, mask = make_pairs(config.vocab_size, pairs, seq, pad)
    head = np.asarray(params["head"]["kernel"])
    r_torch, torch_ps, torch_first = torch_side(hf_dir, head, tokens, mask, steps, lr, pad)
    r_jax, jax_ps, jax_first = rubrax_side(params, config, tokens, mask, steps, lr)
    diff = float(np.max(np.abs(r_jax - r_torch)))
    print(
        f"{name}: {pairs} pairs x 2 x {seq} tokens, {steps} timed steps | rubrax {jax_ps:.2f} pairs/s "
        f"(first step incl. compile {jax_first:.1f}s) | torch {torch_ps:.2f} pairs/s (first {torch_first:.1f}s) "
        f"| ratio {jax_ps / torch_ps:.2f} | max |r_rubrax - r_torch| at init {diff:.2e}",
        flush=True,
    )
    if tmp is not None:
        tmp.cleanup()
    return {
        f"{name}_rubrax_pairs_per_s": jax_ps,
        f"{name}_torch_pairs_per_s": torch_ps,
        f"{name}_ratio": jax_ps / torch_ps,
        f"{name}_max_reward_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (default 16 tiny, 4 smollm2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 64 tiny, 128 smollm2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 tiny, 3 smollm2)")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    defaults = {"tiny": (16, 64, 10), "smollm2": (4, 128, 3)}
    out: dict[str, float] = {}
    for name in args.models.split(","):
        pairs, seq, steps = defaults[name]
        out.update(bench(name, args.pairs or pairs, args.seq or seq, args.steps or steps, args.lr))
    import jax

    print(" ".join(f"{k}={v:.4g}" for k, v in out.items()) + f" backend={jax.default_backend()} cpus={os.cpu_count()}")


if __name__ == "__main__":
    main()

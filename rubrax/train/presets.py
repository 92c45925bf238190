"""Named training settings: the paper's and tiny CPU ones.

- "paper" BT: the paper's Bradley-Terry baseline (Sec. 5): lr 1e-5, 10 epochs, cosine
  schedule, warmup ratio 0.1. The paper gives no batch size, weight decay or clipping
  for it; 64 pairs per update, no weight decay and clipping at 1.0 are our choices.
- "paper" SFT: the paper's SFT arm gives no hyper-parameters; we use its RL settings'
  lr 1e-5 and warmup ratio 0.1 with a cosine decay, 2 epochs, 64 sequences per update.
- "tiny": settings that make a tiny random-init model learn in seconds on a CPU.
"""

from __future__ import annotations

from rubrax.train.optim import OptimConfig
from rubrax.train.trainer import TrainConfig

def _config(lr: float, batch_size: int, epochs: int, log_every: int, checkpoint_every: int) -> TrainConfig:
    return TrainConfig(
        optim=OptimConfig(learning_rate=lr, schedule="cosine", warmup_ratio=0.1, max_grad_norm=1.0),
        batch_size=batch_size, num_epochs=epochs, log_every=log_every, checkpoint_every=checkpoint_every,
    )


_TINY = _config(3e-3, batch_size=16, epochs=3, log_every=5, checkpoint_every=50)

PRESETS: dict[str, dict[str, TrainConfig]] = {
    "reward-model": {"paper": _config(1e-5, batch_size=64, epochs=10, log_every=10, checkpoint_every=500), "tiny": _TINY},
    "sft": {"paper": _config(1e-5, batch_size=64, epochs=2, log_every=10, checkpoint_every=500), "tiny": _TINY},
}


def preset(task: str, name: str) -> TrainConfig:
    if task not in PRESETS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(PRESETS)}")
    if name not in PRESETS[task]:
        raise KeyError(f"unknown preset {name!r} for {task}; known: {sorted(PRESETS[task])}")
    return PRESETS[task][name]

"""Train a Bradley-Terry reward model (the paper's BT baseline, Sec. 5).

    python experiments/train_reward_model.py --train pairs.jsonl --model PATH --preset paper --out runs/bt
    python experiments/train_reward_model.py --train pairs.jsonl --preset tiny --out runs/bt-tiny   # CPU

Pairs: {prompt, chosen, rejected} or {prompt, response_a, response_b, label} JSONL lines
(rubrax.data.pairs builds on-policy / off-policy / mixed sets with any judge).
The "paper" preset is lr 1e-5, 10 epochs, cosine, warmup ratio 0.1 (rubrax.train.presets).
Rerunning with the same --out resumes from the last checkpoint.
"""

import sys

from rubrax.train.cli import main

if __name__ == "__main__":
    sys.exit(main("reward-model"))

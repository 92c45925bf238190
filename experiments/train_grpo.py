"""GRPO / RLOO / Dr. GRPO training from a JSON recipe (the paper's RL stage).

    python experiments/train_grpo.py --config experiments/configs/grpo_tiny.json --out runs/grpo-tiny      # CPU, < 1 min
    python experiments/train_grpo.py --config experiments/configs/grpo_paper.json --out runs/health \
        --set model=/models/Qwen3-8B-Base --set train=data/health_train.jsonl

Rerunning with the same --out resumes from the latest checkpoint. Multi-host: call
with the same arguments on every host after `jax.distributed.initialize()`, with --out
on a filesystem all hosts see (train() across two processes, stopped and resumed, is
tested to equal one process). Logic lives in rubrax.rl.recipe / rubrax.rl.loop.
"""

import sys

from rubrax.rl.cli import main

if __name__ == "__main__":
    sys.exit(main())

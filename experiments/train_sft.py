"""Supervised fine-tuning on {prompt, response} records (the paper's "SFT on great responses").

    python experiments/train_sft.py --train sft.jsonl --model PATH --preset paper --out runs/sft
    python experiments/train_sft.py --train sft.jsonl --preset tiny --out runs/sft-tiny   # CPU

Loss on response tokens only; the prompt goes through the tokenizer's chat template.
Rerunning with the same --out resumes from the last checkpoint.
"""

import sys

from rubrax.train.cli import main

if __name__ == "__main__":
    sys.exit(main("sft"))

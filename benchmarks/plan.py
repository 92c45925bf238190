"""Per-device memory of the recipes that matter, from `rubrax plan` on 8 fake CPU devices.

    python benchmarks/plan.py            # about 2 minutes on 2 CPU cores

Plans (compiled ahead of time from abstract shapes, no weights; see rubrax/plan.py):
- the paper's GRPO recipe, experiments/configs/grpo_paper.json (Qwen3-8B, T = 3584,
  6 rows/device x accumulation 2, FSDP, bf16 over float32): the update and the sampler;
- SmolLM2-135M's RL update at T = 1024 with 4 rows per device (bf16, remat full, FSDP);
- the paper-scale SFT and Bradley-Terry recipes (experiments/configs/{sft,bt}_paper.json).
Targets (issue "The paper's recipe on accelerators"): paper update and sampler <= 40 GB,
SmolLM2 update <= 2 GB. CPU plans are a proxy for an accelerator's: XLA:CPU computes
bf16 matmul outputs and collectives in float32 (see README), so they overstate.
Last line: `key=value` figures in GB.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"

SMOLLM2_RL = {
    "model": "smollm2",
    "model_settings": {"dtype": "bfloat16", "param_dtype": "float32", "remat": "full"},
    "reward": {"name": "target_word"},
    "rl": {"group_size": 4, "kl_coef": 0.01},
    "sample": {"n": 4, "max_new_tokens": 960},
    "loop": {"total_steps": 1, "prompts_per_step": 8, "max_prompt_tokens": 64, "fsdp": True},
}  # 8 prompts x 4 samples = 32 rows = 4 per device; T = 64 + 960 = 1024


def main() -> int:
    from rubrax import plan

    def load(name):
        with open(os.path.join(ROOT, "experiments", "configs", name)) as f:
            return json.load(f)

    figures = {}
    for key, config, source in (("paper", load("grpo_paper.json"), "experiments/configs/grpo_paper.json"),
                                ("smollm2", SMOLLM2_RL, "SmolLM2-135M RL, T=1024, 4 rows/device"),
                                ("sft_paper", load("sft_paper.json"), "experiments/configs/sft_paper.json"),
                                ("bt_paper", load("bt_paper.json"), "experiments/configs/bt_paper.json")):
        p = plan.plan_recipe(config, devices=8, source=source)
        print(p.table(), flush=True)
        for prog in p.programs:
            figures[f"{key}_{prog.name}_peak_gb"] = prog.peak / plan.GB
            figures[f"{key}_{prog.name}_compile_s"] = prog.compile_s
    fits = figures["paper_update_peak_gb"] <= 40 and figures["paper_sampler_peak_gb"] <= 40 \
        and figures["smollm2_update_peak_gb"] <= 2
    print(f"targets_met={'yes' if fits else 'no'} " + " ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

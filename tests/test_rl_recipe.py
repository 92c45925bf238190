"""GRPO recipes: every shipped config parses; overrides; errors; the CLI end to end."""

import glob
import json
import os

import pytest

from rubrax.rl.cli import apply_overrides
from rubrax.rl.recipe import load_recipe, parse_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "grpo_*.json")))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"grpo_paper.json", "grpo_tiny.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_parses(path):
    recipe = load_recipe(path)
    assert recipe.sample.n == recipe.rl.group_size
    loop = recipe.loop_config(5000, out_dir="/tmp/x")
    assert loop.total_steps >= 1


def test_paper_recipe_values():
    r = load_recipe(os.path.join(ROOT, "experiments", "configs", "grpo_paper.json"))
    assert (r.rl.group_size, r.rl.kl_coef, r.rl.grad_accum, r.loop["prompts_per_step"]) == (16, 0.01, 2, 6)
    assert (r.optim.learning_rate, r.optim.schedule, r.optim.warmup_ratio) == (1e-5, "constant", 0.1)
    assert r.loop["max_prompt_tokens"] + r.sample.max_new_tokens == 3584
    # 2 epochs of 5000 prompts at 6 prompts per step
    assert r.loop_config(5000, out_dir="/tmp/x").total_steps == 1667


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        parse_recipe({"model": "tiny", "loop": {"total_steps": 1, "prompts_per_step": 1}, "lr": 1})
    with pytest.raises(ValueError, match=r"rl: unknown RLConfig field\(s\) \['beta'\]"):
        parse_recipe({"model": "tiny", "rl": {"group_size": 4, "beta": 0.1}, "loop": {"total_steps": 1, "prompts_per_step": 1}})
    with pytest.raises(ValueError, match="sample.n=3 must equal rl.group_size=4"):
        parse_recipe({"model": "tiny", "rl": {"group_size": 4}, "sample": {"n": 3}, "loop": {"total_steps": 1, "prompts_per_step": 1}})
    with pytest.raises(ValueError, match="total_steps or epochs"):
        parse_recipe({"model": "tiny", "rl": {"group_size": 4}, "loop": {"prompts_per_step": 1}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "tiny",\n "rl": }')
    with pytest.raises(ValueError, match=r"bad.json:2: invalid JSON"):
        load_recipe(bad)


def test_overrides():
    cfg = {"rl": {"kl_coef": 0.01}, "model": "tiny"}
    out = apply_overrides(cfg, ["rl.kl_coef=0.5", "model=/m/qwen", "reward.kwargs.target=yes"])
    assert out == {"rl": {"kl_coef": 0.5}, "model": "/m/qwen", "reward": {"kwargs": {"target": "yes"}}}
    assert cfg["rl"]["kl_coef"] == 0.01
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(cfg, ["rl.kl_coef"])


def test_cli_trains_and_resumes(tmp_path, capsys):
    from rubrax.cli import main

    out = str(tmp_path / "run")
    args = ["rl", "train", "--config", os.path.join(ROOT, "experiments", "configs", "grpo_tiny.json"), "--out", out,
            "--steps", "3", "--no-progress", "--set", "loop.checkpoint_every=2", "--set", "loop.num_devices=1"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert figures["step"] == "3" and "reward_mean" in figures and "eval/reward_mean" in figures
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps[:3] == [0, 1, 2]
    assert sorted(os.listdir(os.path.join(out, "checkpoints")))[:2] == ["2", "3"]
    # a rerun with the same --out finds the run finished: nothing more is trained
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "step=3"

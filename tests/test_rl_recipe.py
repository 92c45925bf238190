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


REWARDS_PY = '''
def constant(prompts, completions, value):
    """TRL-style: one float per completion; `value` comes from the config's kwargs."""
    return [value] * len(completions)


def gappy(prompts, completions, **columns):
    """1.0, except every 4th row of a call (None = invalid)."""
    return [None if i % 4 == 0 else 1.0 for i in range(len(completions))]
'''


def _tiny_config(tmp_path, **reward):
    with open(os.path.join(ROOT, "experiments", "configs", "grpo_tiny.json")) as f:
        config = json.load(f)
    config.pop("reward")
    config.update(reward)
    config["loop"].update(total_steps=2, checkpoint_every=0, num_devices=1, progress=False)
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "my_rewards.py").write_text(REWARDS_PY)
    path = tmp_path / "cfg" / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_rewards_from_a_file_and_a_weighted_list_train_in_a_tiny_run(tmp_path):
    from rubrax.rl.recipe import run_recipe
    from rubrax.train.metrics import read_metrics

    # A file reward relative to the config's folder (the tests run from the repository root).
    one = _tiny_config(tmp_path, reward={"name": "my_rewards.py:constant", "kwargs": {"value": 0.25}})
    run_recipe(load_recipe(one), out_dir=str(tmp_path / "one"))
    rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["reward_mean"] == pytest.approx(0.25) and r["reward_invalid"] == 0 for r in rows)

    # A weighted list: 2 * 0.25 + 0.5 * gappy (1.0 where valid) + 0 * target_word = 1.0 on the valid rows.
    many = _tiny_config(tmp_path, rewards=[
        {"name": "my_rewards.py:constant", "weight": 2.0, "kwargs": {"value": 0.25}},
        {"name": "my_rewards.py:gappy", "weight": 0.5},
        {"name": "target_word", "weight": 0.0, "kwargs": {"target": "yes"}, "label": "yes"},
    ])
    run_recipe(load_recipe(many), out_dir=str(tmp_path / "many"))
    rows = [r for r in read_metrics(tmp_path / "many" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [0, 1]
    rows_per_step = 4 * 8  # prompts_per_step x group size; reward calls of one group (8 rows): 2 gaps each
    for r in rows:
        assert r["reward/constant/mean"] == pytest.approx(0.25) and r["reward/constant/invalid"] == 0
        assert r["reward/gappy/mean"] == pytest.approx(1.0) and r["reward/gappy/invalid"] == rows_per_step // 4
        assert 0.0 <= r["reward/yes/mean"] <= 1.0 and r["reward/yes/invalid"] == 0
        # an item is valid only where every component is: the gaps are masked out of the update
        assert r["reward_invalid"] == rows_per_step // 4 and r["reward_mean"] == pytest.approx(1.0)


def test_wrong_reward_names_say_file_key_and_what_was_tried(tmp_path):
    cases = [
        ({"reward": {"name": "no_such_reward"}}, r"run.json: key 'reward.name': unknown reward 'no_such_reward': not a registered name \(registered: .*target_word"),
        ({"reward": {"name": "missing.py:fn"}}, r"run.json: key 'reward.name': reward 'missing.py:fn': no file 'missing.py' \(tried .*cfg/missing.py, .*missing.py\)"),
        ({"reward": {"name": "rubrax.no_such_module:fn"}}, r"key 'reward.name': reward 'rubrax.no_such_module:fn': tried to import module 'rubrax.no_such_module': no module named"),
        ({"rewards": [{"name": "target_word"}, {"name": "my_rewards.py:nope"}]}, r"key 'rewards\[1\].name': reward 'my_rewards.py:nope': .*my_rewards.py has no attribute 'nope' \(it defines: constant, gappy\)"),
        ({"rewards": [{"name": "my_rewards.py:gappy"}, {"name": "my_rewards.py:gappy", "weight": 2}]}, r"key 'rewards\[1\].label': 'gappy' is also rewards\[0\]'s"),
        ({"rewards": [{"name": "target_word", "weight": "1"}]}, r"key 'rewards\[0\].weight': must be a finite number"),
        ({"reward": {"name": "target_word"}, "rewards": [{"name": "target_word"}]}, r"give 'reward' \(one\) or 'rewards'"),
    ]
    for reward, message in cases:
        with pytest.raises(ValueError, match=message):
            load_recipe(_tiny_config(tmp_path, **reward))
    # kwargs the factory does not take: named at build time, with the key
    from rubrax.rl.recipe import build_reward

    recipe = load_recipe(_tiny_config(tmp_path, reward={"name": "target_word", "kwargs": {"targt": "yes"}}))
    with pytest.raises(ValueError, match=r"run.json: key 'reward.kwargs': reward 'target_word': .*targt"):
        build_reward(recipe.reward, source=recipe.source)

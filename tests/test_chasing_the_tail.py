"""experiments/chasing_the_tail.py: the paper's pipeline end to end on CPU, resumable at
every stage boundary, with clear errors for bad inputs (issue 14, item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from tiny_hf import make_tiny_hf

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "chasing_the_tail.py"
CONFIGS = ROOT / "experiments" / "configs"
STAGES = ("pools", "rubrics", "rtd", "grpo", "export", "responses", "winrate", "healthbench", "report")


def ctt_main(*args):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import chasing_the_tail
    finally:
        sys.path.pop(0)
    return chasing_the_tail.main([str(a) for a in args])


def cpu_config(tmp_path, base_url, model="smollm2", **changes):
    """The shipped CPU config pointed at a test server (and optionally another policy)."""
    cfg = json.loads((CONFIGS / "chasing_the_tail_cpu.json").read_text())
    cfg["endpoint"]["base_url"] = base_url
    cfg["grpo"]["model"] = str(model)
    data = ROOT / "experiments" / "data"
    cfg["prompts"] = {"train": str(data / "ctt_cpu_train.jsonl"), "test": str(data / "ctt_cpu_test.jsonl")}
    cfg["healthbench"] = str(data / "ctt_cpu_healthbench.jsonl")
    cfg.update(changes)
    path = tmp_path / "ctt.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def test_shipped_configs_parse_and_dry_run_counts(capsys):
    """Paper scale, by hand: pools 5000 x (2 + 16 + 16); RTD per prompt: great and great &
    diverse grade 16+14+12+10 and propose 4 each, good grades 2 and proposes 1; GRPO
    ceil(2 x 5000 / 6) = 1667 steps x 6 x 16 per arm; win rate 5 arms x 1000 x 2 orders."""
    assert ctt_main("--config", CONFIGS / "chasing_the_tail_paper.json", "--dry-run") == 0
    out = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "calls=170000 " in out["pools"] and "gemini-2.5-pro=80000" in out["pools"]
    assert "calls=5000 " in out["rubrics"]
    assert "verifier: gpt-4.1-mini=530000" in out["rtd"] and "proposer: gpt-4.1=45000" in out["rtd"]
    assert "calls=800160 " in out["grpo"] and "rl_steps=8335" in out["grpo"]
    assert "calls=10000 " in out["winrate"] and "calls=0" in out["export"]
    assert ctt_main("--config", CONFIGS / "chasing_the_tail_cpu.json", "--dry-run") == 0
    cpu = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    # CPU: 4 prompts; HealthBench set of the 2 test prompts has 3 + 2 criteria, graded for 6 policies
    assert "calls=72 " in cpu["pools"] and "calls=30 " in cpu["healthbench"] and "rl_steps=10" in cpu["grpo"]


def _outputs(run: Path) -> dict[str, bytes]:
    """Every data output of a run (timings and absolute run paths left out)."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if not p.is_file() or rel.startswith(("cache/", "runs/")) and not rel.endswith("done.json") or p.suffix == ".png":
            continue
        if rel.startswith("policies/") and not rel.endswith(".safetensors"):
            continue
        out[rel] = p.read_bytes()
    for metrics in sorted(run.glob("runs/*/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        out[metrics.relative_to(run).as_posix()] = json.dumps([{k: r.get(k) for k in ("step", "reward_mean", "kl", "loss")} for r in rows]).encode()
    return out


def _run(config: Path, out: Path, kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RUBRAX_KILL_AFTER_STAGE", None)
    if kill_after:
        env["RUBRAX_KILL_AFTER_STAGE"] = kill_after
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.slow
def test_killed_at_every_stage_boundary_equals_uninterrupted(tmp_path):
    """Every stage, a tiny random-init policy with SmolLM2's tokenizer (fast RL steps);
    SIGKILL after each stage and a rerun give the uninterrupted run's outputs, and no
    completed call reaches the server twice."""
    policy = make_tiny_hf(tmp_path / "policy")
    with FakeOpenAIServer() as srv:
        config = cpu_config(tmp_path, srv.base_url, model=policy)
        a = _run(config, tmp_path / "a")
        assert a.returncode == 0, a.stderr
        assert "Unclosed" not in a.stderr and "total cost: $0.0000" in a.stderr
        keys_a = set(srv.ok_keys)
        srv.reset_counts()
        for stage in STAGES[:-1]:
            b = _run(config, tmp_path / "b", kill_after=stage)
            assert b.returncode == -9, (stage, b.stderr)
            assert f"stage {stage}: running" in b.stderr
        b = _run(config, tmp_path / "b")
        assert b.returncode == 0, b.stderr
        assert b.stderr.count("complete, skipped") == len(STAGES) - 1
        assert set(srv.ok_keys) == keys_a and max(srv.ok_keys.values()) == 1
    outs_a, outs_b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert sorted(outs_a) == sorted(outs_b)
    assert [k for k in outs_a if outs_a[k] != outs_b[k]] == []
    for name in ("report.md", "winrate/summary.json", "healthbench/summary.json", "policies/4_great_pairs/model.safetensors",
                 "rubrics/4_great_diverse_pairs.lineage.jsonl", "pools/great_diverse.jsonl", "responses/base.jsonl"):
        assert name in outs_a, name
    table = json.loads(outs_a["table.json"])
    assert [r["arm"] for r in table] == ["base policy", "initial_rubric", "1_good_pair", "1_great_pair", "4_great_pairs", "4_great_diverse_pairs"]
    assert all(r["win_rate"] is not None and r["flip_rate"] is not None for r in table[1:])
    assert table[4]["criteria"] > table[1]["criteria"]  # 4 rounds of RTD added criteria
    cost = json.loads(outs_a["cost.json"])
    assert set(cost["stages"]) == set(STAGES) and cost["complete"]
    marker = json.loads(outs_a["stages/rtd.json"])
    assert marker["config"]["rtd"] == {"pool_size": 8, "drop_used": True, "seed": 0} and marker["endpoints"]["local-verifier"]["calls"] > 0


def test_bad_inputs_name_file_line_field_and_lose_nothing(tmp_path, capsys):
    data = ROOT / "experiments" / "data"
    with FakeOpenAIServer() as srv:
        # a config key that does not exist
        config = cpu_config(tmp_path, srv.base_url, rtd={"pool_size": 8, "rounds": 4})
        assert ctt_main("--config", config, "--out", tmp_path / "run", "--stages", "pools") == 2
        assert f"{config}: key 'rtd.rounds': unknown" in capsys.readouterr().err
        # prompts: a missing field, a duplicate id
        for rows, message in [([{"prompt_id": "x", "prompt": "a b c"}, {"prompt_id": "y"}], "train.jsonl:2: field 'prompt'"),
                              ([{"prompt_id": "x", "prompt": "a"}, {"prompt_id": "x", "prompt": "b"}], "train.jsonl:2: field 'prompt_id': duplicate")]:
            (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            config = cpu_config(tmp_path, srv.base_url, prompts={"train": str(tmp_path / "train.jsonl"), "test": str(data / "ctt_cpu_test.jsonl")})
            assert ctt_main("--config", config, "--out", tmp_path / "run", "--stages", "pools") == 2
            assert message in capsys.readouterr().err
        assert srv.requests == 0
        # a pool file with fewer responses than a pair for one prompt: the generated pools are kept
        prompts = [json.loads(x) for x in (data / "ctt_cpu_train.jsonl").read_text().splitlines()]
        good = [{"prompt_id": p["prompt_id"], "response_id": f"g{i}", "prompt": p["prompt"], "response": f"answer {i}", "source_model": "g"}
                for p in prompts for i in range(2 if p["prompt_id"] != "t3" else 1)]
        (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
        base = json.loads(cpu_config(tmp_path, srv.base_url).read_text())
        pools = {**base["pools"], "good": {"file": str(tmp_path / "good.jsonl")}}
        config = cpu_config(tmp_path, srv.base_url, pools=pools)
        assert ctt_main("--config", config, "--out", tmp_path / "run", "--stages", "pools") == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'good.jsonl'}:5: field 'prompt_id': pool 'good' has 1 response(s) for prompt_id 't3'; a pair needs 2" in err
        assert len((tmp_path / "run" / "pools" / "great.jsonl").read_text().splitlines()) == 32
        calls = srv.ok
        # the failed attempt's calls are counted in the cost ledger
        (attempt,) = [json.loads(x) for x in (tmp_path / "run" / "stages" / "pools.attempts.jsonl").read_text().splitlines()]
        assert sum(e["calls"] for e in attempt["endpoints"].values()) == calls == 64 and "a pair needs 2" in attempt["error"]
        assert json.loads((tmp_path / "run" / "cost.json").read_text())["failed_attempts"] == {"pools": [0.0]}
        good.append({**good[4], "response_id": "g1"})
        (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
        assert ctt_main("--config", config, "--out", tmp_path / "run", "--stages", "pools") == 0
        assert srv.ok == calls  # the pools already generated were not asked again
        # a later stage before its inputs exist
        assert ctt_main("--config", config, "--out", tmp_path / "run", "--stages", "rtd") == 2
        assert "stage 'rtd' needs stage 'rubrics' first" in capsys.readouterr().err
        # a finished stage whose config changed
        changed = cpu_config(tmp_path, srv.base_url, pools=pools, sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 128})
        assert ctt_main("--config", changed, "--out", tmp_path / "run", "--stages", "pools") == 2
        assert "key 'sampling': stage 'pools'" in capsys.readouterr().err
        assert (tmp_path / "run" / "stages" / "pools.json").exists()


def test_bad_grpo_and_healthbench_inputs(tmp_path):
    from rubrax.data.records import RecordError
    from rubrax.pipeline import load_config
    from rubrax.pipeline.stages import Context, grpo_recipe, stage_healthbench

    base = json.loads(cpu_config(tmp_path, "http://127.0.0.1:9/v1").read_text())
    config = cpu_config(tmp_path, "http://127.0.0.1:9/v1", grpo={**base["grpo"], "rl": {**base["grpo"]["rl"], "clip": 0.2}})
    cfg = load_config(config)
    with pytest.raises(ValueError, match=r"ctt.json: grpo: rl: unknown RLConfig field\(s\) \['clip'\]"):
        grpo_recipe(Context(cfg, tmp_path / "run"), cfg.arms[0])
    hb = [json.loads(x) for x in (ROOT / "experiments" / "data" / "ctt_cpu_healthbench.jsonl").read_text().splitlines()][:1]
    (tmp_path / "hb.jsonl").write_text(json.dumps(hb[0]) + "\n")
    cfg = load_config(cpu_config(tmp_path, "http://127.0.0.1:9/v1", healthbench=str(tmp_path / "hb.jsonl")))
    with pytest.raises(RecordError, match=r"hb.jsonl: field 'prompt_id': no rubric for test prompt_id \['h2'\]"):
        stage_healthbench(Context(cfg, tmp_path / "run"))


@pytest.mark.slow
def test_cpu_config_with_smollm2_every_stage(tmp_path):
    """The shipped CPU preset as the README runs it: SmolLM2-135M policy, 2 RL steps per arm."""
    with FakeOpenAIServer() as srv:
        proc = _run(cpu_config(tmp_path, srv.base_url), tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "Unclosed" not in proc.stderr
    run = tmp_path / "run"
    assert all((run / "stages" / f"{s}.json").exists() for s in STAGES)
    table = json.loads((run / "table.json").read_text())
    assert len(table) == 6 and all(0.0 <= r["win_rate"] <= 1.0 for r in table[1:]) and table[0]["healthbench"] is not None
    assert (run / "curve_reward.png").stat().st_size > 0 and "| 4_great_diverse_pairs | great_diverse | 4 |" in (run / "report.md").read_text()
    assert len([json.loads(x) for x in (run / "runs" / "4_great_pairs" / "metrics.jsonl").read_text().splitlines() if "reward_mean" in x]) == 2

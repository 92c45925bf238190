"""The simulated proposer / verifier through the shared RTD and rubric-reward code, and
the configuration checks of the tail-world experiment."""

import asyncio
import dataclasses

import numpy as np
import pytest

from rubrax.elicit import rtd
from rubrax.rewards.rubric import RubricReward
from rubrax.sim import generators as G
from rubrax.sim.agents import ProposerConfig, SimProposer, SimVerifier, VerifierConfig
from rubrax.sim.predicates import parse_predicate
from rubrax.rl.step import RLConfig
from rubrax.sim.presets import ARMS, BTSettings, SimConfig, get_preset
from rubrax.sim.world import WorldConfig, make_world


def _advanced_coverage(world, rubric):
    p = world.prompt(rubric.prompt_id)
    named = {w for c in rubric.criteria if (q := parse_predicate(c.text)) for w in q.words()}
    return len(named & set(p.advanced)) / len(p.advanced)


async def _rubrics(world, diverse: bool, seed: int = 0):
    proposer = SimProposer(world, ProposerConfig(seed=seed, p_fail=0.0))
    verifier = SimVerifier(VerifierConfig(seed=seed))
    specs = G.great_specs(world, G.GeneratorsConfig())
    out = []
    for p in world.prompts:
        initial = await rtd.propose_initial(proposer, p.id, p.text)
        if diverse:
            texts = [(s.name, t) for j in range(4) for s in specs for t in [G.sample_responses(world, s, p, 4, seed)[j]]]
        else:
            texts = [(specs[0].name, t) for t in G.sample_responses(world, specs[0], p, 16, seed)]
        pool = [rtd.Candidate(f"{p.id}-{i}", t, src) for i, (src, t) in enumerate(texts)]
        res = await rtd.iterative_rtd(proposer, verifier, initial, pool, rounds=4, seed=seed)
        assert len(res.lineage) == 4
        out.append((initial, res.rubric))
    return out


def test_rtd_on_great_and_diverse_pool_finds_the_hidden_requirements():
    """The world's diversity mechanism through the shared RTD code: a pool spanning all
    great generators yields rubrics naming more of the hidden advanced requirements than
    a pool from one great generator, and both beat the prompt-only rubric (which names none)."""
    world = make_world(seed=0)
    single = asyncio.run(_rubrics(world, diverse=False))
    diverse = asyncio.run(_rubrics(world, diverse=True))
    assert all(_advanced_coverage(world, init) == 0 for init, _ in single)
    cov_single = np.mean([_advanced_coverage(world, r) for _, r in single])
    cov_diverse = np.mean([_advanced_coverage(world, r) for _, r in diverse])
    assert cov_diverse > cov_single > 0.2, (cov_single, cov_diverse)


def test_sim_agents_drive_rubric_reward_and_keep_rubric_on_failure():
    world = make_world(seed=1)
    p = world.prompts[0]
    proposer = SimProposer(world, ProposerConfig(p_fail=1.0))
    initial = asyncio.run(rtd.propose_initial(proposer, p.id, p.text))
    assert asyncio.run(rtd.refine_once(proposer, initial, "a b", "c d")) == initial  # failed: kept
    reward = RubricReward({p.id: initial}, SimVerifier(VerifierConfig(error_rate=0.0)))
    good = f"{p.topic} {p.aspect} {' '.join(p.decoys)} so it is the and we"  # meets every initial criterion
    out = reward([p.text, p.text], [good, "so"], prompt_id=[p.id, p.id])
    assert out.valid.all()
    assert out.scores[0] == pytest.approx(1.0)
    # "so": one word, no criterion met but "repeats no word more than 2 times" (weight 1)
    assert out.scores[1] == pytest.approx(1 / sum(c.weight for c in initial.criteria))


def test_presets_parse_and_bad_config_fails_before_training():
    for name in ("cpu", "study", "tiny"):
        cfg = get_preset(name)
        assert set(cfg.arms) <= set(ARMS) and cfg.seeds
    assert get_preset("cpu").arms == ARMS
    with pytest.raises(ValueError, match="rl_steps must be >= 1"):
        SimConfig(rl_steps=0)
    with pytest.raises(ValueError, match="kl_coef"):
        SimConfig(rl=RLConfig(group_size=8, kl_coef=-0.1))
    with pytest.raises(ValueError, match="sample.n=4 must equal rl.group_size=8"):
        dataclasses.replace(get_preset("cpu"), sample=dataclasses.replace(get_preset("cpu").sample, n=4))
    with pytest.raises(ValueError, match="lr must be > 0"):
        BTSettings(lr=-1e-3)
    with pytest.raises(ValueError, match="needs 14 distinct content words"):
        SimConfig(world=WorldConfig(n_advanced=6, n_excellent=4, n_decoys=2, n_content_words=12))
    with pytest.raises(ValueError, match="unknown arm"):
        SimConfig(arms=("gold", "ppo_magic"))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpu")
    with pytest.raises(ValueError, match="probability"):
        dataclasses.replace(get_preset("cpu"), generators=G.GeneratorsConfig(base_p_excellent=1.5))


def test_cli_rejects_bad_config_without_writing(tmp_path, capsys):
    from rubrax.cli import main

    rc = main(["sim", "run", "--preset", "tiny", "--arms", "gold,nope", "--out", str(tmp_path), "--run", "x"])
    assert rc == 2
    assert "unknown arm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

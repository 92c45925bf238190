"""The host loop with a real (tiny) rubrax transformer and rubrax.policy.sample:
learning on a programmatic task, KL control, exact resume, failing rewards, columns."""

import asyncio
import json

import jax
import numpy as np
import pytest

from rubrax.models import ModelConfig, init_params
from rubrax.policy import SampleConfig
from rubrax.rewards.base import RewardBatch, RewardFnBase
from rubrax.rl.hooks import reward_eval_hook, winrate_eval_hook
from rubrax.rl.loop import LoopConfig, train
from rubrax.rl.prompts import load_prompts
from rubrax.rl.step import RLConfig
from rubrax.sharding import make_mesh
from rubrax.rl.toy import TargetWordReward, toy_prompts, toy_tokenizer
from rubrax.train.metrics import read_metrics
from rubrax.train.optim import OptimConfig

G = 8
TOK = toy_tokenizer()
CONFIG = ModelConfig.tiny(
    vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=64,
    bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
)
SAMPLE = SampleConfig(max_new_tokens=6, n=G, prompt_bucket=8)
OPTIM = OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0)
ONE_DEVICE = make_mesh(jax.devices()[:1])  # 8 fake devices on 2 cores only add overhead; see the 1-vs-8 test


def run(steps, *, rl=None, reward=None, prompts=None, mesh=ONE_DEVICE, step_hooks=(), **loop_kw):
    loop_kw = {"total_steps": steps, "prompts_per_step": 4, "max_prompt_tokens": 8, "progress": False, **loop_kw}
    return train(
        params=init_params(CONFIG, jax.random.PRNGKey(0)), model_config=CONFIG, tokenizer=TOK,
        reward_fn=reward or TargetWordReward(target="yes"), prompts=prompts or toy_prompts(64),
        rl=rl or RLConfig(group_size=G), sample=SAMPLE, optim=OPTIM, loop=LoopConfig(**loop_kw), mesh=mesh,
        step_hooks=step_hooks,
    )


@pytest.mark.slow
def test_reward_rises_and_high_kl_keeps_policy_near_reference():
    free = run(20, rl=RLConfig(group_size=G, kl_coef=1e-4))
    tied = run(20, rl=RLConfig(group_size=G, kl_coef=1.0))
    r_free = [h["reward_mean"] for h in free.history]
    r_tied = [h["reward_mean"] for h in tied.history]
    # chance level is 1/26 per word; the free policy learns to say "yes" almost always
    assert np.mean(r_free[:3]) < 0.1
    assert np.mean(r_free[-5:]) > 0.7
    kl_free, kl_tied = free.history[-1]["kl"], tied.history[-1]["kl"]
    assert kl_tied < 0.25 * kl_free
    assert np.mean(r_tied[-5:]) < np.mean(r_free[-5:]) - 0.2
    # greedy held-out evaluation through the eval-hook interface agrees
    held_out = load_prompts(toy_prompts(8, seed=9), TOK, max_prompt_tokens=8)
    hook = reward_eval_hook(held_out, TargetWordReward(target="yes"), TOK, CONFIG,
                            SampleConfig(max_new_tokens=6, n=1, temperature=0.0, prompt_bucket=8), max_prompt_tokens=8)
    assert hook(20, free.state.params)["reward_mean"] > 0.9
    # win rate through rubrax.eval against reference answers that never say "yes"
    judge = YesJudge()
    wr = winrate_eval_hook(held_out, ["no"] * len(held_out), judge, TOK, CONFIG,
                           SampleConfig(max_new_tokens=6, n=1, temperature=0.0, prompt_bucket=8), max_prompt_tokens=8)
    before, after = wr(0, init_params(CONFIG, jax.random.PRNGKey(0))), wr(20, free.state.params)
    assert after["win_rate"] == 1.0 and after["win_rate_failed"] == 1 and before["win_rate"] < 0.5
    assert judge.calls and all(p.startswith("say ") for p, _, _ in judge.calls)


class YesJudge:
    """A pairwise judge that prefers the response with more "yes"; fails on item 0."""

    def __init__(self):
        self.calls = []

    async def compare(self, prompt, a, b, *, key, swap=False):
        self.calls.append((prompt, a, b))
        if key.endswith(":0"):
            return None
        return "a" if a.split().count("yes") > b.split().count("yes") else "b"


DEVICE_KEYS = ("reward_mean", "loss", "kl", "entropy", "grad_norm", "clip_frac", "response_len_mean")


@pytest.mark.parametrize("overlap", ["sync", "one_step_off_policy"])
def test_stop_and_resume_matches_uninterrupted(tmp_path, overlap):
    rl = RLConfig(group_size=G, kl_coef=0.05, ppo_epochs=2, num_minibatches=2)
    full = run(3, rl=rl, overlap=overlap, out_dir=str(tmp_path / "full"), checkpoint_every=2)
    first = run(3, rl=rl, overlap=overlap, out_dir=str(tmp_path / "cut"), checkpoint_every=2, stop_after=2)
    assert int(first.state.step) == 2
    resumed = run(3, rl=rl, overlap=overlap, out_dir=str(tmp_path / "cut"), checkpoint_every=2)
    assert [h["step"] for h in resumed.history] == [2]
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for s in a:
        for k in DEVICE_KEYS:
            assert a[s][k] == b[s][k], (s, k)
    for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # one compilation for all three runs (and both overlap modes): same config, same shapes
    assert resumed.trainer is full.trainer and full.trainer.update_fn._cache_size() == 1


class RecordingHook:
    """A step hook that checks its view against the reward function and logs two numbers."""

    def __init__(self):
        self.steps = []

    def __call__(self, view):
        ro = view.rollouts
        assert ro.tokens.shape[0] == len(ro.completions) == 4 * G and view.step == ro.step
        expected = TargetWordReward(target="yes")([view.prompts.texts[i] for i in np.repeat(ro.indices, G)], ro.completions)
        np.testing.assert_array_equal(view.scores_B, expected.scores)
        assert view.valid_B.all()
        assert view.metrics["reward_mean"] == pytest.approx(float(view.scores_B.mean()), abs=1e-6)
        with pytest.raises(ValueError):  # read-only
            view.scores_B[0] = 1.0
        self.steps.append(view.step)
        return {"hook/yes_rows": float(view.scores_B.sum()), "hook/kl": view.metrics["seq_kl"]}


def test_step_hooks_see_each_step_and_their_metrics_are_logged(tmp_path):
    """Step hooks run once per step (also across a resume), with the step's rollouts, rewards
    and update metrics; what they return lands in the step's metrics record."""
    rl = RLConfig(group_size=G, kl_coef=0.05)
    hook = RecordingHook()
    kw = dict(rl=rl, out_dir=str(tmp_path), checkpoint_every=2, step_hooks=[hook])
    first = run(3, stop_after=2, **kw)
    resumed = run(3, **kw)
    assert hook.steps == [0, 1, 2]
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(records) == [0, 1, 2]
    for r in first.history + resumed.history:
        assert r["hook/yes_rows"] == records[r["step"]]["hook/yes_rows"] and r["hook/kl"] == r["seq_kl"]
    assert records[0]["hook/kl"] == pytest.approx(0.0, abs=1e-4)  # step 0 samples the reference policy itself
    with pytest.raises(ValueError, match="reward_mean"):
        run(1, step_hooks=[lambda view: {"reward_mean": 0.0}])


class FlakyJudge(RewardFnBase):
    """Raises for one prompt, hangs past the timeout for another, scores the rest."""

    def __init__(self):
        self.seen = []

    async def acall(self, prompts, completions, **columns):
        self.seen.append((list(prompts), dict(columns)))
        pid = columns["prompt_id"][0]
        if pid.endswith("-1"):
            raise RuntimeError("judge exploded")
        if pid.endswith("-2"):
            await asyncio.sleep(30)
        return RewardBatch(np.array([float("yes" in c.split()) for c in completions], np.float32), np.ones(len(completions), bool))


def test_failing_and_hanging_rewards_are_masked_and_counted(tmp_path):
    prompts = [{"prompt": "say red", "prompt_id": f"p-{i}", "difficulty": i * 10} for i in range(4)]
    judge = FlakyJudge()
    out = run(2, reward=judge, prompts=prompts, reward_timeout_s=0.5, out_dir=str(tmp_path))
    for h in out.history:
        assert h["reward_exceptions"] == G and h["reward_timeouts"] == G
        assert h["reward_invalid"] == 2 * G
        assert np.isfinite(h["loss"])
    assert int(out.state.step) == 2
    # extra record columns reach the reward function, repeated per sample, aligned with prompts
    for texts, cols in judge.seen:
        assert len(texts) == G and set(cols) == {"prompt_id", "difficulty"}
        assert len(set(cols["prompt_id"])) == 1 and cols["difficulty"] == [int(cols["prompt_id"][0][2:]) * 10] * G
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "say red"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: field 'prompt'"):
        load_prompts(str(path), TOK, max_prompt_tokens=8)
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"prompt": "say " + "red " * n}) for n in (1, 20)))
    assert len(load_prompts(str(long), TOK, max_prompt_tokens=8)) == 1


def test_loop_config_validation():
    with pytest.raises(ValueError, match="overlap"):
        LoopConfig(total_steps=1, prompts_per_step=1, overlap="async")
    with pytest.raises(ValueError, match="out_dir"):
        LoopConfig(total_steps=1, prompts_per_step=1, checkpoint_every=5)
    with pytest.raises(ValueError, match="group_size"):
        run(1, rl=RLConfig(group_size=4))


def assert_same_run(a, b, params_b=None):
    """Two runs drew the same samples and rewards and trained alike: metrics to 1e-4,
    params to 1e-5 (params_b: b's params in a's layout, if it differs)."""
    assert len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history):
        assert x["reward_mean"] == y["reward_mean"] and x["response_len_mean"] == y["response_len_mean"]
        for k in ("loss", "kl", "entropy", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(params_b or b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_trimmed_prompts_train_like_padded_ones():
    """A batch trimmed to its longest prompt (rounded up to SampleConfig.prompt_bucket) trains like the batch padded
    to max_prompt_tokens=16: same samples and rewards, same metrics and params up to float
    rounding; the update sees the narrower batch."""
    rl = RLConfig(group_size=G, kl_coef=0.05)
    wide = run(2, rl=rl, max_prompt_tokens=16)
    trim = run(2, rl=rl, max_prompt_tokens=16, trim_prompts=True)
    assert_same_run(wide, trim)
    # the update saw the narrow batch: the sampler hands out prompt blocks of width 8 < 16
    from rubrax.rl.rollouts import RolloutSampler

    prompts = load_prompts(toy_prompts(64), TOK, max_prompt_tokens=16)
    sampler = RolloutSampler(prompts, TOK, CONFIG, SAMPLE, np.asarray(jax.random.PRNGKey(0)), prompts_per_step=4, max_prompt_tokens=16,
                             prompt_bucket=SAMPLE.prompt_bucket)
    ro = sampler(0, trim.state.params)
    longest = max(len(prompts.tokens[i]) for i in ro.indices)
    assert ro.prompt_tokens.shape[1] == -(-longest // 8) * 8 < 16


def test_loop_on_eight_devices_equals_one_device():
    """The whole loop on an 8-device mesh (sampling split over the devices through the
    params' placement, update data parallel) reproduces the 1-device run."""
    rl = RLConfig(group_size=G, kl_coef=0.05)
    one = run(2, rl=rl)
    eight = run(2, rl=rl, mesh=make_mesh(jax.devices()))
    assert_same_run(one, eight)


def test_scan_and_unrolled_layer_loops_train_alike():
    """LoopConfig.layer_loop: the scan over stacked layers and the unrolled per-layer
    layout (the CPU default) give the same run; the result keeps its layout."""
    from rubrax.models import is_unstacked, stack_layers

    rl = RLConfig(group_size=G, kl_coef=0.05)
    a = run(2, rl=rl, layer_loop="scan")
    b = run(2, rl=rl, layer_loop="unrolled")
    assert not is_unstacked(a.state.params) and is_unstacked(b.state.params)
    assert_same_run(a, b, params_b=stack_layers(b.state.params))


def test_loop_with_hybrid_fsdp_equals_one_device_and_frees_the_donated_params():
    """LoopConfig(fsdp=True, fsdp_axis_size=4): a 2 x 4 ("data", "fsdp") mesh, params and
    Adam moments split over the 4-device axis, sampling and the update over all 8 devices;
    the same run as one device. With donate_params=True the caller's (unsharded) params
    are freed once the run holds its sharded copies (no second full copy for the run)."""
    rl = RLConfig(group_size=G, kl_coef=0.05)
    one = run(2, rl=rl, layer_loop="scan")
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    loop = LoopConfig(total_steps=2, prompts_per_step=4, max_prompt_tokens=8, progress=False, layer_loop="scan",
                      fsdp=True, fsdp_axis_size=4)
    hybrid = train(params=params, model_config=CONFIG, tokenizer=TOK, reward_fn=TargetWordReward(target="yes"),
                   prompts=toy_prompts(64), rl=rl, sample=SAMPLE, optim=OPTIM, loop=loop, donate_params=True)
    assert dict(hybrid.trainer.mesh.shape) == {"data": 2, "fsdp": 4}
    kernel = hybrid.state.params["layers"]["mlp"]["up_proj"]["kernel"]  # [L, D, F]
    assert kernel.sharding.spec[2] == "fsdp" and kernel.addressable_shards[0].data.shape[2] == kernel.shape[2] // 4
    assert all(x.is_deleted() for x in jax.tree.leaves(params))
    assert_same_run(one, hybrid)
    with pytest.raises(ValueError, match="fsdp_axis_size"):
        LoopConfig(total_steps=1, prompts_per_step=1, fsdp_axis_size=4)

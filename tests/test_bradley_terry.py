"""Bradley-Terry reward model: loss, head position, trainable parameters, learning, BTReward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.data.pairs import PreferencePair, encode_pairs
from rubrax.models import ModelConfig, hidden_states
from rubrax.rewards import available_rewards, get_reward
from rubrax.rewards import bradley_terry as bt
from rubrax.models.tokenizer import WordTokenizer
from rubrax.train.optim import OptimConfig
from rubrax.train.reward_model import train_reward_model
from rubrax.train.trainer import TrainConfig

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu nu xi rho tau please".split()
TOK = WordTokenizer(WORDS)
# Untied embeddings, so the model has an lm_head that the reward must leave alone.
CFG = ModelConfig.tiny(
    vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
)


def nls(x):  # -log sigmoid(x), by hand
    return math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- loss


def test_bt_loss_hand_computed():
    r = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    loss, m = bt.bt_loss(r)
    assert float(loss) == pytest.approx((nls(2.0) + nls(-1.0)) / 2, rel=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["reward_margin"]) == pytest.approx(0.5)
    assert float(m["reward_mean"]) == pytest.approx(0.75)
    loss, m = bt.bt_loss(r, margin_B=jnp.array([0.5, 1.0]), center_coef=0.1)
    # nll: -log s(2 - 0.5), -log s(-1 - 1); centring: 0.1 * mean(2^2, 1^2)
    assert float(m["bt_nll"]) == pytest.approx((nls(1.5) + nls(-2.0)) / 2, rel=1e-6)
    assert float(loss) == pytest.approx((nls(1.5) + nls(-2.0)) / 2 + 0.1 * 2.5, rel=1e-6)
    loss, m = bt.bt_loss(r, weight_B=jnp.array([1.0, 0.0]))
    assert float(loss) == pytest.approx(nls(2.0), rel=1e-6) and float(m["accuracy"]) == 1.0


def test_bt_loss_float32_and_stable_for_large_margins():
    r = jnp.array([[500.0, -500.0], [-500.0, 500.0]], jnp.bfloat16)
    loss, m = bt.bt_loss(r)
    assert loss.dtype == jnp.float32 and float(loss) == pytest.approx(500.0, rel=1e-3)
    assert np.isfinite(float(jax.grad(lambda x: bt.bt_loss(x)[0])(r.astype(jnp.float32))[1, 0]))


def test_bt_config_validation():
    with pytest.raises(ValueError):
        bt.BTConfig(center_coef=-1.0)


# --------------------------------------------------------------------------- head position


def test_last_token_index_left_right_both_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(bt.last_token_index(mask), [2, 4, 2, 4])


@pytest.fixture(scope="module")
def params():
    return bt.init_params(CFG, jax.random.key(0))


def test_score_reads_last_real_token_with_left_and_right_padding(params):
    ids = [1, 3, 7, 8, 9, 2]
    n, t, pad = len(ids), 8, TOK.pad_token_id
    right = np.full((1, t), pad, np.int32)
    right[0, :n] = ids
    left = np.full((1, t), pad, np.int32)
    left[0, t - n :] = ids
    tokens = np.concatenate([right, left])
    mask = (np.arange(t)[None] < n).astype(np.int32)
    mask = np.concatenate([mask, mask[:, ::-1]])
    r = bt.score(params, tokens, mask, config=CFG)
    # Manual: hidden state of the last real token (index 5 right-padded, 7 left-padded).
    h = hidden_states(params["backbone"], tokens, config=CFG, mask_BxT=mask)
    w, b = params["head"]["kernel"], params["head"]["bias"]
    np.testing.assert_allclose(r, [h[0, n - 1] @ w + b, h[1, t - 1] @ w + b], rtol=1e-5)
    assert abs(float(h[0, n] @ w - h[0, n - 1] @ w)) > 1e-3  # another position gives another score
    np.testing.assert_allclose(r[0], r[1], rtol=1e-4, atol=1e-5)  # padding side does not matter
    # Tokens under padding do not change the score.
    noisy = tokens.copy()
    noisy[0, n:] = 5
    noisy[1, : t - n] = 5
    np.testing.assert_allclose(bt.score(params, noisy, mask, config=CFG), r, rtol=1e-5, atol=1e-6)
    assert r.dtype == jnp.float32


def test_score_pairs_stacks_chosen_and_rejected(params):
    pairs = [PreferencePair("alpha beta", "gamma please", "delta"), PreferencePair("mu", "nu xi", "rho tau tau")]
    arr = encode_pairs(TOK, pairs, max_length=16)
    r = bt.score_pairs(params, arr["tokens"], arr["mask"], config=CFG)
    flat = bt.score(params, arr["tokens"].reshape(4, -1), arr["mask"].reshape(4, -1), config=CFG)
    np.testing.assert_allclose(r, flat.reshape(2, 2), rtol=1e-6)


# --------------------------------------------------------------------------- trainable parameters


def test_trainable_mask_structure(params):
    mask = bt.trainable_mask(params)
    assert mask["head"] == {"kernel": True, "bias": True}
    assert jax.tree.leaves(mask["backbone"]["lm_head"]) == [False]
    assert all(jax.tree.leaves(mask["backbone"]["layers"]))
    frozen = bt.trainable_mask(params, freeze_backbone=True)
    assert not any(jax.tree.leaves(frozen["backbone"])) and all(jax.tree.leaves(frozen["head"]))


def synthetic_pairs(n, seed):
    """The preferred response carries the feature word "please"; otherwise random words."""
    rng = np.random.default_rng(seed)
    plain = WORDS[:-1]
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(plain, 3))
        good = list(rng.choice(plain, 4))
        good.insert(int(rng.integers(0, 5)), "please")
        bad = list(rng.choice(plain, int(rng.integers(4, 6))))
        out.append(PreferencePair(prompt, " ".join(good), " ".join(bad)))
    return out


def test_frozen_backbone_trains_head_only_and_resumes_exactly(params, tmp_path):
    data = encode_pairs(TOK, synthetic_pairs(24, 5), max_length=16, pad_to=16)
    cfg = TrainConfig(optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0.0), batch_size=8, progress=False)
    frozen = bt.BTConfig(freeze_backbone=True, center_coef=0.01)
    res = train_reward_model(params, CFG, data, cfg, frozen)
    for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(res.params["backbone"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(params["head"]["kernel"], res.params["head"]["kernel"])
    # Pre-empted after 1 of 3 updates, then resumed: bit-identical to the uninterrupted run.
    train_reward_model(params, CFG, data, cfg, frozen, ckpt_dir=tmp_path / "ck", stop_at=1)
    resumed = train_reward_model(params, CFG, data, cfg, frozen, ckpt_dir=tmp_path / "ck")
    assert int(resumed.state.step) == 3
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_learns_feature_above_95_percent_held_out(params, tmp_path):
    """A tiny BT model reaches > 95% held-out pair accuracy on a set where the preferred
    response carries a feature; the whole backbone trains except the unused lm_head."""
    train = encode_pairs(TOK, synthetic_pairs(256, 0), max_length=16, pad_to=16)
    held = encode_pairs(TOK, synthetic_pairs(128, 1), max_length=16, pad_to=16)
    cfg = TrainConfig(optim=OptimConfig(learning_rate=3e-3, warmup_ratio=0.1), batch_size=32, num_epochs=2, progress=False)
    res = train_reward_model(params, CFG, train, cfg, eval_pairs=held)
    first, last = res.eval_history[0], res.eval_history[-1]
    assert first["step"] == 0 and last["step"] == 16 and last["count"] == 128
    assert last["accuracy"] > 0.95, res.eval_history
    assert last["loss"] < first["loss"]
    np.testing.assert_array_equal(params["backbone"]["lm_head"]["kernel"], res.params["backbone"]["lm_head"]["kernel"])
    emb0, emb1 = params["backbone"]["embed_tokens"]["embedding"], res.params["backbone"]["embed_tokens"]["embedding"]
    assert not np.array_equal(emb0, emb1)

    # The trained model as a reward function, by name, and after a save/load round trip.
    reward = get_reward("bradley_terry", params=res.params, config=CFG, tokenizer=TOK, max_length=16, batch_size=4, length_multiple=8)
    prompts = ["alpha beta", "gamma", "mu nu xi", "rho", "tau tau"]
    completions = ["delta please eps", "delta eps", "please", "zeta eta theta iota kappa", "lam"]
    rb = reward(prompts, completions)
    assert rb.valid.all() and rb.scores.dtype == np.float32
    enc = encode_pairs(TOK, [PreferencePair(p, c, c) for p, c in zip(prompts, completions)], max_length=16)
    expected = bt.score(res.params, enc["tokens"][:, 0], enc["mask"][:, 0], config=CFG)
    np.testing.assert_allclose(rb.scores, expected, rtol=1e-4, atol=1e-5)
    assert rb.scores[0] > rb.scores[1]  # the feature raises the reward
    bt.save_reward_model(tmp_path / "rm", res.params, CFG)
    loaded = bt.BTReward.from_path(tmp_path / "rm", TOK, max_length=16, batch_size=4, length_multiple=8)
    assert loaded.config == CFG
    np.testing.assert_array_equal(loaded(prompts, completions).scores, rb.scores)
    assert "bradley_terry" in available_rewards()


def test_btreward_needs_params_config_tokenizer():
    with pytest.raises(ValueError, match="needs params"):
        bt.BTReward(config=CFG, tokenizer=TOK)


def test_fsdp_training_and_sharded_scoring_equal_one_device(params, tmp_path):
    """A BT model trained with FSDP over 8 devices equals the 1-device one; BTReward
    scores with the sharded params (batches split over the devices), also when restored
    from disk straight into FSDP shardings, and gives the unsharded scores."""
    from rubrax.sharding import make_mesh

    data = encode_pairs(TOK, synthetic_pairs(16, 5), max_length=16, pad_to=16)
    cfg = TrainConfig(optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0.0), batch_size=8, progress=False)
    one = train_reward_model(params, CFG, data, cfg, bt.BTConfig())
    fsdp = train_reward_model(params, CFG, data, dataclasses.replace(cfg, fsdp=True), bt.BTConfig())
    embed = fsdp.params["backbone"]["embed_tokens"]["embedding"]
    assert not embed.sharding.is_fully_replicated and len(embed.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(fsdp.params)):
        # float32 sums in another order, through Adam's g / sqrt(v) on near-zero gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    prompts, completions = ["alpha beta", "gamma", "mu nu xi"], ["delta please eps", "delta eps", "please"]
    kw = dict(max_length=16, batch_size=2, length_multiple=8)
    want = bt.BTReward(one.params, CFG, TOK, **kw)(prompts, completions).scores
    sharded = bt.BTReward(fsdp.params, CFG, TOK, **kw)
    assert sharded.batch_size == 8
    np.testing.assert_allclose(sharded(prompts, completions).scores, want, rtol=1e-5, atol=1e-6)
    bt.save_reward_model(tmp_path / "rm", fsdp.params, CFG)
    loaded = bt.BTReward.from_path(tmp_path / "rm", TOK, mesh=make_mesh(), fsdp=True, **kw)
    assert not loaded.params["backbone"]["embed_tokens"]["embedding"].sharding.is_fully_replicated
    np.testing.assert_allclose(loaded(prompts, completions).scores, want, rtol=1e-5, atol=1e-6)

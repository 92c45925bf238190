"""SFT: data encoding with the chat template, loss on response tokens only, learning."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.data.records import RecordError
from rubrax.data.sft import SFTExample, encode_prompt_response, encode_sft, read_sft
from rubrax.models import ModelConfig, forward, init_params
from rubrax.models.tokenizer import WordTokenizer
from rubrax.train.optim import OptimConfig
from rubrax.train.sft import sft_eval, sft_loss, train_sft
from rubrax.train.trainer import TrainConfig

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa".split()
TOK = WordTokenizer(WORDS)
CFG = ModelConfig.tiny(
    vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1,
    pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
)
W = TOK.word_to_id


def test_encode_sft_layout_hand_checked():
    arr = encode_sft(TOK, [SFTExample("alpha beta", "gamma"), SFTExample("delta", "eps zeta eta")], max_length=32)
    bos, user, asst, eos, pad = W["<bos>"], W["<user>"], W["<assistant>"], W["<eos>"], W["<pad>"]
    row0 = [bos, user, W["alpha"], W["beta"], asst, W["gamma"], eos, pad]
    row1 = [bos, user, W["delta"], asst, W["eps"], W["zeta"], W["eta"], eos]
    np.testing.assert_array_equal(arr["tokens"], [row0, row1])  # padded to a multiple of 8
    np.testing.assert_array_equal(arr["mask"], [[1] * 7 + [0], [1] * 8])
    np.testing.assert_array_equal(arr["loss_mask"], [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    assert arr["tokens"].dtype == np.int32 and arr["loss_mask"].dtype == np.float32


def test_truncation_keeps_the_response():
    prompt = " ".join(["alpha"] * 20)
    ids, n_prompt, truncated = encode_prompt_response(TOK, prompt, "beta gamma", max_length=10)
    assert truncated and len(ids) == 10 and n_prompt == 7
    assert ids[-3:] == [W["beta"], W["gamma"], W["<eos>"]] and ids[-4] == W["<assistant>"]
    ids, n_prompt, truncated = encode_prompt_response(TOK, "alpha", " ".join(["beta"] * 20), max_length=10)
    assert truncated and len(ids) == 10 and n_prompt == 4  # short prompt kept whole


def test_read_sft_errors_name_file_line_field(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "a", "response": "  "}) + "\n")
    with pytest.raises(RecordError) as err:
        read_sft(path)
    assert str(err.value) == f"{path}:3: field 'response': must not be empty"
    assert (err.value.line, err.value.field) == (3, "response")
    path.write_text(json.dumps({"response": "b"}) + "\n")
    with pytest.raises(RecordError, match=r"sft.jsonl:1: field 'prompt': missing"):
        read_sft(path)
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(RecordError, match="'response': must be a string"):
        read_sft(path)
    path.write_text('{"prompt": "a", \n')
    with pytest.raises(RecordError, match="sft.jsonl:1: invalid JSON"):
        read_sft(path)
    with pytest.raises(RecordError, match="<records>:1: field 'prompt'"):
        read_sft([{"prompt": "x", "response": "y"}, {"prompt": "", "response": "y"}])
    assert read_sft([{"prompt": "x", "response": "y", "extra": 1}]) == [SFTExample("x", "y")]


def test_read_sft_from_datasets():
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": ""}])
    with pytest.raises(RecordError, match=r":1: field 'response': must not be empty"):
        read_sft(ds)
    assert read_sft(ds.select([0])) == [SFTExample("p1", "r1")]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_sft_loss_is_mean_nll_of_response_tokens(params):
    arr = encode_sft(TOK, [SFTExample("alpha beta", "gamma"), SFTExample("delta", "eps zeta eta")], max_length=32)
    batch = {k: jnp.asarray(v) for k, v in arr.items()}
    loss, metrics = sft_loss(params, batch, config=CFG)
    logits = np.asarray(forward(params, batch["tokens"], config=CFG, mask_BxT=batch["mask"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    terms = [
        -logp[b, t - 1, arr["tokens"][b, t]]
        for b in range(2)
        for t in range(1, arr["tokens"].shape[1])
        if arr["loss_mask"][b, t] == 1
    ]
    assert len(terms) == 6 and float(metrics["tokens"]) == 6
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
    sums = sft_eval(params, {**batch, "example_weight": jnp.array([1.0, 0.0])}, config=CFG)
    assert float(sums["count"]) == 2 and float(sums["loss"]) == pytest.approx(sum(terms[:2]), rel=1e-5)


def copy_task(n, seed):
    """Response = "<first prompt word> kappa iota": a fixed part plus a copy from the prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS[:8], 4))
        out.append(SFTExample(" ".join(words), f"{words[0]} kappa iota"))
    return out


@pytest.mark.slow
def test_sft_lowers_held_out_loss(tmp_path):
    # A model 64 wide learns the copy in 320 steps (seeds 0-2 checked); the 32-wide CFG sits at the prompt-blind
    # plateau for hundreds of steps (a phase change), which is what this test tells apart.
    config = dataclasses.replace(CFG, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    train = encode_sft(TOK, copy_task(256, 0), max_length=16, pad_to=16)
    held = encode_sft(TOK, copy_task(64, 1), max_length=16, pad_to=16)
    cfg = TrainConfig(optim=OptimConfig(learning_rate=3e-3, warmup_ratio=0.1), batch_size=32, num_epochs=40, eval_every=80,
                      progress=False)
    res = train_sft(init_params(config, jax.random.key(0)), config, train, cfg, eval_data=held, metrics_path=tmp_path / "m.jsonl")
    losses = [h["loss"] for h in res.eval_history]
    assert [h["step"] for h in res.eval_history] == [0, 80, 160, 240, 320]
    assert res.eval_history[0]["count"] == 64 * 4  # 3 words + eos per held-out response
    assert losses[0] > 2.5, losses  # about log(vocab) at random init
    assert losses == sorted(losses, reverse=True)
    # A prompt-blind model can learn "kappa iota <eos>" but must guess the copied word among
    # 8: its best loss is log(8) / 4 per response token. Below that, the copy was learned.
    blind = np.log(8) / 4
    assert losses[-1] < 0.5 * blind, (losses, blind)
    first = held["loss_mask"].argmax(axis=1)  # position of the copied word in each row
    logits = forward(res.params, jnp.asarray(held["tokens"]), config=config, mask_BxT=jnp.asarray(held["mask"]))
    rows = np.arange(len(first))
    predicted = np.asarray(logits)[rows, first - 1].argmax(-1)
    copy_accuracy = float(np.mean(predicted == held["tokens"][rows, first]))
    assert copy_accuracy > 0.9, copy_accuracy  # a prompt-blind model gets about 1/8


def test_train_sft_checks_arrays(params):
    with pytest.raises(KeyError, match="loss_mask"):
        train_sft(params, CFG, {"tokens": np.zeros((8, 4), np.int32), "mask": np.ones((8, 4), np.int32)}, TrainConfig())


def test_sft_with_fsdp_over_8_devices_equals_one_device(params):
    """TrainConfig(fsdp=True): the SFT params and Adam moments are split over the 8
    devices (FSDP like the RL trainer) and two updates give the same params and eval loss."""
    data = encode_sft(TOK, copy_task(16, 0), max_length=16, pad_to=16)
    cfg = TrainConfig(optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0.0), batch_size=8, progress=False,
                      eval_at_start=False)
    one = train_sft(params, CFG, data, cfg, eval_data=data)
    fsdp = train_sft(params, CFG, data, dataclasses.replace(cfg, fsdp=True), eval_data=data)
    up = fsdp.params["layers"]["mlp"]["up_proj"]["kernel"]  # [L, D, F]: split along F
    assert {s.data.shape for s in up.addressable_shards} == {(1, 32, 8)}
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(fsdp.params)):
        # float32 sums in another order, through Adam's g / sqrt(v) on near-zero gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(fsdp.eval_history[-1]["loss"], one.eval_history[-1]["loss"], rtol=1e-5)
    assert int(fsdp.state.step) == 2

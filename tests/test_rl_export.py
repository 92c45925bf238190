"""`rubrax rl export`: an RL run's checkpoint as an HF folder that transformers loads with
the same logits as rubrax (fp32, within 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_hf import make_tiny_hf

from rubrax.cli import main as rubrax_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_hf(root / "base")
    config = {
        "model": str(base), "toy_prompts": 8, "reward": {"name": "target_word"},
        "rl": {"group_size": 2, "kl_coef": 0.01, "loss_aggregation": "sequence"},
        "sample": {"n": 2, "max_new_tokens": 6, "prompt_bucket": 16},
        "optim": {"learning_rate": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
        "loop": {"total_steps": 2, "prompts_per_step": 4, "max_prompt_tokens": 64, "trim_prompts": True, "checkpoint_every": 1,
                 "progress": False, "tensorboard": False, "export_dir": "hf_end"},
    }
    (root / "rl.json").write_text(json.dumps(config))
    assert rubrax_main(["rl", "train", "--config", str(root / "rl.json"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root, base


def _rubrax_logits(folder, tokens):
    from rubrax.models import forward, load_pretrained

    params, config = load_pretrained(folder)
    return np.asarray(forward(params, np.asarray([tokens], np.int32), config=config))[0]


def test_export_loads_in_transformers_with_the_same_logits(run):
    from rubrax.rl.export import load_run_policy

    root, base = run
    out = root / "hf"
    assert rubrax_main(["rl", "export", str(root / "run"), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "rubrax_export.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "rubrax_export.json").read_text())["step"] == 2

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    base_tok = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    messages = [{"role": "user", "content": "Say the word: apple"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == base_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == 2

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()[0]
    policy = load_run_policy(root / "run")
    from rubrax.models import forward

    ours = np.asarray(forward(policy.params, np.asarray([ids], np.int32), config=policy.config))[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the trained weights were exported, not the base's
    np.testing.assert_allclose(_rubrax_logits(out, ids), ours, atol=1e-5, rtol=0)
    assert np.abs(_rubrax_logits(base, ids) - ours).max() > 1e-3


def test_export_step_and_bad_inputs(run, capsys):
    from safetensors.numpy import load_file

    root, _ = run
    assert rubrax_main(["rl", "export", str(root / "run"), "--step", "1", "--out", str(root / "hf1")]) == 0
    assert rubrax_main(["rl", "export", str(root / "run"), "--step", "2", "--out", str(root / "hf2")]) == 0
    w1, w2 = load_file(str(root / "hf1" / "model.safetensors")), load_file(str(root / "hf2" / "model.safetensors"))
    assert set(w1) == set(w2) and any(not np.array_equal(w1[k], w2[k]) for k in w1)
    assert rubrax_main(["rl", "export", str(root / "run"), "--step", "7", "--out", str(root / "bad")]) == 2
    assert "no checkpoint step 7" in capsys.readouterr().err and not (root / "bad").exists()
    assert rubrax_main(["rl", "export", str(root), "--out", str(root / "bad")]) == 2
    assert "no RL checkpoint" in capsys.readouterr().err


def test_loop_export_dir_writes_the_final_policy(run):
    """LoopConfig.export_dir: the loop's own end-of-training export equals `rubrax rl export` of the last step."""
    from safetensors.numpy import load_file

    root, _ = run
    end = root / "run" / "hf_end"
    assert json.loads((end / "rubrax_export.json").read_text())["step"] == 2
    assert rubrax_main(["rl", "export", str(root / "run"), "--out", str(root / "hf_last")]) == 0
    a, b = load_file(str(end / "model.safetensors")), load_file(str(root / "hf_last" / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        assert (end / name).read_text() == (root / "hf_last" / name).read_text(), name

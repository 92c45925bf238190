"""Issue 13 (7): checkpoints fail safe. Only committed steps count; a corrupt one is named
(step folder and file) and restore falls back to the previous good one; a changed model
shape names the parameter."""

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rubrax.train import checkpoint


def _state(scale=1.0, width=3):
    return {"p": {"a": jnp.arange(width, dtype=jnp.float32) * scale, "b": jnp.ones((2, 2))}, "step": jnp.int32(scale)}


def _two_steps(tmp_path):
    checkpoint.save(tmp_path, 10, _state(1.0), {"step": 10})
    checkpoint.save(tmp_path, 20, _state(2.0), {"step": 20})


def test_stray_step_folder_is_not_a_checkpoint(tmp_path, caplog):
    _two_steps(tmp_path)
    (tmp_path / "25").mkdir()
    (tmp_path / "30" / "state").mkdir(parents=True)  # half-copied
    caplog.set_level(logging.WARNING, "rubrax.checkpoint")
    assert checkpoint.latest_step(tmp_path) == 20 and checkpoint.all_steps(tmp_path) == [10, 20]
    assert "25: not a committed checkpoint" in caplog.text
    out, extra = checkpoint.restore(tmp_path, _state())
    assert extra == {"step": 20} and float(out["p"]["a"][1]) == 2.0
    checkpoint.save(tmp_path, 25, _state(3.0), {"step": 25}, overwrite=True)  # the stray folder is replaced
    assert checkpoint.latest_step(tmp_path) == 25


def test_corrupt_extra_names_the_file_and_falls_back(tmp_path, caplog):
    _two_steps(tmp_path)
    bad = tmp_path / "20" / "extra" / "metadata"
    bad.write_text('{"step": 2')
    with pytest.raises(checkpoint.CheckpointCorrupt, match=f"{bad}: not valid JSON"):
        checkpoint.restore(tmp_path, _state(), fallback=False)
    caplog.set_level(logging.WARNING, "rubrax.checkpoint")
    out, extra = checkpoint.restore(tmp_path, _state())
    assert extra == {"step": 10} and float(out["p"]["a"][1]) == 1.0
    assert f"{bad}: not valid JSON" in caplog.text and "falling back to the previous checkpoint, step 10" in caplog.text
    with pytest.raises(checkpoint.CheckpointCorrupt, match=str(bad)):
        checkpoint.restore_extra(tmp_path)


def test_corrupt_arrays_name_the_step_folder(tmp_path):
    _two_steps(tmp_path)
    for root, _, files in os.walk(tmp_path / "20" / "state"):
        for f in files:
            if "ocdbt" in root or f.startswith("manifest"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"\0garbage" * 4)
    with pytest.raises(checkpoint.CheckpointCorrupt, match=f"{tmp_path / '20' / 'state'}"):
        checkpoint.restore(tmp_path, _state(), fallback=False)
    out, extra = checkpoint.restore(tmp_path, _state())
    assert extra["step"] == 10
    np.testing.assert_array_equal(out["p"]["a"], [0.0, 1.0, 2.0])


def test_only_checkpoint_corrupt_raises_naming_it(tmp_path):
    checkpoint.save(tmp_path, 5, _state(), {"step": 5})
    os.remove(tmp_path / "5" / "extra" / "metadata")
    with pytest.raises(checkpoint.CheckpointCorrupt, match=f"{tmp_path / '5' / 'extra' / 'metadata'}: missing"):
        checkpoint.restore(tmp_path, _state())


def test_changed_model_shape_names_the_parameter_and_never_falls_back(tmp_path):
    _two_steps(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"parameter 'p.a' has shape \(3,\) in the checkpoint but \(4,\) in the model"):
        checkpoint.restore(tmp_path, _state(width=4))
    renamed = {"p": {"c": jnp.zeros(3), "b": jnp.ones((2, 2))}, "step": jnp.int32(0)}
    with pytest.raises(checkpoint.CheckpointMismatch, match="parameter 'p.c' is not in the checkpoint"):
        checkpoint.restore(tmp_path, renamed)

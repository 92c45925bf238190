"""Issue 13 (8, and the sim/theory parts of 3): bad input fails early, with a message that says where."""

import json

import numpy as np
import pytest

from rubrax.cli import main


def test_theory_tilted_at_large_kl_is_finite(capsys):
    assert main(["theory", "tilted", "--kl", "0.5", "50", "80", "300"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    win = [float(r[2]) for r in rows]
    assert all(np.isfinite(win)) and win[1:] == [1.0, 1.0, 1.0]
    assert main(["theory", "tilted", "--map", "top_wrong", "--c", "0.25", "--kl", "50"]) == 0
    # the tilted policy concentrates on the top of the proxy, u = 1 - c: its win rate tends to 0.75
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split("\t")[2]) == pytest.approx(0.75, abs=1e-4)
    assert main(["theory", "tilted", "--kl", "900"]) == 2
    assert "kl must be <= 706" in capsys.readouterr().err


def test_beta_for_kl_inverts_at_large_kl_in_float32():
    from rubrax.theory import beta_for_kl, kl_tilted

    kl = np.array([30.0, 45.0, 50.0, 80.0], np.float32)
    beta = np.asarray(beta_for_kl(kl))
    assert beta.dtype == np.float32 and (beta > 0).all()
    np.testing.assert_allclose(np.asarray(kl_tilted(beta)), kl, rtol=1e-5)
    np.testing.assert_allclose(np.log(beta), -(kl + 1), rtol=1e-5)  # KL = log(1/beta) - 1 for small beta
    with pytest.raises(ValueError, match="kl must be <= 85"):
        beta_for_kl(np.float32(100.0))


def test_theory_predict_names_file_and_line_of_non_utf8(tmp_path, capsys):
    path = tmp_path / "scores.jsonl"
    path.write_bytes(b'{"prompt_id": "a", "gold": 0.5, "proxy": 0.1}\n{"prompt_id": "\xff\xfe", "gold": 1, "proxy": 1}\n')
    assert main(["theory", "predict", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: " in err and "not valid UTF-8" in err


def test_sim_run_bad_seeds_fail_before_the_run_folder_exists(tmp_path, capsys):
    for seeds in ("-1", "0,x"):
        assert main(["sim", "run", "--preset", "tiny", "--out", str(tmp_path), "--run", "r", "--seeds", seeds, "--quiet"]) == 2
        assert "seeds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sim_run_refuses_other_settings_in_an_existing_run_folder(tmp_path, capsys):
    from rubrax import runs
    from rubrax.sim.presets import get_preset

    earlier = {k: v for k, v in get_preset("tiny").to_dict().items() if k not in ("seeds", "arms")}
    seed = earlier["world"]["seed"]
    earlier["world"]["seed"] = seed + 1  # an earlier run of another world
    runs.open_run(tmp_path / "r", runs.fingerprint(earlier), folder=True).release()
    (tmp_path / "r" / "arms").mkdir()
    assert main(["sim", "run", "--preset", "tiny", "--out", str(tmp_path), "--run", "r", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was started with other inputs: world.seed: " + f"{seed + 1} -> {seed}." in err and "--restart" in err
    assert (tmp_path / "r" / "arms").is_dir()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["world"]["seed"] == seed + 1

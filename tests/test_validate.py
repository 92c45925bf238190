"""Issue 13 (4, 8): every numeric setting is validated at parse time (type, finite, range)."""

import argparse
import math

import pytest

from rubrax.validate import arg_type, check_float, check_int


def test_check_int_refuses_bools_floats_and_out_of_range():
    assert check_int("x", 3, low=1) == 3
    assert check_int("x", None, optional=True) is None
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ValueError, match="x must be an integer"):
            check_int("x", bad, low=1)
    with pytest.raises(ValueError, match="x must be >= 1, got 0"):
        check_int("x", 0, low=1)
    with pytest.raises(ValueError, match="x must be >= 0 and <= 4, got 5"):
        check_int("x", 5, low=0, high=4)


def test_check_float_refuses_nan_inf_strings_and_bools():
    assert check_float("lr", 1, low=0, open_low=True) == 1.0
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="lr must be a finite number"):
            check_float("lr", bad, low=0)
    assert check_float("t", math.inf, low=0, finite=False) == math.inf
    with pytest.raises(ValueError, match="finite"):
        check_float("t", math.nan, finite=False)
    for bad in (False, "1e-3", [1.0]):
        with pytest.raises(ValueError, match="lr must be a number"):
            check_float("lr", bad)
    with pytest.raises(ValueError, match="clip must be > 0 and < 1, got 1"):
        check_float("clip", 1, low=0, high=1, open_low=True, open_high=True)


def test_arg_type_fails_at_parse_time():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--k", type=arg_type("int", low=1))
    p.add_argument("--t", type=arg_type("float", low=0, open_low=True))
    assert p.parse_args(["--k", "2", "--t", "0.5"]).k == 2
    for argv in (["--k", "0"], ["--k", "1.5"], ["--t", "nan"], ["--t", "inf"], ["--t", "0"]):
        with pytest.raises(argparse.ArgumentError):
            p.parse_args(argv)


@pytest.mark.parametrize("field, value", [
    ("learning_rate", math.inf), ("learning_rate", math.nan), ("learning_rate", 0.0), ("warmup_steps", True),
    ("b2", 1.0), ("eps", math.nan), ("max_grad_norm", math.inf), ("weight_decay", "0.1"),
])
def test_optim_config_rejects(field, value):
    from rubrax.train.optim import OptimConfig

    with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
        OptimConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("temperature", math.inf), ("temperature", math.nan), ("top_p", 0.0), ("top_k", -1), ("n", True), ("max_new_tokens", 2.0),
    ("prompt_bucket", 0),
])
def test_sample_config_rejects(field, value):
    from rubrax.policy import SampleConfig

    with pytest.raises(ValueError, match=f"SampleConfig.{field}"):
        SampleConfig(**{"max_new_tokens": 4, field: value})

"""Off-policy corrections: importance weights by hand (token TIS, sequence MIS)."""

import numpy as np
import pytest

from rubrax.rl import losses

L = np.log
# Row 0: ratios 2, 5, 0.5 on its three completion tokens; row 1: 1.5, 1.5 (its last
# column is padding, whose huge log ratio must be ignored).
MASK = np.array([[0, 1, 1, 1], [0, 1, 1, 0]], np.float32)
BEHAVIOUR = np.array([[0.0, -2.0, -3.0, -1.0], [0.0, -1.0, -2.0, -30.0]], np.float32)
LOG_RATIO = np.array([[0.0, L(2), L(5), L(0.5)], [0.0, L(1.5), L(1.5), 10.0]], np.float32)
OLD = BEHAVIOUR + LOG_RATIO


def weights(mode, cap=3.0):
    w, stats = losses.importance_weights(OLD, BEHAVIOUR, MASK, mode=mode, cap=cap)
    return np.asarray(w), {k: float(v) for k, v in stats.items()}


def test_token_tis_truncates_each_ratio_at_the_cap():
    w, stats = weights("token_tis")
    np.testing.assert_allclose(w, [[0, 2, 3, 0.5], [0, 1.5, 1.5, 0]], rtol=1e-6)
    assert stats["truncated"] == 1  # only the ratio 5
    assert stats["log_ratio_abs"] == pytest.approx(L(2) + L(5) + L(2) + 2 * L(1.5), rel=1e-6)
    assert stats["log_ratio_abs_max"] == pytest.approx(L(5), rel=1e-6)
    assert stats["rows"] == 2


def test_sequence_mis_drops_rows_whose_product_exceeds_the_cap():
    w, stats = weights("sequence_mis")
    # Row 0: 2 * 5 * 0.5 = 5 > 3, dropped; row 1: 1.5 * 1.5 = 2.25 kept, on every token.
    np.testing.assert_allclose(w, [[0, 0, 0, 0], [0, 2.25, 2.25, 0]], rtol=1e-6)
    assert stats["truncated"] == 1
    w, stats = weights("sequence_mis", cap=6.0)
    np.testing.assert_allclose(w, [[0, 5, 5, 5], [0, 2.25, 2.25, 0]], rtol=1e-5)
    assert stats["truncated"] == 0


def test_no_correction_is_the_mask_and_huge_mismatch_never_overflows():
    w, stats = weights("none")
    np.testing.assert_array_equal(w, MASK)
    assert stats["truncated"] == 0
    old = BEHAVIOUR + np.where(MASK > 0, 200.0, 0.0).astype(np.float32)  # exp(200 * 3) = inf
    for mode in ("token_tis", "sequence_mis"):
        w, _ = losses.importance_weights(old, BEHAVIOUR, MASK, mode=mode, cap=2.0)
        assert np.isfinite(np.asarray(w)).all()
    with pytest.raises(ValueError, match="importance correction"):
        losses.importance_weights(OLD, BEHAVIOUR, MASK, mode="tis", cap=2.0)

"""The statistics module against textbook values and simulation."""

import math

import numpy as np
import pytest

from probes import stats


@pytest.mark.parametrize("k, n, lo, hi", [  # Newcombe (1998), Statistics in Medicine 17:857, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775)])
def test_wilson_interval_equals_the_textbook(k, n, lo, hi):
    assert stats.wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_at_other_levels_and_edges():
    lo90, hi90 = stats.wilson(81, 263, conf=0.9)
    lo95, hi95 = stats.wilson(81, 263)
    assert lo95 < lo90 < 81 / 263 < hi90 < hi95
    with stats.confidence(0.9):
        assert stats.wilson(81, 263) == (lo90, hi90)
    assert stats.wilson(10, 10)[1] == 1.0 and stats.wilson(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in stats.wilson(0, 0))


def test_bootstrap_interval_of_the_mean_covers_the_truth_93_to_97_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for sim in range(1000):
        x = rng.normal(2.0, 1.0, size=60)
        r = stats.mean(x, "m", seed=sim)
        covered += r["m_lo"] <= 2.0 <= r["m_hi"]
    assert 930 <= covered <= 970, covered


def test_an_interval_of_equal_items_has_zero_width():
    r = stats.mean([0.25] * 30, "rr")
    assert r["rr"] == r["rr_lo"] == r["rr_hi"] == 0.25 and r["rr_n"] == 30
    value, lo, hi = stats.bootstrap(lambda a, b: a.mean() - b.mean(), [1.0] * 9, [0.0] * 9)
    assert value == lo == hi == 1.0


def test_paired_tests():
    # 10 items right with o and wrong without, 0 the other way: exact McNemar p = 2 * 0.5^10
    assert stats.mcnemar([True] * 10 + [False] * 5, [False] * 10 + [False] * 5) == pytest.approx(2 / 1024)
    assert stats.mcnemar([True, False], [True, False]) == 1.0
    assert stats.sign_flip([1.0] * 12, [0.0] * 12) < 0.001
    assert stats.sign_flip([1.0, -1.0] * 10, [0.0] * 20) > 0.5


def test_best_of_k_and_medians_never_nan():
    assert stats.best_of(18) == pytest.approx(1 - 0.05 / 18)
    assert stats.median_reached([3, 5, None, float("nan")], 4, "first") == {
        "first": 4.0, "first_reached": 2, "first_of": 4}
    assert stats.median_reached([], 7, "first") == {"first": None, "first_reached": 0, "first_of": 7}
    summary = stats.proportion(118, 196, "accuracy")
    assert stats.interval_text(summary, "accuracy") == "0.602 [0.532, 0.668] (118/196)"

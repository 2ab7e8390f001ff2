"""Win rates and Wilson intervals against hand computations."""

from __future__ import annotations

import math

import pytest

from inpo_pipeline.winrate import Z_95, grouped_win_rates, summary_stats, wilson_interval, win_rate


def test_z_is_the_two_sided_95_percent_quantile():
    assert Z_95 == pytest.approx(1.959963984540054, abs=1e-12)


def test_wilson_interval_for_7_of_10():
    # p = 0.7, z² = 3.8414588, z²/n = 0.38414588, d = 1.38414588
    # centre = (0.7 + 0.19207294) / d = 0.64449344
    # half = z / d · √(0.7·0.3/10 + 3.8414588/400) = 1.41600697 · √0.03060365 = 0.24771529
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.3967781474611454, abs=1e-12)
    assert high == pytest.approx(0.8922087325936990, abs=1e-12)
    assert (low + high) / 2 == pytest.approx(0.6444934400, abs=1e-9)


def test_wilson_interval_edges():
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.4898908364545973), abs=1e-12)
    assert wilson_interval(4, 4) == pytest.approx((0.5101091635454027, 1.0), abs=1e-12)
    # fractional successes (ties count half): 2.5 of 5 is symmetric around one half
    low, high = wilson_interval(2.5, 5)
    assert (low, high) == pytest.approx((0.1704235806435878, 0.8295764193564122), abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(6, 5)


def test_win_rate_counts_ties_half():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [2.0, 2.0, 1.0, 5.0, 5.0]  # win, tie, loss, win, tie
    result = win_rate(a, b)
    assert (result.wins, result.ties, result.losses, result.n) == (2, 2, 1, 5)
    assert result.rate == pytest.approx(0.6)  # (2 + 2/2) / 5
    assert (result.low, result.high) == pytest.approx((0.2307242812760130, 0.8823792257673521), abs=1e-12)
    assert result.to_dict() == {"wins": 2, "ties": 2, "losses": 1, "rate": result.rate, "low": result.low,
                                "high": result.high, "n": 5}
    # B over A is the mirror of A over B
    mirror = win_rate(b, a)
    assert (mirror.wins, mirror.ties, mirror.losses) == (1, 2, 2)
    assert mirror.rate == pytest.approx(1 - result.rate)
    assert mirror.low == pytest.approx(1 - result.high) and mirror.high == pytest.approx(1 - result.low)


def test_all_ties_is_one_half():
    result = win_rate([0.3] * 8, [0.3] * 8)
    assert (result.wins, result.ties, result.losses, result.rate) == (0, 8, 0, 0.5)
    assert (result.low, result.high) == pytest.approx(wilson_interval(4, 8))


def test_grouped_win_rates_and_stats():
    a = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5]
    b = [2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 5, 6]
    groups = ["x"] * 10 + ["y", "y"]
    rates = grouped_win_rates(a, b, groups)
    assert list(rates) == ["x", "y"]
    assert (rates["x"].wins, rates["x"].losses, rates["x"].rate) == (7, 3, 0.7)
    assert (rates["x"].low, rates["x"].high) == pytest.approx((0.3967781474611454, 0.8922087325936990), abs=1e-12)
    assert (rates["y"].wins, rates["y"].ties, rates["y"].rate) == (1, 1, 0.75)
    stats = summary_stats([1.0, 2.0, 4.0, 10.0])
    assert stats == {"n": 4, "mean": 4.25, "median": 3.0, "std": pytest.approx(math.sqrt(16.25))}
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])

"""The clustered bootstrap of `inpo_pipeline.winrate`: known cases."""

from __future__ import annotations

import numpy as np
import pytest

from inpo_pipeline.winrate import clustered_bootstrap


def test_point_estimates_are_exact():
    values = np.array([[[0.1, -0.2, 0.0], [0.3, 0.3, -0.1]]])  # 1 run, 2 prompts, 3 seeds
    mean, _ = clustered_bootstrap(values, "mean")
    assert mean == pytest.approx(0.4 / 6)
    rate, _ = clustered_bootstrap(values, "win_rate")
    assert rate == pytest.approx((3 + 0.5) / 6)  # three wins, one tie (exactly 0) counted half


def test_constant_data_has_a_degenerate_interval():
    mean, (low, high) = clustered_bootstrap(np.full((3, 4, 5), 0.25))
    assert mean == low == high == 0.25


def test_spread_between_training_runs_widens_the_interval():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, (3, 6, 40))
    same = noise + 0.05
    spread = noise + np.array([0.0, 0.05, 0.10])[:, None, None]  # same mean, runs disagree
    _, (low_same, high_same) = clustered_bootstrap(same)
    _, (low_spread, high_spread) = clustered_bootstrap(spread)
    assert high_spread - low_spread > 5 * (high_same - low_same)
    assert low_spread < 0.05 < high_spread


def test_correlated_prompts_widen_the_interval_over_independent_samples():
    rng = np.random.default_rng(1)
    independent = rng.normal(0, 0.03, (1, 6, 40))
    clustered = independent * 0.2 + rng.normal(0, 0.03, (1, 6, 1))  # a shared offset per prompt
    scale = independent.std() / clustered.std()
    _, (low_i, high_i) = clustered_bootstrap(independent)
    _, (low_c, high_c) = clustered_bootstrap(clustered * scale)
    assert (high_c - low_c) > 2 * (high_i - low_i)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        clustered_bootstrap(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="statistic"):
        clustered_bootstrap(np.zeros((1, 1, 1)), "median")

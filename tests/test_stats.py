"""`inpo_pipeline.evaluation.stats`: paired comparisons with cluster-bootstrap intervals and sign-flip p-values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from inpo_pipeline.evaluation.stats import (Z_95, compare_paired, compare_scores, grouped_comparisons, outcomes, summary_stats,
                                wilson_interval)

SIX_PROMPTS = [p for p in range(6) for _ in range(40)]


def test_point_estimates_and_counts_are_exact():
    differences = np.array([0.1, -0.2, 0.0, 0.3, 0.3, -0.1])
    result = compare_paired(differences, ["a", "a", "a", "b", "b", "b"])
    assert result.mean_difference.estimate == pytest.approx(0.4 / 6)
    assert result.win_rate.estimate == pytest.approx((3 + 0.5) / 6)  # three wins, one exact tie counted half
    assert (result.wins, result.ties, result.losses, result.n) == (3, 1, 2, 6)
    assert (result.win_rate.prompts, result.win_rate.runs, result.win_rate.samples) == (2, 1, 6)
    tolerant = compare_paired(differences, tie_tolerance=0.15)
    assert (tolerant.wins, tolerant.ties, tolerant.losses) == (2, 3, 1)
    assert outcomes([0.2, -0.2, 1e-12], 1e-9).tolist() == [1.0, 0.0, 0.5]


def test_unequal_prompts_weigh_every_sample_once():
    differences = np.array([1.0, 1.0, 1.0, 0.0])  # prompt x has three seeds, y one
    result = compare_paired(differences, ["x", "x", "x", "y"])
    assert result.mean_difference.estimate == pytest.approx(0.75)
    # a resample is a mean over the drawn prompts' samples: xx → 1, yy → 0, xy → 0.75
    assert result.mean_difference.low == pytest.approx(0.0) and result.mean_difference.high == pytest.approx(1.0)


def test_constant_data_has_a_degenerate_interval_and_p_one():
    result = compare_paired(np.full((3, 24), 0.25), [p for p in range(4) for _ in range(6)])
    delta = result.mean_difference
    assert delta.estimate == delta.low == delta.high == 0.25
    assert delta.p_value == pytest.approx(2 / 16)  # every flip but "none" and "all" moves the sum: exact 2/2^4
    ties = compare_paired(np.zeros(12), [p for p in range(4) for _ in range(3)])
    assert (ties.win_rate.estimate, ties.win_rate.low, ties.win_rate.high, ties.win_rate.p_value) == (0.5, 0.5, 0.5, 1.0)


def test_independent_interval_equals_scipys_bootstrap_of_the_mean():
    rng = np.random.default_rng(3)
    differences = rng.normal(0.01, 0.05, 200)
    ours = compare_paired(differences, None, resamples=4000, seed=7).mean_difference
    theirs = scipy_stats.bootstrap((differences,), np.mean, n_resamples=4000, method="percentile", batch=500,
                                   rng=np.random.default_rng(7)).confidence_interval
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)


def test_p_value_is_the_exact_sign_flip_test_over_prompts():
    rng = np.random.default_rng(4)
    prompts = [p for p in range(8) for _ in range(5)]
    differences = rng.normal(0.01, 0.03, 40)
    result = compare_paired(differences, prompts)
    sums = np.array([differences[np.array(prompts) == p].sum() for p in range(8)])
    observed = abs(sums.sum())
    flips = np.array(list(itertools.product((1, -1), repeat=8)))
    exact = np.mean(np.abs(flips @ sums) >= observed * (1 - 1e-12))
    assert result.mean_difference.p_value == pytest.approx(exact)
    won = outcomes(differences) - 0.5
    won_sums = np.array([won[np.array(prompts) == p].sum() for p in range(8)])
    exact_win = np.mean(np.abs(flips @ won_sums) >= abs(won_sums.sum()) * (1 - 1e-12))
    assert result.win_rate.p_value == pytest.approx(exact_win)


def test_clustered_data_gives_a_wider_interval_than_independent_data():
    rng = np.random.default_rng(1)
    independent = rng.normal(0, 0.03, 240)
    prompt_offset = np.repeat(rng.normal(0, 0.03, 6), 40)
    clustered = independent * 0.2 + prompt_offset
    clustered *= independent.std() / clustered.std()  # same spread of single samples
    as_if_independent = compare_paired(clustered, None).mean_difference
    by_prompt = compare_paired(clustered, SIX_PROMPTS).mean_difference
    truly_independent = compare_paired(independent, SIX_PROMPTS).mean_difference
    assert by_prompt.high - by_prompt.low > 2.5 * (as_if_independent.high - as_if_independent.low)
    assert by_prompt.high - by_prompt.low > 2 * (truly_independent.high - truly_independent.low)


def test_spread_between_training_runs_widens_the_interval():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, (3, 240))
    same = noise + 0.05
    spread = noise + np.array([0.0, 0.05, 0.10])[:, None]  # same mean, runs disagree
    agreeing = compare_paired(same, SIX_PROMPTS).mean_difference
    disagreeing = compare_paired(spread, SIX_PROMPTS).mean_difference
    assert disagreeing.high - disagreeing.low > 5 * (agreeing.high - agreeing.low)
    assert disagreeing.low < 0.05 < disagreeing.high and disagreeing.runs == 3


def test_a_shift_is_significant_and_noise_is_not():
    rng = np.random.default_rng(2)
    shifted = compare_paired(rng.normal(0.02, 0.01, 240), SIX_PROMPTS)
    assert shifted.mean_difference.low > 0 and shifted.win_rate.low > 0.5
    assert shifted.mean_difference.p_value == pytest.approx(2 / 64)  # the smallest p six prompts allow
    noise = compare_paired(rng.normal(0, 0.01, 240), SIX_PROMPTS)
    # six prompts are few clusters: the percentile interval is then narrow (here it just misses 0), the
    # exact permutation test is not fooled
    assert noise.mean_difference.p_value > 0.05 and noise.win_rate.p_value > 0.05


def test_one_prompt_has_no_interval():
    result = compare_paired(np.array([0.1, 0.2, 0.3]), ["only"] * 3)
    assert np.isnan(result.mean_difference.low) and np.isnan(result.win_rate.p_value)
    assert result.mean_difference.estimate == pytest.approx(0.2)


def test_scores_and_groups():
    a, b = [0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.5, 0.6]
    result = compare_scores(a, b, ["p", "p", "q", "q"])
    assert result.mean_difference.estimate == pytest.approx(0.1)
    groups = grouped_comparisons(a, b, ["G", "G", "H", "H"], ["p", "p", "q", "q"])
    assert list(groups) == ["G", "H"] and groups["H"].wins == 2 and groups["G"].wins == 1


# ------------------------------------------------------------------------------ Wilson (independent counts)
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


def test_summary_stats():
    assert summary_stats([1.0, 2.0, 4.0, 10.0]) == {"n": 4, "mean": 4.25, "median": 3.0, "std": pytest.approx(math.sqrt(16.25))}




def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        compare_paired(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="finite"):
        compare_paired(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="prompt labels"):
        compare_paired(np.zeros(4), ["a"])
    with pytest.raises(ValueError, match="length"):
        compare_scores([0.1], [0.1, 0.2])

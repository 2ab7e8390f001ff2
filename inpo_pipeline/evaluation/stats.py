"""Paired comparisons of two models with intervals that respect how the samples were drawn.

One module for every number that compares model B with model A on the same prompts and seeds
(`inpo eval`, the world's evaluation, the experiment scripts). A *paired difference* is
d = score_B − score_A of one (training run, prompt, seed); B *wins* a sample when d > tol, ties
when |d| ≤ tol (counted half), loses otherwise:

    Δ = mean d,        win rate = (wins + ties / 2) / n

Samples are not independent: the seeds of one prompt share the prompt, and several training runs
share the data. The intervals are therefore a **cluster bootstrap** (`scipy.stats.bootstrap`,
percentile, 95%): each resample draws prompts with replacement, keeping all of a prompt's seeds
together, and, where several training runs exist, draws the runs with replacement too, so the
interval holds the prompt-to-prompt and the run-to-run spread. The p-value beside it is a
**sign-flip permutation test over prompts** (`scipy.stats.permutation_test`, exact when
2^prompts ≤ the resample count): under "A and B are exchangeable on every prompt", each prompt's
summed difference (for the win rate: its summed excess over one half) is as likely negative as
positive. It asks whether these runs' B differs from A on the population of prompts; the runs'
own spread enters the interval, not the test.

Wilson's interval (independent samples) is kept for counts where clustering does not apply.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
RESAMPLES = 9999
Z_95 = float(scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2))
INTERVAL_RULE = ("95% cluster bootstrap (scipy.stats.bootstrap, percentile): prompts resampled with all their "
                 "seeds, and training runs where there are several")
TEST_RULE = "two-sided sign-flip permutation test over prompts (scipy.stats.permutation_test)"


# ------------------------------------------------------------------------------ counts
def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval of `successes` out of `n` independent trials (may be fractional):

        centre = (p + z²/2n) / (1 + z²/n),   half-width = z / (1 + z²/n) · √(p(1−p)/n + z²/4n²)
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes ({successes}) must lie between 0 and n ({n})")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at p = 0 (p = 1) the bound is 0 (1) exactly; floating point would leave ~1e-17 there
    low = 0.0 if successes == 0 else max(0.0, float(centre - half))
    high = 1.0 if successes == n else min(1.0, float(centre + half))
    return low, high


def summary_stats(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, median and (sample) standard deviation."""
    if len(values) == 0:
        raise ValueError("no values")
    array = np.asarray(values, np.float64)
    return {"n": len(array), "mean": float(array.mean()), "median": float(np.median(array)),
            "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def outcomes(differences: Any, tie_tolerance: float = 0.0) -> np.ndarray:
    """1 for a win (d > tol), 0 for a loss (d < −tol), ½ for a tie."""
    d = np.asarray(differences, np.float64)
    return np.where(d > tie_tolerance, 1.0, np.where(d < -tie_tolerance, 0.0, 0.5))


# ------------------------------------------------------------------------------ the comparison
@dataclass(frozen=True)
class PairedStatistic:
    """One statistic of paired differences: estimate, 95% interval, p-value against `null`."""

    statistic: str  # "mean_difference", "win_rate" or "mean" (clustered_mean)
    estimate: float
    low: float
    high: float
    p_value: float
    null: float
    samples: int
    prompts: int
    runs: int


@dataclass(frozen=True)
class PairedComparison:
    """Δ and the win rate of B over A, with counts."""

    mean_difference: PairedStatistic
    win_rate: PairedStatistic
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def _cluster_index(prompts: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """Each sample's cluster number (prompts in order of first appearance); None: every sample alone."""
    if prompts is None:
        return np.arange(n), n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompt labels for {n} samples")
    numbers: dict[Hashable, int] = {}
    index = np.array([numbers.setdefault(p, len(numbers)) for p in prompts], dtype=np.int64)
    return index, len(numbers)


def _paired_statistic(values: np.ndarray, cluster: np.ndarray, clusters: int, null: float, name: str,
                      resamples: int, seed: int) -> PairedStatistic:
    """values: (runs, samples) per-sample quantities whose mean is the statistic."""
    runs, samples = values.shape
    # per (run, cluster) sums and per-cluster sizes make every resample a weighted mean of sums
    sums = np.zeros((runs, clusters))
    np.add.at(sums, (slice(None), cluster), values)
    sizes = np.bincount(cluster, minlength=clusters).astype(np.float64)
    estimate = float(values.mean())

    def resampled_mean(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        cluster_pick = indices[-1]  # (..., clusters)
        run_pick = indices[0] if len(indices) == 2 else np.broadcast_to(
            np.arange(runs), cluster_pick.shape[:-1] + (runs,))
        picked = sums[run_pick[..., :, None], cluster_pick[..., None, :]]  # (..., runs, clusters)
        return picked.sum(axis=(-2, -1)) / (runs * sizes[cluster_pick].sum(axis=-1))

    data = ((np.arange(runs),) if runs > 1 else ()) + (np.arange(clusters),)
    if clusters > 1:
        result = scipy_stats.bootstrap(data, resampled_mean, n_resamples=resamples, paired=False, vectorized=True,
                                       confidence_level=CONFIDENCE, method="percentile", batch=500,
                                       rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        # a resample mean never leaves [min, max] of the data: clip the float rounding of the sums
        low, high = max(low, float(values.min())), min(high, float(values.max()))
        cluster_excess = sums.sum(axis=0) - null * runs * sizes  # one number per prompt
        test = scipy_stats.permutation_test(
            (cluster_excess,), lambda x, axis=-1: x.sum(axis=axis), permutation_type="samples",
            vectorized=True, n_resamples=resamples, alternative="two-sided", rng=np.random.default_rng(seed))
        p_value = float(test.pvalue)
    else:
        low = high = p_value = float("nan")
    if low > estimate or high < estimate:  # a degenerate sample (all values equal) gives the value itself
        low, high = min(low, estimate), max(high, estimate)
    return PairedStatistic(name, estimate, low, high, p_value, null, samples, clusters, runs)


def _runs_by_samples(differences: Any) -> np.ndarray:
    values = np.asarray(differences, np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError("differences must have shape (samples,) or (runs, samples), each at least 1")
    if not np.isfinite(values).all():
        raise ValueError("differences must be finite")
    return values


def clustered_mean(values: Any, prompts: Sequence[Hashable] | None = None, *, resamples: int = RESAMPLES,
                   seed: int = 0) -> PairedStatistic:
    """The mean of (samples,) or (runs, samples) values with `compare_paired`'s interval and test (against 0),
    for a quantity that is not a difference (one model's mean reward) and so has no win rate."""
    values = _runs_by_samples(values)
    cluster, clusters = _cluster_index(prompts, values.shape[1])
    return _paired_statistic(values, cluster, clusters, 0.0, "mean", resamples, seed)


def compare_paired(differences: Any, prompts: Sequence[Hashable] | None = None, *, tie_tolerance: float = 0.0,
                   resamples: int = RESAMPLES, seed: int = 0) -> PairedComparison:
    """Δ and win rate of paired differences with cluster-bootstrap intervals and sign-flip p-values.

    `differences`: shape (samples,) for one model pair, or (runs, samples) for several training
    runs evaluated on the same samples (sample j is the same prompt and seed in every run).
    `prompts`: each sample's prompt (its cluster); None treats the samples as independent. With a
    single prompt no interval or p-value exists (NaN): one prompt says nothing about others.
    """
    values = _runs_by_samples(differences)
    cluster, clusters = _cluster_index(prompts, values.shape[1])
    won = outcomes(values, tie_tolerance)
    return PairedComparison(
        mean_difference=_paired_statistic(values, cluster, clusters, 0.0, "mean_difference", resamples, seed),
        win_rate=_paired_statistic(won, cluster, clusters, 0.5, "win_rate", resamples, seed),
        wins=int((won == 1).sum()), ties=int((won == 0.5).sum()), losses=int((won == 0).sum()),
    )


def compare_scores(scores_a: Sequence[float], scores_b: Sequence[float], prompts: Sequence[Hashable] | None = None,
                   **options: Any) -> PairedComparison:
    """`compare_paired` of B − A for two equally long score lists."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"paired scores differ in length ({len(scores_a)} vs {len(scores_b)})")
    if len(scores_a) == 0:
        raise ValueError("a comparison needs at least one pair")
    return compare_paired(np.asarray(scores_b, np.float64) - np.asarray(scores_a, np.float64), prompts, **options)


def grouped_comparisons(scores_a: Sequence[float], scores_b: Sequence[float], groups: Sequence[Hashable],
                        prompts: Sequence[Hashable] | None = None, **options: Any) -> dict[Hashable, PairedComparison]:
    """`compare_scores` within each group (e.g. Parti category), groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return {group: compare_scores([scores_a[i] for i in indices], [scores_b[i] for i in indices],
                                  None if prompts is None else [prompts[i] for i in indices], **options)
            for group, indices in members.items()}

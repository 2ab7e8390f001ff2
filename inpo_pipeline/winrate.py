"""Win rates of model B over model A on paired images, with Wilson score intervals. Pure functions.

A pair is one prompt and one seed sampled by both models. B *wins* when its score is higher,
*loses* when lower, and a *tie* (equal scores, e.g. identical images) counts as half a win:

    rate = (wins + ties / 2) / n

The 95% interval is the Wilson score interval of that proportion (with the half-counted ties as
fractional successes), which, unlike the normal approximation, stays inside [0, 1] and behaves at
rates near 0 or 1 and at small n:

    centre = (p + z²/2n) / (1 + z²/n),   half-width = z / (1 + z²/n) · √(p(1−p)/n + z²/4n²)

with p = rate and z = Φ⁻¹(0.975) ≈ 1.95996.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Z_95 = statistics.NormalDist().inv_cdf(0.975)


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of `successes` out of `n` (successes may be fractional)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes ({successes}) must lie between 0 and n ({n})")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at p = 0 (p = 1) the bound is 0 (1) exactly; floating point would leave ~1e-17 there
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class WinRate:
    """B over A: counts, the tie-half rate and its 95% Wilson interval."""

    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> WinRate:
    """How often B's score beats A's on the same pair; ties count half."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"paired scores differ in length ({len(scores_a)} vs {len(scores_b)})")
    if not scores_a:
        raise ValueError("a win rate needs at least one pair")
    wins = sum(b > a for a, b in zip(scores_a, scores_b))
    ties = sum(b == a for a, b in zip(scores_a, scores_b))
    losses = len(scores_a) - wins - ties
    successes = wins + ties / 2
    low, high = wilson_interval(successes, len(scores_a))
    return WinRate(wins, ties, losses, successes / len(scores_a), low, high)


def grouped_win_rates(
    scores_a: Sequence[float], scores_b: Sequence[float], groups: Sequence[Hashable]
) -> dict[Hashable, WinRate]:
    """The win rate within each group (e.g. Parti category), groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return {
        group: win_rate([scores_a[i] for i in indices], [scores_b[i] for i in indices])
        for group, indices in members.items()
    }


def summary_stats(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, median and (sample) standard deviation."""
    if not values:
        raise ValueError("no values")
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def clustered_bootstrap(
    values: Any, statistic: str = "mean", resamples: int = 4000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """A statistic of paired differences over training runs × prompts × seeds, with a 95% interval.

    `values` has shape (runs, prompts, seeds): one paired difference (aligned − base) per training
    run and held-out sample. The percentile interval resamples, at each level with replacement,
    the training runs, then the prompts, then the seeds within each resampled prompt, so it holds
    the seed-to-seed spread of training and the correlation of one prompt's samples, which a
    Wilson interval over all samples as if independent leaves out. `statistic`: "mean" (Δ) or
    "win_rate" (share > 0, ties = exactly 0 count half).
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError("values must have shape (runs, prompts, seeds), each at least 1")
    if statistic == "win_rate":
        data = np.where(data > 0, 1.0, np.where(data < 0, 0.0, 0.5))
    elif statistic != "mean":
        raise ValueError(f"statistic must be mean or win_rate, not {statistic!r}")
    runs, prompts, seeds = data.shape
    rng = np.random.default_rng(seed)
    run_pick = rng.integers(0, runs, (resamples, runs))
    prompt_pick = rng.integers(0, prompts, (resamples, prompts))
    seed_pick = rng.integers(0, seeds, (resamples, prompts, seeds))
    estimates = np.empty(resamples)
    for r in range(resamples):
        chosen = data[run_pick[r]][:, prompt_pick[r]]  # (runs, prompts, seeds)
        estimates[r] = np.take_along_axis(chosen, seed_pick[r][None].repeat(runs, axis=0), axis=2).mean()
    low, high = np.quantile(estimates, [0.025, 0.975])
    return float(data.mean()), (float(low), float(high))

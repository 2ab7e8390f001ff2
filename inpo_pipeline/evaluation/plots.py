"""The report plots, drawn with matplotlib (Agg, no screen).

* :func:`draw_score_distributions` — `inpo eval`: one panel per scorer, the histograms of
  directory A (blue) and B (orange) on a shared range, a dashed line at each mean.
* :func:`draw_reward_comparison` — `inpo demo` / `inpo world eval`: each sample's reward, aligned
  against base, and each model's mean reward with its prompt-clustered 95% interval
  (`stats.clustered_mean`: the same interval the tables print).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"A": (31, 119, 180), "B": (255, 127, 14)}
PANEL = (720, 260)  # pixels per panel (width, height)
DPI = 100
BINS = 24


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(channel / 255 for channel in colour)  # type: ignore[return-value]


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """[min, max] of the values, widened to a unit interval around a single value."""
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _save(figure: Any, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    _pyplot().close(figure)
    return path


def draw_score_distributions(
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]], path: Path | str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG with one histogram panel per (title, {"A": scores, "B": scores}) and return its path."""
    if not panels:
        raise ValueError("nothing to plot")
    plt = _pyplot()
    width, height = PANEL
    figure, axes = plt.subplots(len(panels), 1, figsize=(width / DPI, height * len(panels) / DPI), squeeze=False)
    for axis, (title, series) in zip(axes[:, 0], panels):
        lo, hi = value_range([v for values in series.values() for v in values])
        for name, values in series.items():
            colour = _rgb(COLOURS[name])
            axis.hist(values, bins=BINS, range=(lo, hi), color=colour, alpha=0.45, edgecolor=colour,
                      label=(labels or {}).get(name, name)[:40])
            axis.axvline(float(np.mean(values)), color=colour, linestyle="--", linewidth=2)
        axis.set_title(title, fontsize=9, loc="left")
        axis.set_xlabel("score (dashed: mean)", fontsize=8)
        axis.set_ylabel("images", fontsize=8)
        axis.tick_params(labelsize=7)
        legend = axis.legend(fontsize=7, loc="upper right")
        for handle in legend.legend_handles:
            handle.set_alpha(1.0)
    figure.tight_layout()
    return _save(figure, path)


def draw_reward_comparison(path: Path | str, base: np.ndarray, aligned: Mapping[str, np.ndarray],
                           prompts: Sequence[Hashable], scatter: str | None = None) -> Path:
    """Left: each sample's reward under the `scatter` model (default: the first) against the base's,
    with the diagonal. Right: each model's mean reward with its 95% interval clustered by prompt."""
    from inpo_pipeline.evaluation.stats import clustered_mean

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    main_name = scatter or next(iter(aligned), None)
    main = aligned[main_name] if main_name is not None else base
    top = float(max(base.max(), main.max(), 1e-6)) * 1.05
    better = main > base
    left.scatter(base[better], main[better], s=6, color="tab:blue", label="aligned higher")
    left.scatter(base[~better], main[~better], s=6, color="tab:red", label="base higher or equal")
    left.plot([0, top], [0, top], color="grey", linewidth=0.8)
    left.set_xlim(0, top)
    left.set_ylim(0, top)
    left.set_xlabel("base reward")
    left.set_ylabel(f"aligned ({main_name}) reward" if main_name else "reward")
    left.set_title("reward per sample (same prompt and seed)", fontsize=9)
    left.legend(fontsize=7)
    names = ["base", *aligned]
    means, lows, highs = [], [], []
    for name in names:
        statistic = clustered_mean(base if name == "base" else aligned[name], list(prompts))
        means.append(statistic.estimate)
        lows.append(statistic.low)
        highs.append(statistic.high)
    means_array = np.array(means)
    errors = [np.nan_to_num(means_array - np.array(lows)), np.nan_to_num(np.array(highs) - means_array)]
    right.bar(range(len(names)), means_array, yerr=errors, capsize=4,
              color=["lightgrey", *["tab:blue"] * len(aligned)])
    right.set_xticks(range(len(names)), [name[:12] for name in names], fontsize=7, rotation=20)
    right.set_ylabel("mean reward")
    right.set_title("mean reward, 95% interval (prompts resampled)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)

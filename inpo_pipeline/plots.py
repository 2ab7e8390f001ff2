"""Score-distribution plots drawn with PIL (no plotting library): one panel per scorer.

Each panel overlays the histograms of directory A (blue) and B (orange) on a shared range,
with a dashed line at each mean, a labelled score axis and the largest bin count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"A": (31, 119, 180), "B": (255, 127, 14)}
PANEL = (720, 260)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 20, 40, 44
BINS = 24
BAR_ALPHA = 120


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """[min, max] of the values, widened to a unit interval around a single value."""
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def histogram(values: Sequence[float], lo: float, hi: float, bins: int = BINS) -> list[int]:
    """Counts in `bins` equal bins over [lo, hi]; the last bin includes hi, values outside are dropped."""
    counts = [0] * bins
    width = (hi - lo) / bins
    for value in values:
        if lo <= value <= hi:
            counts[min(int((value - lo) / width), bins - 1)] += 1
    return counts


def _dashed_vertical(draw: ImageDraw.ImageDraw, x: float, top: int, bottom: int, colour: tuple[int, ...]) -> None:
    for y in range(top, bottom, 8):
        draw.line([(x, y), (x, min(y + 4, bottom))], fill=colour, width=2)


def _panel(title: str, series: Mapping[str, Sequence[float]], labels: Mapping[str, str]) -> Image.Image:
    width, height = PANEL
    image = Image.new("RGBA", PANEL, (255, 255, 255, 255))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = MARGIN_LEFT, width - MARGIN_RIGHT, MARGIN_TOP, height - MARGIN_BOTTOM
    everything = [v for values in series.values() for v in values]
    lo, hi = value_range(everything)
    counts = {name: histogram(values, lo, hi) for name, values in series.items()}
    tallest = max(max(c) for c in counts.values()) or 1
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * (right - left)

    bar_width = (right - left) / BINS
    for name, bins in counts.items():
        overlay = Image.new("RGBA", PANEL, (0, 0, 0, 0))
        bars = ImageDraw.Draw(overlay)
        for i, count in enumerate(bins):
            if count:
                x0 = left + i * bar_width
                bars.rectangle([x0 + 1, bottom - count / tallest * (bottom - top), x0 + bar_width - 1, bottom],
                               fill=(*COLOURS[name], BAR_ALPHA), outline=(*COLOURS[name], 255))
        image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    for name, values in series.items():
        _dashed_vertical(draw, x_of(sum(values) / len(values)), top, bottom, (*COLOURS[name], 255))
    draw.line([(left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    draw.line([(left, top), (left, bottom)], fill=(0, 0, 0), width=1)
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        x = x_of(value)
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        text = f"{value:.4g}"
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 6), text, fill=(0, 0, 0), font=font)
    draw.text((4, top), str(tallest), fill=(0, 0, 0), font=font)
    draw.text((4, bottom - 10), "0", fill=(0, 0, 0), font=font)
    legend_x = right - 260
    for row, name in enumerate(series):
        y = 8 + row * 14
        draw.rectangle([legend_x, y + 2, legend_x + 10, y + 10], fill=(*COLOURS[name], 255))
        draw.text((legend_x + 16, y), labels.get(name, name)[:40], fill=(0, 0, 0), font=font)
    draw.text((left, height - 16), "score (dashed: mean)", fill=(80, 80, 80), font=font)
    return image


def draw_score_distributions(
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]], path: Path | str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG with one histogram panel per (title, {"A": scores, "B": scores}) and return its path."""
    if not panels:
        raise ValueError("nothing to plot")
    width, height = PANEL
    canvas = Image.new("RGB", (width, height * len(panels)), (255, 255, 255))
    for row, (title, series) in enumerate(panels):
        canvas.paste(_panel(title, series, labels or {}).convert("RGB"), (0, row * height))
    path = Path(path)
    canvas.save(path, format="PNG")
    return path

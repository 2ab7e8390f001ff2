"""Evaluation bookkeeping: sample folders, pairing, the report and its markdown. No models here.

A sample folder is what `inpo sample` writes: images and ``manifest.jsonl`` (one record per image:
at least ``file`` and ``prompt``; ``category`` or ``style`` where the prompt set has groups, and
``model``/``protocol``). Images of two folders are paired by file name, which `inpo sample`
derives from (prompt index, seed): the same prompt drawn from the same noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from inpo_pipeline.errors import UserError
from inpo_pipeline.evaluation.sampling import MANIFEST, describe_model, read_manifest
from inpo_pipeline.evaluation.stats import INTERVAL_RULE, TEST_RULE, PairedComparison, compare_scores, grouped_comparisons, summary_stats

GROUP_KEYS = ("category", "style")
TIE_RULE = ("B wins a pair when its score is higher; equal scores (identical images score identically) "
            "are ties and count half: rate = (wins + ties/2) / pairs")
INTERVAL = INTERVAL_RULE
TEST = TEST_RULE


def comparison_entry(comparison: PairedComparison) -> dict[str, Any]:
    """The report's win-rate entry: counts, rate, its interval and p-value, and Δ with its own."""
    rate, delta = comparison.win_rate, comparison.mean_difference

    def number(value: float) -> float | None:  # JSON has no NaN: a single prompt's interval is null
        return None if value != value else value

    return {"wins": comparison.wins, "ties": comparison.ties, "losses": comparison.losses, "n": comparison.n,
            "rate": rate.estimate, "low": number(rate.low), "high": number(rate.high),
            "p_value": number(rate.p_value), "prompts": rate.prompts,
            "mean_difference": {"estimate": delta.estimate, "low": number(delta.low), "high": number(delta.high),
                                "p_value": number(delta.p_value)}}


@dataclass(frozen=True)
class SampleImage:
    """One image of a sample folder."""

    file: str
    path: Path
    prompt: str
    group: str | None
    record: dict[str, Any]


@dataclass(frozen=True)
class SampleFolder:
    path: Path
    images: tuple[SampleImage, ...]
    group_key: str | None

    @property
    def model(self) -> Any:
        return self.images[0].record.get("model") if self.images else None

    @property
    def protocol(self) -> Any:
        return self.images[0].record.get("protocol") if self.images else None


def read_sample_folder(folder: str | Path) -> SampleFolder:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    records = read_manifest(path)
    if not records:
        raise UserError(f"{path} has no {MANIFEST} with image records (write it with `inpo sample`)")
    group_key = next((key for key in GROUP_KEYS if any(key in r for r in records)), None)
    images, seen = [], set()
    for record in records:
        file = str(record["file"])
        if file in seen:
            raise UserError(f"{path / MANIFEST} lists {file} twice")
        seen.add(file)
        if not (path / file).is_file():
            raise UserError(f"{path / MANIFEST} lists {file}, which is not in {path}")
        group = record.get(group_key) if group_key else None
        images.append(SampleImage(file, path / file, str(record["prompt"]), None if group is None else str(group),
                                  record))
    return SampleFolder(path, tuple(images), group_key)


def protocol_differences(a: SampleFolder, b: SampleFolder) -> list[str]:
    """The protocol fields in which two folders differ (both must record a protocol to differ)."""
    first, second = a.protocol, b.protocol
    if first is None or second is None:
        return []
    return sorted(key for key in set(first) | set(second) if first.get(key) != second.get(key))


def pair_images(a: SampleFolder, b: SampleFolder) -> list[tuple[SampleImage, SampleImage]]:
    """Images present in both folders, in A's order; their prompts must agree."""
    differences = protocol_differences(a, b)
    if differences:
        raise UserError(f"{a.path} and {b.path} were sampled under different protocols "
                        f"({', '.join(differences)}); sample both with the same options")
    by_file = {image.file: image for image in b.images}
    pairs = [(image, by_file[image.file]) for image in a.images if image.file in by_file]
    for first, second in pairs:
        if first.prompt != second.prompt:
            raise UserError(f"{first.file} has another prompt in {b.path} than in {a.path}: not a pair")
    if not pairs:
        raise UserError(f"{a.path} and {b.path} share no images (files named alike); nothing to compare")
    return pairs


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except Exception as error:  # PIL raises many types for unreadable files
        raise UserError(f"cannot read image {path} ({type(error).__name__})") from error


def pixel_digest(image: Image.Image) -> str:
    """Identifies an image by its pixels: equal images get one score, so they tie exactly."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


# ------------------------------------------------------------------------------ the report
def _group_table(scores_a: Sequence[float], scores_b: Sequence[float] | None,
                 groups: Sequence[str | None], prompts: Sequence[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    labels = ["(none)" if g is None else g for g in groups]
    for group in dict.fromkeys(labels):
        members = [i for i, label in enumerate(labels) if label == group]
        entry: dict[str, Any] = {"A": summary_stats([scores_a[i] for i in members])}
        if scores_b is not None:
            entry["B"] = summary_stats([scores_b[i] for i in members])
        table[group] = entry
    if scores_b is not None:
        for group, comparison in grouped_comparisons(scores_a, scores_b, labels, prompts).items():
            table[group]["win_rate"] = comparison_entry(comparison)
    return table


def scorer_section(scores_a: Sequence[float], scores_b: Sequence[float] | None,
                   groups: Sequence[str | None], identity: Mapping[str, Any],
                   prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """Statistics of one scorer: per folder, B's win rate over A, and the same per group.

    `prompts` (each pair's prompt) are the clusters of the intervals: a prompt's seeds move together.
    """
    prompts = list(prompts) if prompts is not None else [str(i) for i in range(len(scores_a))]
    section: dict[str, Any] = {"available": True, "identity": dict(identity), "A": summary_stats(scores_a)}
    if scores_b is not None:
        section["B"] = summary_stats(scores_b)
        section["mean_difference"] = section["B"]["mean"] - section["A"]["mean"]
        section["win_rate"] = comparison_entry(compare_scores(scores_a, scores_b, prompts))
    if any(group is not None for group in groups):
        section["by_group"] = _group_table(scores_a, scores_b, groups, prompts)
    return section


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _rate(rate: Mapping[str, Any]) -> str:
    if rate["low"] is None:  # a single prompt has no interval
        return f"{rate['rate']:.1%} [one prompt: no interval]"
    return f"{rate['rate']:.1%} [{rate['low']:.1%}, {rate['high']:.1%}], p = {rate['p_value']:.3g}"


def _delta(delta: Mapping[str, Any]) -> str:
    if delta["low"] is None:
        return f"{delta['estimate']:+.4f}"
    return f"{delta['estimate']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: one table over scorers, one per scorer and group."""
    folders = report["directories"]
    two = "B" in folders
    lines = ["# inpo eval", ""]
    for name, folder in folders.items():
        lines.append(f"- **{name}**: `{folder['path']}` ({folder['images']} images; {describe_model(folder.get('model'))})")
    protocol = report.get("protocol")
    if protocol:
        lines.append(f"- protocol: {protocol.get('scheduler')} × {protocol.get('steps')} steps, guidance "
                     f"{protocol.get('guidance')}, {protocol.get('resolution')} px, {len(protocol.get('seeds', []))} "
                     f"seed(s), {protocol.get('prompts', {}).get('count')} {protocol.get('prompts', {}).get('kind')} prompts")
    if two:
        lines.append(f"- pairs: {report['pairs']} (unpaired: A {report['unpaired']['A']}, B {report['unpaired']['B']})")
        lines += ["", f"Win rate of B over A. {report['tie_rule']}. Interval: {report['interval']}. "
                      f"p: {report['test']}, against a rate of 50%."]
    lines.append("")
    available = {name: s for name, s in report["scorers"].items() if s["available"]}
    if available:
        if two:
            lines += ["| scorer | A mean | A median | B mean | B median | Δ mean [95% CI] | B wins / ties / losses | B win rate [95% CI], p |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        else:
            lines += ["| scorer | n | mean | median | std |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, section in available.items():
            a = section["A"]
            if two:
                b, rate = section["B"], section["win_rate"]
                lines.append(f"| {name} | {_fmt(a['mean'])} | {_fmt(a['median'])} | {_fmt(b['mean'])} | "
                             f"{_fmt(b['median'])} | {_delta(rate['mean_difference'])} | "
                             f"{rate['wins']} / {rate['ties']} / {rate['losses']} | {_rate(rate)} |")
            else:
                lines.append(f"| {name} | {a['n']} | {_fmt(a['mean'])} | {_fmt(a['median'])} | {_fmt(a['std'])} |")
    for name, section in available.items():
        if "by_group" not in section:
            continue
        key = report.get("group_key") or "group"
        lines += ["", f"## {name} by {key}", ""]
        if two:
            lines += [f"| {key} | pairs | A mean | B mean | B win rate [95% CI] |", "| --- | ---: | ---: | ---: | ---: |"]
            lines += [f"| {group} | {e['A']['n']} | {_fmt(e['A']['mean'])} | {_fmt(e['B']['mean'])} | {_rate(e['win_rate'])} |"
                      for group, e in section["by_group"].items()]
        else:
            lines += [f"| {key} | n | mean | median |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {group} | {e['A']['n']} | {_fmt(e['A']['mean'])} | {_fmt(e['A']['median'])} |"
                      for group, e in section["by_group"].items()]
    unavailable = {name: s for name, s in report["scorers"].items() if not s["available"]}
    if unavailable:
        lines += ["", "Unavailable scorers (not run, not imitated):", ""]
        lines += [f"- {name}: {section['reason']}" for name, section in unavailable.items()]
    return "\n".join(lines) + "\n"

"""`inpo eval`: score one or two sample folders and write the report (JSON, markdown, PNG).

Read the folders' manifests and pair their images, then for each scorer score every distinct
(image, prompt) once, and hand the numbers to `inpo_pipeline.evaluation.report` for the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import inpo_pipeline
from cache_schema import now_iso
from inpo_pipeline.evaluation import report as evaluation
from inpo_pipeline.errors import UserError
from inpo_pipeline.evaluation.plots import draw_score_distributions
from inpo_pipeline.reporting import Reporter
from inpo_pipeline.evaluation.scorers import SCORERS, Scorer, ScorerUnavailable, load_scorer, resolve_spec


@dataclass
class EvalOptions:
    """The options of `inpo eval`; per-scorer locations are keyed by scorer name."""

    dir_a: str
    out: str
    scorers: list[str]
    dir_b: str | None = None
    scorer_models: dict[str, str] = field(default_factory=dict)
    processors: dict[str, str] = field(default_factory=dict)
    backbones: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    device: str | None = None

    def validate(self) -> None:
        if not self.scorers:
            raise UserError("give at least one --scorer")
        for name in self.scorers:
            if name not in SCORERS:
                raise UserError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
        if len(set(self.scorers)) != len(self.scorers):
            raise UserError("a --scorer is given twice")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")


def assign_to_scorers(values: list[str] | None, scorers: list[str], option: str) -> dict[str, str]:
    """`NAME=PATH` values go to that scorer; a bare PATH is allowed when one scorer is run."""
    assigned: dict[str, str] = {}
    for value in values or []:
        name, separator, location = value.partition("=")
        if separator and name in SCORERS:
            if name not in scorers:
                raise UserError(f"{option} {value}: --scorer {name} is not requested")
            assigned[name] = location
        elif len(scorers) == 1:
            assigned[scorers[0]] = value
        else:
            raise UserError(f"{option} {value}: with several scorers write NAME=PATH (e.g. hps=/ckpt/HPS_v2.1.pt)")
    return assigned


def report_paths(out: str) -> dict[str, Path]:
    """REPORT(.json|.md|.png): the three files written side by side."""
    base = Path(out)
    if base.suffix.lower() in (".json", ".md", ".png"):
        base = base.with_suffix("")
    return {kind: base.with_name(base.name + "." + kind) for kind in ("json", "md", "png")}


def _score_images(scorer: Scorer, jobs: dict[tuple[str, str], tuple[Path, str]], batch_size: int,
                  reporter: Reporter) -> dict[tuple[str, str], float]:
    """Scores of distinct (pixel digest, prompt) jobs, each scored once."""
    scores: dict[tuple[str, str], float] = {}
    keys = list(jobs)
    with reporter.progress(scorer.spec.name, len(keys), "img") as advance:
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            images = [evaluation.load_rgb(jobs[key][0]) for key in batch]
            values = scorer.score(images, [jobs[key][1] for key in batch])
            scores.update(zip(batch, values))
            advance(len(batch))
    return scores


def run_eval(options: EvalOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score the folder(s) with every requested scorer; write REPORT.json/.md/.png; return the report."""
    reporter = reporter or Reporter()
    options.validate()
    started = time.perf_counter()
    specs = [resolve_spec(name, options.scorer_models.get(name), options.processors.get(name),
                          options.backbones.get(name)) for name in options.scorers]
    folder_a = evaluation.read_sample_folder(options.dir_a)
    folder_b = evaluation.read_sample_folder(options.dir_b) if options.dir_b else None
    if folder_b is not None:
        pairs = evaluation.pair_images(folder_a, folder_b)
        images_a, images_b = [a for a, _ in pairs], [b for _, b in pairs]
    else:
        images_a, images_b = list(folder_a.images), []
    digests = {image.path: evaluation.pixel_digest(evaluation.load_rgb(image.path)) for image in images_a + images_b}
    jobs = {(digests[image.path], image.prompt): (image.path, image.prompt) for image in images_a + images_b}
    reporter.line(f"{len(images_a)} {'pairs' if folder_b else 'images'}, {len(jobs)} distinct (image, prompt) to score")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    groups = [image.group for image in images_a]
    sections: dict[str, Any] = {}
    per_image: list[dict[str, Any]] = [
        {"file": image.file, "prompt": image.prompt, **({folder_a.group_key: image.group} if folder_a.group_key else {}),
         "scores": {}} for image in images_a
    ]
    for spec in specs:
        try:
            with reporter.status(f"loading scorer {spec.name}"):
                scorer = load_scorer(spec, device)
        except ScorerUnavailable as unavailable:
            reporter.line(f"scorer {spec.name} unavailable: {unavailable}")
            sections[spec.name] = {"available": False, "reason": str(unavailable)}
            continue
        scores = _score_images(scorer, jobs, options.batch_size, reporter)
        scores_a = [scores[(digests[image.path], image.prompt)] for image in images_a]
        scores_b = [scores[(digests[image.path], image.prompt)] for image in images_b] if folder_b else None
        sections[spec.name] = evaluation.scorer_section(scores_a, scores_b, groups, scorer.identity(),
                                                            [image.prompt for image in images_a])
        for i, entry in enumerate(per_image):
            entry["scores"][spec.name] = {"A": scores_a[i], **({"B": scores_b[i]} if scores_b else {})}
        del scorer
    directories = {"A": {"path": str(folder_a.path), "images": len(folder_a.images), "model": folder_a.model}}
    if folder_b is not None:
        directories["B"] = {"path": str(folder_b.path), "images": len(folder_b.images), "model": folder_b.model}
    report: dict[str, Any] = {
        "inpo_version": inpo_pipeline.__version__,
        "created_at": now_iso(),
        "directories": directories,
        "protocol": folder_a.protocol,
        "group_key": folder_a.group_key,
        "scorers": sections,
        "images": per_image,
    }
    if folder_b is not None:
        report.update(pairs=len(images_a), unpaired={"A": len(folder_a.images) - len(images_a),
                                                     "B": len(folder_b.images) - len(images_b)},
                      tie_rule=evaluation.TIE_RULE, interval=evaluation.INTERVAL, test=evaluation.TEST)
    paths = report_paths(options.out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    panels = [(f"{name}: A mean {s['A']['mean']:.4g}" + (f", B mean {s['B']['mean']:.4g}" if "B" in s else ""),
               {side: [entry["scores"][name][side] for entry in per_image] for side in ("A", "B") if side in s})
              for name, s in sections.items() if s["available"]]
    if panels:
        labels = {side: f"{side}: {Path(folder['path']).name}" for side, folder in directories.items()}
        draw_score_distributions(panels, paths["png"], labels)
        report["plot"] = str(paths["png"])
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(evaluation.report_markdown(report), encoding="utf-8")
    report["seconds"] = time.perf_counter() - started
    return report

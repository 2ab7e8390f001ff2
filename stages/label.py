"""`inpo label`: a sample folder's image pairs as a preference dataset labelled by a scorer.

Read the folder (`inpo sample --seeds K`, K ≥ 2), pair each prompt's images by seed
(`inpo_pipeline.data.labels.pair_by_seed`), score both images of every pair with one scorer of
`inpo eval` (or the shapes world's reward), label by `preference_label`, and write a Pick-a-Pic v2
parquet that `inpo invert --data` reads as it reads the human data. The scorer's identity, the tie
margin and the source folder's model and protocol go into the parquet's schema metadata
(`LABEL_METADATA_KEY`); every row's two scores are columns (score_0, score_1) beside the labels.
The file is written under a temporary name and renamed into place, row group by row group, so a
killed run leaves no partial dataset and memory holds one batch of images.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import inpo_pipeline
from cache_schema import now_iso
from inpo_pipeline.evaluation import report as evaluation
from inpo_pipeline.errors import UserError
from inpo_pipeline.worlds.example import PICKAPIC_SCHEMA
from inpo_pipeline.data.labels import LABEL_METADATA_KEY, SamplePair, pair_by_seed, preference_label
from inpo_pipeline.reporting import Reporter
from inpo_pipeline.evaluation.scorers import SCORERS, load_scorer, resolve_spec

PAIRING_RULE = "within each prompt, images paired by consecutive seeds (0,1), (2,3), …; an odd last seed is left out"
LABEL_RULE = "the higher score wins; |score_0 − score_1| ≤ tie_margin is a tie (label 0.5/0.5)"
SCORE_COLUMNS = ("score_0", "score_1")


@dataclass
class LabelOptions:
    """The options of `inpo label` (see the CLI for their help)."""

    samples: str
    out: str
    scorer: str
    scorer_model: str | None = None
    processor: str | None = None
    backbone: str | None = None
    tie_margin: float = 0.0
    batch_size: int = 16
    device: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        checks = [
            (self.scorer in SCORERS, f"unknown scorer {self.scorer!r}; choose from {', '.join(SCORERS)}"),
            (math.isfinite(self.tie_margin) and self.tie_margin >= 0, "--tie-margin must be a finite number >= 0"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (Path(self.out).suffix == ".parquet", f"--out {self.out}: give a path ending in .parquet"),
            (self.overwrite or not Path(self.out).exists(), f"{self.out} exists; choose another --out or pass --overwrite"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def _schema(metadata: dict[str, Any]) -> Any:
    import pyarrow as pa

    fields = list(PICKAPIC_SCHEMA) + [pa.field(name, pa.float64()) for name in SCORE_COLUMNS] + [
        pa.field("seed_0", pa.int64()), pa.field("seed_1", pa.int64()), pa.field("prompt_index", pa.int64())]
    return pa.schema(fields, metadata={LABEL_METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode()})


def _seed(image: evaluation.SampleImage) -> int:
    return int(image.record["seed"])


def _pairs(folder: evaluation.SampleFolder) -> tuple[list[SamplePair], int]:
    missing = [image.file for image in folder.images if "seed" not in image.record or "prompt_index" not in image.record]
    if missing:
        raise UserError(f"{folder.path}: {missing[0]} has no seed/prompt_index in manifest.jsonl; "
                        "label a folder written by `inpo sample`")
    pairs, unpaired = pair_by_seed(folder.images, lambda image: image.record["prompt_index"], _seed)
    if not pairs:
        raise UserError(f"{folder.path}: no prompt has two images; sample it with `inpo sample --seeds 2` or more")
    return pairs, unpaired


def run_label(options: LabelOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Score, label and write the dataset; returns its summary (the metadata written, plus timing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reporter = reporter or Reporter()
    options.validate()
    started = time.perf_counter()
    folder = evaluation.read_sample_folder(options.samples)
    pairs, unpaired = _pairs(folder)
    spec = resolve_spec(options.scorer, options.scorer_model, options.processor, options.backbone)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with reporter.status(f"loading scorer {spec.name}"):
        scorer = load_scorer(spec, device)
    metadata: dict[str, Any] = {
        "inpo_version": inpo_pipeline.__version__, "created_at": now_iso(),
        "scorer": scorer.identity(), "tie_margin": options.tie_margin, "label_rule": LABEL_RULE,
        "pairing": PAIRING_RULE, "score_columns": list(SCORE_COLUMNS),
        "source": {"folder": str(folder.path.resolve()), "model": folder.model, "protocol": folder.protocol},
    }
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.labelling")
    schema = _schema(metadata)
    counts = {"pairs": 0, "ties": 0, "first_preferred": 0}
    reporter.line(f"{len(pairs)} pairs from {len(folder.images)} images of {folder.path} "
                  f"({unpaired} left without a partner); scorer {spec.name}, tie margin {options.tie_margin:g}")
    try:
        with pq.ParquetWriter(str(temporary), schema) as writer, \
                reporter.progress(f"labelling with {spec.name}", len(pairs), "pairs") as advance:
            for start in range(0, len(pairs), options.batch_size):
                batch = pairs[start:start + options.batch_size]
                images = [evaluation.load_rgb(image.path) for pair in batch for image in (pair.first, pair.second)]
                scores = scorer.score(images, [pair.prompt for pair in batch for _ in range(2)])
                writer.write_table(pa.Table.from_pylist(
                    [_row(pair, scores[2 * i], scores[2 * i + 1], options.tie_margin, counts)
                     for i, pair in enumerate(batch)], schema=schema))
                advance(len(batch))
        os.replace(temporary, out)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename is not None and Path(error.filename).resolve() not in (temporary.resolve(), out.resolve()):
            raise UserError(f"cannot read {error.filename}: {error.strerror or error}; "
                            "fix that and run the same command again") from error
        raise UserError(f"cannot write {out}: {error.strerror or error}; fix that and run the same command again") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return {**metadata, "out": str(out), **counts, "unpaired_images": unpaired,
            "seconds": time.perf_counter() - started}


def _row(pair: SamplePair, score_0: float, score_1: float, tie_margin: float, counts: dict[str, int]) -> dict[str, Any]:
    try:
        label = preference_label(score_0, score_1, tie_margin)
    except ValueError as error:
        raise UserError(f"{pair.first.file} / {pair.second.file}: {error}") from error
    counts["pairs"] += 1
    counts["ties"] += label == 0.5
    counts["first_preferred"] += label == 1.0
    uids = (pair.first.file, pair.second.file)
    return {
        "best_image_uid": "" if label == 0.5 else uids[0] if label == 1.0 else uids[1],
        "caption": pair.prompt, "image_0_uid": uids[0], "image_1_uid": uids[1],
        "jpg_0": pair.first.path.read_bytes(), "jpg_1": pair.second.path.read_bytes(),
        "label_0": label, "label_1": 1.0 - label, "user_id": 0,
        "score_0": float(score_0), "score_1": float(score_1),
        "seed_0": _seed(pair.first), "seed_1": _seed(pair.second), "prompt_index": pair.prompt_index,
    }


def read_label_metadata(path: str | Path) -> dict[str, Any]:
    """What `inpo label` recorded in a parquet it wrote (UserError for another parquet)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(str(path)).metadata or {}
    if LABEL_METADATA_KEY not in metadata:
        raise UserError(f"{path} was not written by `inpo label` (no {LABEL_METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[LABEL_METADATA_KEY])

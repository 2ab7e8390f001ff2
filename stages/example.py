"""`inpo example`: the whole pipeline on a built-in tiny model and a generated preference set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from inpo_pipeline.errors import UserError
from inpo_pipeline.worlds.example import (
    build_tiny_flux, build_tiny_sd3, build_tiny_sd15, build_tiny_sdxl, write_pickapic_parquet,
)
from inpo_pipeline.reporting import Reporter
from stages.invert import InvertOptions, run_invert
from stages.train import TrainOptions, run_train


def run_example(out: Path, *, pairs: int, family: str, steps: int, reporter: Reporter) -> dict[str, Any]:
    """Build (once) a tiny pipeline and a Pick-a-Pic-layout parquet, invert it, train on the store."""
    builders = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
    if family not in builders:
        raise UserError(f"--family must be one of {', '.join(builders)}")
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"tiny-{family}"
    if not (model / "model_index.json").exists():
        with reporter.status(f"building the tiny {family} pipeline at {model}"):
            builders[family](model)
    data = out / "pickapic-example.parquet"
    if not data.exists():
        written = write_pickapic_parquet(data, num_pairs=pairs, seed=0)
        reporter.line(
            f"wrote {written['num_rows']} pairs to {data} "
            f"({len(written['tie_rows'])} ties, {len(written['broken_rows'])} with a broken image)"
        )
    store = out / f"store-{family}.zarr"
    reporter.line(f"stage one: inpo invert --model {model} --data {data} --out {store}")
    inverted = run_invert(
        InvertOptions(model=str(model), data=str(data), out=str(store), rows_per_shard=8, shards_per_window=2,
                      batch_size=8, timesteps_per_pair=2, seed=0),
        reporter,
    )
    run = out / f"run-{family}"
    shutil.rmtree(run, ignore_errors=True)
    reporter.line(f"stage two: inpo train --cache {store} --out {run} --steps {steps}")
    trained = run_train(
        TrainOptions(cache=str(store), out=str(run), steps=steps, batch_size=4, grad_accum=1, warmup=0,
                     lr=2e-5, checkpoint_every=max(steps // 2, 1), num_workers=0, seed=0),
        reporter,
    )
    first = trained["final"]
    reporter.table("inpo example", [
        ("store", f"{store} ({inverted['rows_valid']} usable rows; `inpo cache info {store}`)"),
        ("trained weights", trained.get("weights", "")),
        ("metrics", f"{run / 'metrics.jsonl'}"),
        ("final loss", f"{first['loss']:.4f} (log 2 = 0.6931 at step 0)"),
        ("implicit accuracy", f"{first['implicit_accuracy']:.2f}"),
    ])
    return {"invert": inverted, "train": trained}

"""`inpo example`: the whole pipeline on a built-in tiny model and a generated preference set."""

from __future__ import annotations

from pathlib import Path

from inpo_pipeline.example import build_tiny_sd15, build_tiny_sdxl, write_pickapic_parquet
from inpo_pipeline.reporting import Reporter
from stages.invert import InvertOptions, run_invert


def run_example(out: Path, *, pairs: int, family: str, reporter: Reporter) -> dict:
    """Build (once) a tiny pipeline and a Pick-a-Pic-layout parquet, then invert it into a store."""
    if family not in ("sd15", "sdxl"):
        from inpo_pipeline.errors import UserError

        raise UserError("--family must be sd15 or sdxl")
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"tiny-{family}"
    if not (model / "model_index.json").exists():
        with reporter.status(f"building the tiny {family} pipeline at {model}"):
            (build_tiny_sd15 if family == "sd15" else build_tiny_sdxl)(model)
    data = out / "pickapic-example.parquet"
    if not data.exists():
        written = write_pickapic_parquet(data, num_pairs=pairs, seed=0)
        reporter.line(
            f"wrote {written['num_rows']} pairs to {data} "
            f"({len(written['tie_rows'])} ties, {len(written['broken_rows'])} with a broken image)"
        )
    store = out / f"store-{family}.zarr"
    options = InvertOptions(
        model=str(model), data=str(data), out=str(store), rows_per_shard=8, shards_per_window=2,
        batch_size=8, seed=0,
    )
    summary = run_invert(options, reporter)
    reporter.line(f"store ready: inspect it with `inpo cache info {store}`")
    return summary

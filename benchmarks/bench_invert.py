"""Stage-one benchmark: pairs/s of `inpo invert`, UNet share of wall time, padding, store bytes.

    OMP_NUM_THREADS=2 python benchmarks/bench_invert.py --shape small --pairs 64 --batch-size 16 --recipe inpo --recipe authors
    python benchmarks/bench_invert.py --shape sd15 --pairs 512 --batch-size 32 --compute-dtype bfloat16  # GPU

Runs the real stage runner (`stages.invert.run_invert`) on generated Pick-a-Pic-layout data with
a random-weight pipeline of the given shape, then reads the store's own accounting. Several
`--recipe`s are run side by side in interleaved rounds (one JSON record per recipe, medians),
so that their ratio is measured under the same machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import SHAPES, build_shaped_pipeline, dump, machine  # noqa: E402
from cache_schema import CacheStore  # noqa: E402
from inpo_pipeline.worlds.example import write_pickapic_parquet  # noqa: E402
from inpo_pipeline.reporting import Reporter  # noqa: E402
from stages.invert import InvertOptions, run_invert  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "small", "sd15"], default="small")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--recipe", action="append", choices=["inpo", "authors"], default=None,
                        help="recipe(s) to measure side by side (default: inpo)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timed rounds per recipe")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--work", type=Path, default=Path(".devbench"))
    arguments = parser.parse_args()

    work = arguments.work
    model = build_shaped_pipeline(work / f"model-{arguments.shape}", arguments.shape)
    data = work / f"pairs-{arguments.pairs}.parquet"
    if not data.exists():
        write_pickapic_parquet(data, num_pairs=arguments.pairs, seed=0, ties=0, broken=0, row_group_size=64)
    resolution = arguments.resolution or (SHAPES[arguments.shape]["resolution"] if arguments.shape in SHAPES else 64)
    recipes = arguments.recipe or ["inpo"]
    measured: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    for _round in range(arguments.rounds):
        for recipe in recipes:
            measured[recipe].append(measure(arguments, model, data, resolution, recipe))
    for recipe, records in measured.items():
        best = sorted(records, key=lambda r: r["pairs_per_second"])[len(records) // 2]
        best["rounds"] = len(records)
        best["pairs_per_second_all_rounds"] = [r["pairs_per_second"] for r in records]
        dump(best)


def measure(arguments: argparse.Namespace, model: Path, data: Path, resolution: int, recipe: str) -> dict:
    store = arguments.work / f"bench-store-{recipe}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    options = InvertOptions(
        model=str(model), data=str(data), out=str(store), resolution=resolution, recipe=recipe,
        batch_size=arguments.batch_size, compute_dtype=arguments.compute_dtype, dtype=arguments.dtype,
        device=arguments.device,
    )
    started = time.perf_counter()
    summary = run_invert(options, Reporter(enabled=False))
    wall = time.perf_counter() - started
    run = summary["this_run"]
    opened = CacheStore.open(store)
    shard_seconds = float(opened.group["done"]["shard_stats"][:][:, 2].sum())
    pairs = summary["rows_valid"]
    settings = summary["settings"]
    return {
        "benchmark": "invert",
        "recipe": recipe,
        "shape": arguments.shape,
        "resolution": resolution,
        "batch_size": arguments.batch_size,
        "compute_dtype": arguments.compute_dtype,
        "timestep_mode": settings["timestep_mode"],
        "inversion_guidance": settings["inversion_guidance"],
        "pairs": pairs,
        "wall_seconds_end_to_end": round(wall, 2),
        "inversion_seconds": round(shard_seconds, 2),
        "pairs_per_second": round(pairs / shard_seconds, 3),
        "pairs_per_second_end_to_end": round(pairs / wall, 3),
        "unet_share_of_inversion_time": round(run["seconds_in_unet"] / shard_seconds, 3),
        "unet_calls": run["unet_calls"],
        "unet_evaluations_per_pair": round(summary["unet_row_evaluations"] / pairs, 2),
        "padding_share": round(run["padding_share"], 3),
        "store_bytes_per_row": round(summary["bytes_per_row"]),
        "row_arrays_bytes_per_row": round(sum(f.stat().st_size for f in (store / "rows").rglob("*") if f.is_file()) / summary["rows"]),
        "raw_bytes_per_row": summary["raw_bytes_per_row"],
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine(),
    }


if __name__ == "__main__":
    main()

"""Flow models on the CPU: stage one (pairs/s of `inpo invert`) and stage two (pairs/s of
`inpo train`) of a flow-matching pipeline, side by side with an ε-model of the same size class.

    OMP_NUM_THREADS=2 python benchmarks/bench_flow.py --shapes small,small-sd3 --pairs 32 --steps 6

Runs the real stage runners (`run_invert`, `run_train`) on generated Pick-a-Pic-layout data with
random-weight pipelines (benchmarks/common.py), alternating the shapes so their ratio is taken
under the same machine load. Stage-two pairs/s is the median of the per-step figure the trainer
logs, first step excluded. One JSON record per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FLOW_SHAPES, SHAPES, build_shaped_pipeline, dump, machine  # noqa: E402
from cache_schema import CacheStore  # noqa: E402
from inpo_pipeline.worlds.example import write_pickapic_parquet  # noqa: E402
from inpo_pipeline.reporting import Reporter  # noqa: E402
from stages.invert import InvertOptions, run_invert  # noqa: E402
from stages.train import TrainOptions, run_train  # noqa: E402

RESOLUTIONS = {"tiny": 32, "tiny-sd3": 32, "tiny-flux": 32}


def measure(shape: str, arguments: argparse.Namespace, data: Path) -> dict:
    model = build_shaped_pipeline(arguments.work / f"model-{shape}", shape)
    resolution = RESOLUTIONS.get(shape) or {**SHAPES, **FLOW_SHAPES}[shape]["resolution"]
    store, run = arguments.work / f"flow-store-{shape}.zarr", arguments.work / f"flow-run-{shape}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    summary = run_invert(InvertOptions(model=str(model), data=str(data), out=str(store), resolution=resolution,
                                       batch_size=arguments.batch_size, device="cpu"), Reporter(enabled=False))
    invert_wall = time.perf_counter() - started
    shard_seconds = float(CacheStore.open(store).group["done"]["shard_stats"][:][:, 2].sum())
    run_train(TrainOptions(cache=str(store), out=str(run), steps=arguments.steps, batch_size=arguments.train_batch,
                           grad_accum=1, warmup=0, num_workers=0, lora_rank=arguments.lora_rank,
                           gradient_checkpointing=False), Reporter(enabled=False))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [line["pairs_per_second"] for line in lines[1:] if line.get("pairs_per_second")]
    return {
        "benchmark": "flow-stages", "shape": shape, "family": summary["settings"]["family"],
        "resolution": resolution, "pairs": summary["rows_valid"], "recipe": summary["settings"]["recipe"],
        "timestep_mode": summary["settings"]["timestep_mode"],
        "invert_pairs_per_second": round(summary["rows_valid"] / shard_seconds, 3),
        "invert_wall_seconds": round(invert_wall, 2),
        "unet_evaluations_per_pair": round(summary["unet_row_evaluations"] / summary["rows_valid"], 2),
        "bytes_per_row": round(summary["bytes_per_row"]), "raw_bytes_per_row": summary["raw_bytes_per_row"],
        "raw_bytes_per_prompt": summary["raw_bytes_per_prompt"],
        "train_pairs_per_second_median": round(statistics.median(rates), 3) if rates else None,
        "train_steps": arguments.steps, "train_batch": arguments.train_batch, "lora_rank": arguments.lora_rank,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small,small-sd3")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(".devbench"))
    arguments = parser.parse_args()
    arguments.work.mkdir(parents=True, exist_ok=True)
    data = arguments.work / f"pairs-{arguments.pairs}.parquet"
    if not data.exists():
        write_pickapic_parquet(data, num_pairs=arguments.pairs, seed=0, ties=0, broken=0, row_group_size=64)
    for shape in arguments.shapes.split(","):
        dump(measure(shape.strip(), arguments, data))


if __name__ == "__main__":
    main()

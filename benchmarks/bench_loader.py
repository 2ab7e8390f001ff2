"""Stage two's read path against the disk: rows/s of `inpo train`'s loader and of a numpy memmap.

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py                      # tiny and sd15 latents
    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --shapes sd15 --rows 4096 --batches 8,32 --workers 0,1,4
    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --layouts zstd,earliest --batches 8 --workers 0,2
    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --layouts current,s3    # needs the s3 extra and moto[server]

For each latent shape a store of random rows is written three times through `CacheStore`: in the
current layout (one chunk per shard, latents and text uncompressed: raw bytes + crc32c, read by
`CacheStore` itself), with zstd latents and text (`compress_latents=True`, the previous default:
read through zarr's codecs) and in the earliest layout (one row per chunk, `rows_per_chunk=1`,
zstd); `s3` uploads the current layout's objects to a local S3 server (moto, on 127.0.0.1, in its
own process on the same cores: its per-request cost, not a real S3's, bounds what that row shows)
and reads the store by its s3:// URL. Then, side by side in one run:

(a) `loader`: the trainer's own path (`BatchSchedule` → `MicroBatches` → its DataLoader settings,
    spawned workers, start-up left out: see `time_loader`), InPO inputs: four latent arrays, two reference errors, the plan arrays, and
    the text embedding of each row's prompt, as float32 tensors — `--data-order blocks` and `rows`;
(b) `memmap`: the floor — the same bytes (the four latent arrays and the per-row text embedding,
    raw fp16) in `.npy` files read through `np.load(mmap_mode="r")`, one fancy-indexed copy per
    array per micro-batch, for the rows of the `rows` order's micro-batches (random reads: the
    floor the ratio is taken against) and of the `blocks` order's (reported beside it).
Rows/s counts training rows (pairs); MB/s the raw bytes of those rows. The page cache is warm
for both (the files were just written): the ratio is the loader's CPU cost per byte.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import dump, machine  # noqa: E402
from benchmarks.local_s3 import local_s3  # noqa: E402
from cache_schema import CacheStore, RowPlan, ShardResult, StoreLayout  # noqa: E402
from inpo_pipeline.data.batches import BatchSchedule, MicroBatches, micro_batch_loader  # noqa: E402

LATENTS = {"tiny": ((4, 8, 8), (77, 32)), "sd15": ((4, 64, 64), (77, 768))}
LATENT_ARRAYS = ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected")
# name: (label, rows_per_chunk, compress_latents)
LAYOUTS = {"current": ("shard chunks", None, False), "zstd": ("shard chunks, zstd", None, True),
           "earliest": ("row chunks, zstd (earliest layout)", 1, True),
           "s3": ("shard chunks, local S3 server", None, False)}


def settings() -> dict:
    from diffusers import DDIMScheduler

    return {"family": "sd15", "scheduler": dict(DDIMScheduler().config), "seed": 0}


def build_store(path: Path, shape: str, num_rows: int, rows_per_chunk: int | None, compress_latents: bool) -> CacheStore:
    latent, text = LATENTS[shape]
    num_prompts = max(2, num_rows // 4)
    layout = StoreLayout(num_rows=num_rows, latent_shape=latent, num_prompts=num_prompts, text_shape=text,
                         pooled_dim=None, rows_per_chunk=rows_per_chunk)
    rng = np.random.default_rng(0)
    plan = RowPlan(timestep=rng.integers(0, 1000, num_rows), prompt_index=rng.integers(1, num_prompts, num_rows),
                   source_row=np.arange(num_rows), draw=np.zeros(num_rows, dtype=np.int16))
    CacheStore.create(path, layout, settings(), {"created_at": "bench"}, plan, [""] + [f"p{i}" for i in range(1, num_prompts)],
                      compress_latents=compress_latents)
    store = CacheStore.open(path, mode="r+")
    for shard in range(layout.num_shards):
        n = len(range(*layout.shard_rows(shard).indices(num_rows)))
        store.write_shard(shard, ShardResult(
            *(rng.standard_normal((n, *latent)).astype(np.float32) for _ in LATENT_ARRAYS),
            reference_error_chosen=rng.random((n, 2)).astype(np.float32),
            reference_error_rejected=rng.random((n, 2)).astype(np.float32),
            valid=np.ones(n, dtype=np.uint8), inversion_steps=np.ones(n, dtype=np.int16)))
    for chunk in range(layout.num_prompt_chunks):
        span = layout.prompt_chunk(chunk)
        store.write_prompt_chunk(chunk, rng.standard_normal((span.stop - span.start, *text)).astype(np.float32), None)
    return CacheStore.open(path)


def build_memmaps(folder: Path, store: CacheStore) -> dict[str, np.ndarray]:
    """The same raw bytes as plain .npy files (latents and text embeddings, fp16)."""
    arrays = {}
    for name in LATENT_ARRAYS:
        np.save(folder / f"{name}.npy", np.asarray(store.group["rows"][name][:]))
        arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
    np.save(folder / "text.npy", np.asarray(store.group["prompts"]["embedding"][:]))
    arrays["text"] = np.load(folder / "text.npy", mmap_mode="r")
    arrays["prompt_index"] = np.asarray(store.group["rows"]["prompt_index"][:])
    return arrays


def time_raw_gets(store: CacheStore) -> float:
    """Rows/s of fetching, as concurrently as s3fs goes, every object of the four latent arrays
    of an s3:// store: what the server delivers at all of what the loader's timed pass asks it
    for (the text embeddings come from the prompt cache there), with no decoding, checking or
    copying — the floor the s3 rows are also taken against."""
    fs = store.location.fs
    root = store.location.root
    keys = [key for key in fs.find(root) if any(f"/{name}/c/" in key for name in LATENT_ARRAYS)]
    started = time.perf_counter()
    fetched = fs.cat(keys)
    elapsed = time.perf_counter() - started
    assert len(fetched) == len(keys)
    return store.layout.num_rows / elapsed


def row_bytes(store: CacheStore) -> int:
    c, h, w = store.layout.latent_shape
    length, width = store.layout.text_shape
    return 2 * (len(LATENT_ARRAYS) * c * h * w + length * width)


def time_loader(store: CacheStore, schedule: BatchSchedule, micro_batches: int, workers: int) -> float:
    """Rows/s of the trainer's dataset and loader settings over `micro_batches` micro-batches
    (default: three read groups per worker). The loader's one pass reads those micro-batches
    three times (the dataset repeated) with the same processes (or, without workers, the same
    open store), and the clock runs from the first micro-batch of the second time to the first
    of the third: the steady state between arrivals, with the workers' pipeline as full at both
    ends. Start-up — spawning workers, opening the store, its one-time reads of the small
    per-row arrays, the lost-object check of each shard, the trainer's first mapping of each
    worker slot — is left out, as `inpo train` pays it once per run, and so is the workers' exit.
    The prompt cache filled the first time serves the second only as far as the dataset's
    prompts fit it (`--prompt-cache-mb 0` measures reading every prompt's object instead)."""
    count = micro_batches or 3 * schedule.micro_batches_per_group * max(1, workers)
    dataset = MicroBatches(str(store.path), schedule, 0, count)
    loader = micro_batch_loader(torch.utils.data.ConcatDataset([dataset] * 3), workers)
    rows = 0
    for seen, batch in enumerate(loader):
        if seen == count:
            started = time.perf_counter()
        elif seen == 2 * count:
            elapsed = time.perf_counter() - started
        if count <= seen < 2 * count:
            rows += len(batch["rows"])
    assert rows == count * schedule.batch_size
    return rows / elapsed


def time_memmap(arrays: dict[str, np.ndarray], schedule: BatchSchedule, micro_batches: int) -> float:
    started, rows = time.perf_counter(), 0
    for index in range(1, micro_batches):
        picked = np.sort(schedule.micro_batch(index)[0])
        copies = [np.array(arrays[name][picked]) for name in LATENT_ARRAYS]
        copies.append(np.array(arrays["text"][np.sort(arrays["prompt_index"][picked])]))
        rows += len(picked)
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,sd15")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--workers", default="0,1,4")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"Store layouts to read, of {', '.join(LAYOUTS)}.")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="Micro-batches per timed pass (default: three read groups per worker).")
    parser.add_argument("--prompt-cache-mb", type=float, default=None,
                        help="The prompt cache of each open store (default: the store's own, 256 MB); "
                             "0 reads every prompt's object. Without workers only (spawned ones start anew).")
    args = parser.parse_args()
    if args.prompt_cache_mb is not None:
        if args.workers != "0":
            parser.error("--prompt-cache-mb applies to --workers 0 only")
        import cache_schema.store

        cache_schema.store.PROMPT_CACHE_BYTES = int(args.prompt_cache_mb * 2**20)
    report: dict = {"machine": machine(), "rows": args.rows, "results": []}
    with ExitStack() as servers:
        new_bucket = servers.enter_context(local_s3()) if "s3" in args.layouts.split(",") else None
        run(args, report, new_bucket)
    dump(report)


def upload(store: CacheStore, bucket: str) -> CacheStore:
    """The same store's objects under s3://bucket/… (the local copy is removed)."""
    import s3fs

    url = f"s3://{bucket}/{store.path.name}"
    s3fs.S3FileSystem().put(str(store.path), url.removeprefix("s3://"), recursive=True)
    shutil.rmtree(store.path)
    return CacheStore.open(url)


def run(args: argparse.Namespace, report: dict, new_bucket: Any) -> None:
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            keys = args.layouts.split(",")
            stores = {LAYOUTS[key][0]: build_store(folder / f"{key}.zarr", shape, args.rows, *LAYOUTS[key][1:])
                      for key in keys}
            if "s3" in keys:
                stores[LAYOUTS["s3"][0]] = upload(stores[LAYOUTS["s3"][0]], new_bucket())
            first = next(iter(stores.values()))
            for layout, store in stores.items():
                on_disk = {"shape": shape, "layout": layout, "bytes_on_disk": store.bytes_on_disk()}
                report.setdefault("bytes_on_disk", []).append(on_disk)
                print(on_disk, file=sys.stderr, flush=True)
            arrays = build_memmaps(folder, first)
            size = row_bytes(first)
            for batch in (int(b) for b in args.batches.split(",")):
                count = args.micro_batches
                blocks = BatchSchedule(np.arange(args.rows), batch, 1, 0, seed=0, prompt_dropout=0.0)
                rows_order = BatchSchedule(np.arange(args.rows), batch, 1, 0, seed=0, prompt_dropout=0.0, order="rows")
                floor = time_memmap(arrays, rows_order, count or 3 * blocks.micro_batches_per_group)
                floor_blocks = time_memmap(arrays, blocks, count or 3 * blocks.micro_batches_per_group)
                for workers in (int(w) for w in args.workers.split(",")):
                    for layout, store in stores.items():
                        for order, schedule in (("blocks", blocks), ("rows", rows_order)):
                            if layout != "shard chunks" and order == "rows":
                                continue
                            rate = time_loader(store, schedule, count, workers)
                            raw = {}
                            if layout == LAYOUTS["s3"][0]:
                                raw_rate = time_raw_gets(store)
                                raw = {"raw_get_rows_per_s": round(raw_rate, 1), "share_of_raw_get": round(rate / raw_rate, 3)}
                            result = {"shape": shape, "batch": batch, "workers": workers, "layout": layout,
                                      "order": order, "rows_per_s": round(rate, 1),
                                      "mb_per_s": round(rate * size / 1e6, 1),
                                      "memmap_rows_per_s": round(floor, 1),
                                      "memmap_block_order_rows_per_s": round(floor_blocks, 1),
                                      "share_of_memmap": round(rate / floor, 3), **raw}
                            report["results"].append(result)
                            print(result, file=sys.stderr, flush=True)
            for store in stores.values():
                if isinstance(store.path, Path):
                    shutil.rmtree(store.path, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`inpo cache verify`: completeness, shapes, NaN/Inf and checksums; optionally recompute rows.

Recomputing redoes K random finished rows from the source images with the model recorded in
the store, one row per shard-sized batch, and compares with what is stored. The rows are
recomputed in a different batch composition than when they were written, so the comparison
allows a few units in the last place of the storage dtype (see RECOMPUTE_TOLERANCE).
"""

from __future__ import annotations

import numpy as np
import torch

from cache_schema import CacheStore, RowPlan
from inpo_pipeline.method import ddim
from inpo_pipeline.data.sources import reopen_source
from inpo_pipeline.errors import UserError
from inpo_pipeline.method.inversion import InversionConfig, invert_shard
from inpo_pipeline.models.reference import load_reference
from inpo_pipeline.reporting import Reporter
from stages.invert import COMPUTE_DTYPES

# (absolute, relative) per storage dtype for x_t and τ; e_ref is compared relative only.
RECOMPUTE_TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (4e-3, 4e-3), "bfloat16": (3e-2, 3e-2)}
REFERENCE_ERROR_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def verify_store(store_path: str, *, recompute: int = 0, seed: int = 0, device: str | None = None,
                 reporter: Reporter | None = None, repair: bool = False) -> list[str]:
    """Every problem found, one line each; an empty list means the store is sound. With `repair`,
    shards and prompt chunks with lost objects are marked unfinished, for `inpo invert` to redo."""
    if recompute < 0:
        raise UserError("--recompute must be >= 0")
    if not 0 <= seed < 2**63:
        raise UserError("--seed must be between 0 and 2**63 - 1")
    reporter = reporter or Reporter()
    store = CacheStore.open(store_path)
    if not store.every_chunk_written:
        reporter.line("note: this store was written by an earlier inpo that skipped all-zero chunks, so lost "
                      "objects can be detected in its latents only")
    with reporter.progress("reading every shard", store.layout.num_shards, unit="shards") as advance:
        problems = store.check_integrity(progress=lambda _shard: advance(1))
    if repair and problems:
        shards, chunks = CacheStore.open(store_path, mode="r+").unmark_lost()
        if shards or chunks:
            reporter.line(f"repair: {len(shards)} shard(s) and {len(chunks)} prompt chunk(s) with lost objects are "
                          "marked unfinished; run the store's `inpo invert` command again to redo exactly those")
    if recompute > 0 and not problems:
        problems += recompute_rows(store, recompute, seed, torch.device(device or "cpu"), reporter)
    return problems


def recompute_rows(store: CacheStore, count: int, seed: int, device: torch.device, reporter: Reporter) -> list[str]:
    settings = store.settings
    candidates = store.valid_rows()
    if len(candidates) == 0:
        return ["no finished valid rows to recompute"]
    rows = np.sort(np.random.default_rng(seed).choice(candidates, size=min(count, len(candidates)), replace=False))
    source = reopen_source(settings["data"])
    reference = load_reference(settings["model"], unet_path=settings.get("unet"), vae_path=settings.get("vae"))
    if reference.unet_fingerprint != settings["unet_fingerprint"]:
        raise UserError("the model found at the recorded path has other UNet weights than the store's reference")
    reference.to(device, COMPUTE_DTYPES[settings["compute_dtype"]])
    if settings["timestep_mode"] in ddim.RETIRED_MODES:
        return [f"rows of timestep mode {settings['timestep_mode']!r} cannot be recomputed: that mode was retired"]
    config = InversionConfig.from_settings(settings, batch_size=8)
    stored = store.read_rows(rows)
    plan: RowPlan = store.read_plan(rows)
    records = {r.source_row: r for r in source.read(np.unique(plan.source_row))}
    result, _ = invert_shard(reference, plan, records, store.read_prompt_embeddings, config, device)
    absolute, relative = RECOMPUTE_TOLERANCE[settings["storage_dtype"]]
    problems = []
    worst: dict[str, float] = {}
    for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected"):
        fresh, kept = getattr(result, name), getattr(stored, name)
        excess = np.abs(fresh - kept) - (absolute + relative * np.abs(kept))
        worst[name] = float(np.abs(fresh - kept).max())
        for index in np.flatnonzero((excess > 0).reshape(len(rows), -1).any(axis=1)):
            problems.append(f"row {rows[index]}: {name} differs from a recomputation by {np.abs(fresh - kept)[index].max():.3g}")
    for name in ("reference_error_chosen", "reference_error_rejected"):
        fresh, kept = getattr(result, name), getattr(stored, name)
        ratio = np.abs(fresh - kept) / np.maximum(np.abs(kept), 1e-12)
        worst[name] = float(ratio.max())
        for index in np.flatnonzero((ratio > REFERENCE_ERROR_RTOL[settings["storage_dtype"]]).any(axis=1)):
            problems.append(f"row {rows[index]}: {name} differs from a recomputation by {ratio[index].max():.3g} (relative)")
    if not result.valid.all():
        problems.append("a row stored as valid has an image that no longer decodes")
    reporter.line(f"recomputed {len(rows)} rows; largest differences: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    return problems

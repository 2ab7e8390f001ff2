"""`inpo invert`: read the preference data, invert it with the reference model, fill a store.

Thin on purpose: plan (rank 0), encode prompts, invert windows of shards, report. All math is
in `inpo_pipeline.method.inversion`, all layout in `cache_schema`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import inpo_pipeline
from cache_schema import SCHEMA_VERSION, CacheStore, RowPlan, StoreError, StoreLayout, now_iso
from inpo_pipeline.method import ddim
from inpo_pipeline.data.sources import DataError, describe_source, open_source
from inpo_pipeline.distributed import worker_share
from inpo_pipeline.errors import UserError
from inpo_pipeline.method.inversion import VAE_LATENT_MODES, InversionConfig, WorkCounter, invert_shard, latent_shape
from inpo_pipeline.families import ModelError, detect_family
from inpo_pipeline.method.flow import FLOW_TIMESTEP_MODES, SIGMA_SAMPLINGS
from inpo_pipeline.models.reference import TIME_ID_MODES, ReferenceModel, load_reference
from inpo_pipeline.method.objectives import STORE_OBJECTIVE_SETS, stores_forward_inputs
from inpo_pipeline.method.plan import build_plan
from inpo_pipeline.method.recipes import DEFAULT_RECIPE, RECIPES, recipe_values
from inpo_pipeline.reporting import Reporter

COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class InvertOptions:
    """The options of `inpo invert` (see the CLI for their help).

    The inversion settings left at None take the value of `recipe` (see inpo_pipeline.method.recipes).
    """

    model: str
    data: str
    out: str
    split: str | None = None
    resolution: int | None = None
    max_pairs: int | None = None
    recipe: str = DEFAULT_RECIPE
    inversion_steps: int | None = None
    inversion_guidance: float | None = None
    timestep_mode: str | None = None
    eta: float | None = None
    inversion_prompt_dropout: float | None = None
    time_ids: str | None = None
    vae_latent: str | None = None
    flip: float | None = None
    sigma_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timesteps_per_pair: int = 1
    objectives: str = "all"
    batch_size: int = 8
    dtype: str = "float16"
    compute_dtype: str = "float32"
    seed: int = 0
    unet: str | None = None
    vae: str | None = None
    overwrite: bool = False
    rows_per_shard: int = 64
    shards_per_window: int = 16
    prompts_per_chunk: int = 256
    device: str | None = None
    columns: str | None = None  # --columns: a parquet or hub dataset's columns for the pair's roles
    worker: int | None = None  # uncoordinated workers: this one's index of `workers` (see WorkerShare)
    workers: int | None = None

    def resolve_recipe(self, process_kind: str = "diffusion") -> None:
        """Fill every inversion setting not given explicitly from the recipe (for this kind of model)."""
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}")
        for name, value in recipe_values(self.recipe, process_kind).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self, process_kind: str = "diffusion") -> None:
        """Check every option; `process_kind` ("diffusion" or "flow", the model's) decides the walks."""
        self.resolve_recipe(process_kind)
        if self.timestep_mode in ddim.RETIRED_MODES:
            raise UserError(ddim.RETIRED_MODES[self.timestep_mode])
        modes = ddim.TIMESTEP_MODES if process_kind == "diffusion" else FLOW_TIMESTEP_MODES
        target_problem = CacheStore.target_problem(self.out)
        checks = [
            ((self.worker is None) == (self.workers is None), "--worker and --workers go together"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.worker is None or self.workers is None or 0 <= self.worker < self.workers,
             f"--worker must be between 0 and --workers − 1 ({(self.workers or 1) - 1})"),
            (self.inversion_steps >= 1, "--inversion-steps must be at least 1"),
            (self.timestep_mode in modes,
             f"--timestep-mode must be one of {', '.join(modes)} for this {process_kind} model"),
            (process_kind == "diffusion" or self.eta == 0,
             "--eta (the authors' DDPM noise) has no flow counterpart; use --eta 0 on flow models"),
            (self.sigma_sampling in SIGMA_SAMPLINGS, f"--sigma-sampling must be one of {', '.join(SIGMA_SAMPLINGS)}"),
            (math.isfinite(self.logit_mean) and math.isfinite(self.logit_std) and self.logit_std > 0,
             "--logit-mean must be finite and --logit-std above 0"),
            (process_kind == "flow" or (self.sigma_sampling, self.logit_mean, self.logit_std) == ("logit-normal", 0.0, 1.0),
             "--sigma-sampling, --logit-mean and --logit-std choose a flow model's σ; this diffusion model draws "
             "t uniformly: leave them out"),
            (math.isfinite(self.inversion_guidance) and self.inversion_guidance >= 0,
             "--inversion-guidance must be a finite number >= 0 (0 unconditional, 1 conditional, above 1 CFG)"),
            (math.isfinite(self.eta) and self.eta >= 0, "--eta must be >= 0"),
            (0 <= self.inversion_prompt_dropout <= 1, "--inversion-prompt-dropout must be between 0 and 1"),
            (0 <= self.flip <= 1, "--flip must be between 0 and 1"),
            (self.time_ids in TIME_ID_MODES, f"--time-ids must be one of {', '.join(TIME_ID_MODES)}"),
            (self.vae_latent in VAE_LATENT_MODES, f"--vae-latent must be one of {', '.join(VAE_LATENT_MODES)}"),
            (self.timesteps_per_pair >= 1, "--timesteps-per-pair must be at least 1"),
            (self.objectives in STORE_OBJECTIVE_SETS,
             f"--objectives must be one of {', '.join(STORE_OBJECTIVE_SETS)}"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.dtype in ("float16", "float32", "bfloat16"), "--dtype must be float16, bfloat16 or float32"),
            (self.compute_dtype in COMPUTE_DTYPES, f"--compute-dtype must be one of {list(COMPUTE_DTYPES)}"),
            (self.max_pairs is None or self.max_pairs >= 1, "--max-pairs must be at least 1"),
            (0 <= self.seed < 2**63, "--seed must be between 0 and 2**63 - 1"),
            (self.resolution is None or self.resolution >= 8, "--resolution must be at least 8"),
            (self.rows_per_shard >= 1, "--rows-per-shard must be at least 1"),
            (self.shards_per_window >= 1, "--shards-per-window must be at least 1"),
            (self.prompts_per_chunk >= 1, "--prompts-per-chunk must be at least 1"),
            (target_problem is None, f"--out: {target_problem}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def store_settings(options: InvertOptions, reference: ReferenceModel, resolution: int, data_identity: dict[str, Any]) -> dict[str, Any]:
    """The settings a store is made with; a resume must match all of them."""
    process = reference.process(resolution, {"sigma_sampling": options.sigma_sampling,
                                             "logit_mean": options.logit_mean, "logit_std": options.logit_std})
    # recorded where it says more than the scheduler does, so ε-model stores keep the settings
    # (and resume) of stores made before flow and v-prediction support
    process_settings = {} if process.settings() == {"kind": "diffusion", "prediction": "epsilon"} \
        else {"process": process.settings()}
    guidance = reference.extra.get("guidance_embedding")
    return {
        "model": _resolved(options.model),
        "family": reference.family,
        **process_settings,
        **({} if guidance is None else {"guidance_embedding": guidance}),
        "unet": _resolved(options.unet),
        "vae": _resolved(options.vae),
        "unet_fingerprint": reference.unet_fingerprint,
        "scheduler": reference.scheduler_config,
        "resolution": resolution,
        "storage_dtype": options.dtype,
        "compute_dtype": options.compute_dtype,
        "batch_size": options.batch_size,
        "recipe": options.recipe,
        "timestep_mode": options.timestep_mode,
        "inversion_steps": options.inversion_steps,
        "inversion_guidance": options.inversion_guidance,
        "eta": options.eta,
        "inversion_prompt_dropout": options.inversion_prompt_dropout,
        "time_ids": options.time_ids,
        "vae_latent": options.vae_latent,
        "flip": options.flip,
        "timesteps_per_pair": options.timesteps_per_pair,
        "objectives": STORE_OBJECTIVE_SETS[options.objectives],
        "seed": options.seed,
        "max_pairs": options.max_pairs,
        "data": data_identity,
        "rows_per_shard": options.rows_per_shard,
        "shards_per_window": options.shards_per_window,
        "prompts_per_chunk": options.prompts_per_chunk,
    }


def _resolved(location: str | None) -> str | None:
    """A local folder as an absolute path (so `./m` and `/abs/m` are one model); hub ids as is."""
    if location is not None and os.path.exists(location):
        return os.path.abspath(location)
    return location


def _settings_difference(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(existing) | set(wanted))
    return [k for k in keys if _normalise(existing.get(k)) != _normalise(wanted.get(k))]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_invert(options: InvertOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or resume) stage one; returns the store's summary."""
    try:
        process_kind = detect_family(options.model).process_kind
    except ModelError:
        process_kind = None  # the options are still checked first; loading the model then says why
    options.validate(process_kind or "diffusion")
    state = worker_share(options.worker, options.workers)
    reporter = reporter or Reporter(enabled=state.is_main_process)
    device = torch.device(options.device) if options.device else state.device
    started = time.perf_counter()

    source = open_source(options.data, options.split, options.columns)
    reporter.line(f"data: {describe_source(source)}")
    reference = load_reference(options.model, unet_path=options.unet, vae_path=options.vae)
    resolution = options.resolution or reference.native_resolution
    reference.check_resolution(resolution)
    reporter.line(
        f"model: {options.model} ({reference.family}), {reference.spec.denoiser_label} fingerprint {reference.unet_fingerprint[:16]}…, "
        f"{resolution} px, device {device}, {state.num_processes} process(es)"
        + (f" (worker {state.worker} of {state.workers}, not waiting for the others)" if state.uncoordinated else "")
    )
    settings = store_settings(options, reference, resolution, source.identity())

    if state.is_main_process:
        _prepare_store(options, reference, resolution, settings, source, reporter,
                       creator=f"worker-{state.worker}" if state.uncoordinated else None)
    state.wait_for_everyone()
    store = CacheStore.open(options.out, mode="r+")
    if _settings_difference(store.settings, settings):
        raise UserError(f"{options.out} changed under this run (another `inpo invert` with other settings?)")

    reference.to(device, COMPUTE_DTYPES[options.compute_dtype])
    config = InversionConfig.from_settings(settings)
    try:
        _encode_prompts(store, reference, state, device, options.batch_size, reporter)
        state.wait_for_everyone()
        counter = _invert_windows(store, reference, source, config, state, device, reporter)
    except OSError as error:
        raise _disk_error(error, options.out) from error
    state.wait_for_everyone()

    summary = store.summary()
    summary["this_run"] = {
        "unet_calls": counter.unet_calls,
        "padding_share": counter.padding_share,
        "seconds_in_unet": counter.seconds_in_unet,
        "wall_seconds": time.perf_counter() - started,
        "processes": state.num_processes,
    }
    if state.is_main_process and summary["complete"]:
        store.update_provenance(completed_at=now_iso())
    return summary


def _disk_error(error: OSError, out: str) -> UserError:
    if error.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {out}; free space and run the same command again to resume")
    return UserError(f"cannot write to {out}: {error.strerror or error}; fix that and run the same command again to resume")


def _prepare_store(
    options: InvertOptions, reference: ReferenceModel, resolution: int, settings: dict[str, Any],
    source: Any, reporter: Reporter, creator: str | None = None,
) -> None:
    """Rank 0: resume a matching store, refuse a different one, or plan and create a new one."""
    out = options.out
    if CacheStore.occupied(out):
        attrs = CacheStore.read_attributes(out)
        if options.overwrite:
            CacheStore.remove(out)
            reporter.line(f"--overwrite: removed the existing store at {out}")
        elif CacheStore.interrupted_creation(out):
            reporter.line(f"{out}: its creation was interrupted (or another worker is creating it); creating it")
        elif not attrs:
            raise UserError(f"{out} exists and is not an inpo cache store; choose another --out")
        else:
            if attrs.get("schema_version") != SCHEMA_VERSION and attrs.get("state") == "ready":
                raise UserError(
                    f"{out} is a cache of schema v{attrs.get('schema_version')} made by an earlier inpo; "
                    "it cannot be resumed by this version: choose another --out, or --overwrite to re-create it"
                )
            differences = _settings_difference(attrs.get("settings", {}), settings)
            if differences:
                raise UserError(
                    f"{out} was made with other settings ({', '.join(differences)}); "
                    "use the same settings to resume, another --out, or --overwrite"
                )
            if attrs.get("state") == "ready":
                reporter.line(f"resuming the store at {out}")
                CacheStore.remove_stale_builds(out)
                return
            CacheStore.remove(out)
            reporter.line(f"{out}: its creation was interrupted; creating it again")
    try:
        CacheStore.prepare_target(out)
    except OSError as error:
        raise _disk_error(error, out) from error

    layout_rows = options.rows_per_shard * options.shards_per_window
    process = reference.process(resolution, settings.get("process"))
    with reporter.status("scanning the data (captions and labels only)"):
        plan = build_plan(
            source.scan(), seed=options.seed, timesteps_per_pair=options.timesteps_per_pair,
            num_train_timesteps=reference.num_train_timesteps, rows_per_window=layout_rows,
            max_pairs=options.max_pairs, prompt_dropout=options.inversion_prompt_dropout, flip=options.flip,
            levels=process.sample_levels,
        )
    if plan.num_rows == 0:
        raise UserError(
            f"no usable pairs in {options.data}: {plan.counts.source_rows_scanned} rows scanned, "
            f"{plan.counts.ties} ties dropped"
        )
    assert reference.text is not None
    layout = StoreLayout(
        num_rows=plan.num_rows,
        latent_shape=latent_shape(reference, resolution),
        num_prompts=len(plan.prompts),
        text_shape=reference.text.embedding_shape,
        pooled_dim=reference.text.pooled_dim,
        size_conditioning=reference.spec.size_conditioning,
        sigma=process.kind == "flow",
        storage_dtype=options.dtype,
        forward_arrays=stores_forward_inputs(settings),
        rows_per_shard=options.rows_per_shard,
        shards_per_window=options.shards_per_window,
        prompts_per_chunk=options.prompts_per_chunk,
    )
    provenance = {
        "created_at": now_iso(),
        "inpo_version": inpo_pipeline.__version__,
        "torch_version": torch.__version__,
        "filter": asdict(plan.counts),
        "data_description": describe_source(source),
        "options": asdict(options),
    }
    try:
        CacheStore.create(
            out, layout, settings, provenance,
            RowPlan(plan.timestep, plan.prompt_index, plan.source_row, plan.draw, plan.caption_index, plan.flip,
                    plan.sigma),
            plan.prompts, creator=creator,
        )
    except StoreError as error:
        raise UserError(str(error)) from error
    reporter.line(
        f"planned {plan.num_rows} rows from {plan.counts.kept_pairs} pairs "
        f"({plan.counts.ties} ties dropped, {len(plan.prompts) - 1} distinct prompts) in {layout.num_shards} shards"
    )


def _encode_prompts(
    store: CacheStore, reference: ReferenceModel, state: Any, device: torch.device, batch_size: int, reporter: Reporter
) -> None:
    """Every prompt's text embedding, once, each chunk owned by one process.

    An uncoordinated worker cannot wait for the others, and its shards need every prompt: after
    its own chunks it encodes any chunk still unfinished (split among its own processes). Two
    workers may then write one chunk; both write the same values, and each object is replaced
    whole, so the store stays as one group of processes would have written it.
    """
    assert reference.text is not None
    done = store.prompt_chunks_done()
    mine = [c for c in range(store.layout.num_prompt_chunks) if c % state.num_processes == state.process_index and not done[c]]
    if state.uncoordinated:
        group, rank = state.state.num_processes, state.state.process_index
        mine += [c for c in range(store.layout.num_prompt_chunks)
                 if not done[c] and c not in mine and c % group == rank]
    if not mine:
        return
    with reporter.progress("prompts", len(mine), unit="chunks") as advance:
        for chunk in mine:
            if store.prompt_chunk_done(chunk):
                advance(1)  # another worker finished it meanwhile
                continue
            texts = store.prompt_texts(store.layout.prompt_chunk(chunk))
            embeddings, pooled = [], []
            for start in range(0, len(texts), max(batch_size, 16)):
                text, pool = reference.text.encode(texts[start : start + max(batch_size, 16)], device)
                embeddings.append(text.cpu().numpy())
                if pool is not None:
                    pooled.append(pool.cpu().numpy())
            store.write_prompt_chunk(chunk, np.concatenate(embeddings), np.concatenate(pooled) if pooled else None)
            advance(1)


def _invert_windows(
    store: CacheStore, reference: ReferenceModel, source: Any, config: InversionConfig, state: Any,
    device: torch.device, reporter: Reporter,
) -> WorkCounter:
    """Each process owns every P-th window; a window's source rows are read once, in order."""
    layout = store.layout
    done = store.shards_done()
    windows = [
        w for w in range(layout.num_windows)
        if w % state.num_processes == state.process_index and not all(done[s] for s in layout.window_shards(w))
    ]
    todo_shards = [s for w in windows for s in layout.window_shards(w) if not done[s]]
    counter = WorkCounter()
    pairs_todo = sum(layout.shard_rows(s).stop - layout.shard_rows(s).start for s in todo_shards)
    with reporter.progress("inverting", pairs_todo, unit="rows") as advance:
        for window in windows:
            shards = [s for s in layout.window_shards(window) if not done[s]]
            plans = {s: store.read_plan(layout.shard_rows(s)) for s in shards}
            needed = np.unique(np.concatenate([plan.source_row for plan in plans.values()]))
            try:
                records = {record.source_row: record for record in source.read(needed)}
            except DataError as error:
                raise UserError(str(error)) from error
            for shard in shards:
                result, work = invert_shard(
                    reference, plans[shard], records, store.read_prompt_embeddings, config, device
                )
                store.write_shard(shard, result)
                counter.add(work)
                advance(len(plans[shard].source_row))
            del records
    return counter

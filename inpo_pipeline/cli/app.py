"""The `inpo` command line: parse, call a stage, report. No logic lives here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from inpo_pipeline.method.recipes import DEFAULT_RECIPE
from inpo_pipeline.reporting import Reporter, human_bytes

app = typer.Typer(
    name="inpo",
    help="DDIM-InPO preference alignment: `inpo invert` fills a cache once, `inpo train` learns from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and check a cache store.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(function: F) -> F:
    """Turn the project's input errors into one line on stderr and exit status 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cache_schema import StoreError
        from inpo_pipeline.data.sources import DataError
        from inpo_pipeline.errors import UserError
        from inpo_pipeline.models.reference import ModelError
        from inpo_pipeline.method.processes import ProcessError

        try:
            return function(*args, **kwargs)
        except (UserError, DataError, ModelError, StoreError, ProcessError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished shards are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_user_errors
def invert(
    model: Annotated[str, typer.Option(help="Diffusers pipeline folder or hub id (SD1.x/2.x ε or v, SDXL, SD3/SD3.5, FLUX.1).")],
    data: Annotated[str, typer.Option(help="Pick-a-Pic parquet file/folder/glob, a JSONL/CSV manifest, or hf:DATASET_ID.")],
    out: Annotated[str, typer.Option(help="The Zarr store to create or resume.")],
    split: Annotated[str | None, typer.Option(help="Split: parquet files named SPLIT-*.parquet in a folder, or the hub split.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image side in pixels (default: the model's native size).")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="Use only the first N non-tie pairs.")] = None,
    recipe: Annotated[str, typer.Option(help="authors: the released algorithm (DESIGN §1.5); inpo: the project's exact-t variant. Sets the options below unless given.")] = DEFAULT_RECIPE,
    inversion_steps: Annotated[int | None, typer.Option(help="n: DDIM steps for a walk over all T timesteps [recipe: 10].")] = None,
    inversion_guidance: Annotated[float | None, typer.Option(help="w_inv: 0 unconditional, 1 conditional, else CFG [inpo 0, authors 1].")] = None,
    timestep_mode: Annotated[str | None, typer.Option(help="authors: the released loop (departure labels, ends at the grid level above t); exact: walk exactly to t [inpo exact, authors authors]. Flow models: exact (every recipe) or shifted-grid (the sampler's shifted grid up to σ).")] = None,
    eta: Annotated[float | None, typer.Option(help="η: adds η·σ·z after each step, σ the DDPM posterior std of the jump, z seeded [inpo 0, authors 0.1].")] = None,
    inversion_prompt_dropout: Annotated[float | None, typer.Option(help="Share of rows inverted, referenced and trained with the empty prompt [inpo 0, authors 0.2].")] = None,
    time_ids: Annotated[str | None, typer.Option(help="SDXL size conditioning: original (image size, crop) or constant (R, R, 0, 0, R, R) [inpo original, authors constant].")] = None,
    vae_latent: Annotated[str | None, typer.Option(help="x0: mean of the VAE posterior, or a seeded sample [inpo mean, authors sample].")] = None,
    flip: Annotated[float | None, typer.Option(help="Probability of a seeded horizontal flip per row and image [inpo 0, authors 0.5].")] = None,
    sigma_sampling: Annotated[str, typer.Option(help="Flow models: how σ is drawn per row, before the scheduler's shift: logit-normal (SD3's training) or uniform.")] = "logit-normal",
    logit_mean: Annotated[float, typer.Option(help="Flow models: mean of the logit-normal σ sampling.")] = 0.0,
    logit_std: Annotated[float, typer.Option(help="Flow models: std of the logit-normal σ sampling.")] = 1.0,
    timesteps_per_pair: Annotated[int, typer.Option(help="K: rows (timestep draws) per pair.")] = 1,
    objectives: Annotated[str, typer.Option(help="all: also store x0 and the forward-noised reference errors, so `inpo train --objective diffusion-dpo|sft` reads this store too (DESIGN §1.7); inpo: InPO's arrays only (smaller).")] = "all",
    batch_size: Annotated[int, typer.Option(help="Images per UNet call.")] = 8,
    dtype: Annotated[str, typer.Option(help="Storage dtype of latents and targets: float16, bfloat16, float32.")] = "float16",
    compute_dtype: Annotated[str, typer.Option(help="UNet compute dtype: float32, float16, bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of timesteps, row order and inversion noise.")] = 0,
    unet: Annotated[str | None, typer.Option(help="Another UNet as the reference (e.g. an SFT UNet).")] = None,
    vae: Annotated[str | None, typer.Option(help="Another VAE (e.g. SDXL's fp16-fix).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at OUT first.")] = False,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per shard (one writer owns a shard).")] = 64,
    shards_per_window: Annotated[int, typer.Option(help="Shards per window (rows are shuffled within a window).")] = 16,
    device: Annotated[str | None, typer.Option(help="torch device (default: accelerate's choice).")] = None,
    columns: Annotated[str | None, typer.Option(help="Another dataset's columns for the pair's roles: prompt=COL,chosen=COL,rejected=COL, or caption=…,jpg_0=…,jpg_1=…,label_0=…,label_1=… (Pick-a-Pic's names are the default).")] = None,
    worker: Annotated[int | None, typer.Option(help="Uncoordinated workers (SLURM arrays, spot machines): this worker's index, 0 … --workers − 1. Each fills its own share with no process group; `inpo invert` without --worker afterwards finishes what a lost worker left.")] = None,
    workers: Annotated[int | None, typer.Option(help="How many uncoordinated workers share the store (with --worker).")] = None,
) -> None:
    """Invert a preference dataset once with the reference model and write the cache store."""
    from stages.invert import InvertOptions, run_invert

    options = InvertOptions(
        model=model, data=data, out=out, split=split, resolution=resolution, max_pairs=max_pairs,
        recipe=recipe, inversion_steps=inversion_steps, inversion_guidance=inversion_guidance,
        timestep_mode=timestep_mode, eta=eta, inversion_prompt_dropout=inversion_prompt_dropout,
        time_ids=time_ids, vae_latent=vae_latent, flip=flip, sigma_sampling=sigma_sampling, logit_mean=logit_mean,
        logit_std=logit_std, timesteps_per_pair=timesteps_per_pair,
        objectives=objectives, batch_size=batch_size, dtype=dtype, compute_dtype=compute_dtype, seed=seed, unet=unet,
        vae=vae, overwrite=overwrite, rows_per_shard=rows_per_shard,
        shards_per_window=shards_per_window, device=device, worker=worker, workers=workers, columns=columns,
    )
    from inpo_pipeline.distributed import process_state

    reporter = Reporter(enabled=process_state().is_main_process)
    summary = run_invert(options, reporter)
    run = summary["this_run"]
    reporter.table("inpo invert", [
        ("store", summary["path"]),
        ("pairs written", f"{summary['rows_valid']} rows valid of {summary['rows']} "
                          f"({summary['shards_done']}/{summary['shards']} shards done)"),
        ("ties dropped", summary["provenance"]["filter"]["ties"]),
        ("broken pairs dropped", summary["broken_pairs"]),
        ("UNet calls (this run)", f"{run['unet_calls']}, padding/idle share {run['padding_share']:.1%}"),
        ("wall time (this run)", f"{run['wall_seconds']:.1f} s ({run['seconds_in_unet']:.1f} s in UNet)"),
        ("bytes on disk", f"{human_bytes(summary['bytes_on_disk'])} "
                          f"({human_bytes(summary['bytes_per_row'])}/row)"),
    ])
    if not summary["complete"]:
        if workers is not None:
            reporter.line(f"worker {worker} of {workers}: its share is done; the store completes when every worker "
                          "has finished (run `inpo invert` without --worker to finish what a lost worker left)")
            return
        raise typer.Exit(1)


@app.command()
@_user_errors
def train(
    cache: Annotated[str, typer.Option(help="The store written by `inpo invert`.")],
    out: Annotated[str, typer.Option(help="Run folder: weights, checkpoints, metrics.jsonl, run.json.")],
    objective: Annotated[str, typer.Option(help="inpo (DESIGN §1.4), diffusion-dpo or sft (§1.7); the baselines need a store inverted with --objectives all.")] = "inpo",
    beta: Annotated[float | None, typer.Option(help="β (default: inpo 2000 for SD1.5-type and 5000 for SDXL, diffusion-dpo 5000; SD3/FLUX 100 for both (velocity errors, docs/proof.md); unused by sft).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 1e-8 × effective batch, the authors' rule).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 400,
    batch_size: Annotated[int, typer.Option(help="Pairs per device per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 16,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps of the constant schedule.")] = 200,
    prompt_dropout: Annotated[float | None, typer.Option(help="Share of rows switched to the empty prompt at training time (default: 0.2 for stores inverted unconditionally; 0 for stores inverted with their captions, whose dropout happened before inversion).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw or adafactor (default: adafactor for SDXL, adamw otherwise).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-2,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient-norm clip.")] = 1.0,
    mixed_precision: Annotated[str | None, typer.Option(help="no, fp16 or bf16 (default: the precision the store's reference errors were computed in).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory in the UNet/transformer (default: on for SDXL, SD3 and FLUX, off for SD1.x/2.x).")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 100,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (newest).")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order, prompt dropout and LoRA init.")] = 0,
    export_pipeline: Annotated[bool, typer.Option(help="Also write a full pipeline folder with the trained UNet.")] = False,
    num_workers: Annotated[int | None, typer.Option(help="Data-loader worker processes [2 with CUDA, 0 on CPU].")] = None,
    winner_preserving: Annotated[float | None, typer.Option(
        help="μ in [0, 1]: scale the loser's gradient so the winners' error does not rise (Diffusion-SDPO's "
             "safeguard; they use 0.9). Off by default, as in the authors' InPO.")] = None,
    data_order: Annotated[str, typer.Option(
        help="blocks: stored blocks of rows, shuffled within a buffer per process (reads at disk speed); "
             "rows: a full permutation of the rows every epoch (random reads).")] = "blocks",
    shuffle_buffer: Annotated[int, typer.Option(help="Rows shuffled together (--data-order blocks), over all "
                                                     "processes; each reads its share at once, so host memory "
                                                     "grows with it.")] = 1024,
    report_to: Annotated[str, typer.Option(help="Also log every step's metrics to tensorboard, wandb or all (accelerate's "
                                                "trackers, files in --out; pip install 'inpo[trackers]'), or none.")] = "none",
    validation_prompts: Annotated[str | None, typer.Option(help="Prompt set (as `inpo sample --prompts`) sampled with the "
                                                                "policy into RUN/validation/step-N.png and the trackers.")] = None,
    validation_every: Annotated[int | None, typer.Option(help="Validation grid every N steps and at the end "
                                                              "[--checkpoint-every].")] = None,
    validation_seeds: Annotated[int, typer.Option(help="Validation seeds per prompt (grid columns).")] = 2,
    validation_steps: Annotated[int, typer.Option(help="Sampling steps of the validation images.")] = 20,
) -> None:
    """Train the policy UNet from a cache store alone (DDIM-InPO loss, or a baseline)."""
    from inpo_pipeline.distributed import process_state
    from stages.train import TrainOptions, run_train

    options = TrainOptions(
        cache=cache, out=out, objective=objective, beta=beta, lr=lr, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        warmup=warmup, prompt_dropout=prompt_dropout, optimizer=optimizer, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume, seed=seed,
        export_pipeline=export_pipeline, num_workers=num_workers, winner_preserving=winner_preserving,
        data_order=data_order, shuffle_buffer=shuffle_buffer, report_to=report_to,
        validation_prompts=validation_prompts, validation_every=validation_every, validation_seeds=validation_seeds,
        validation_steps=validation_steps,
    )
    reporter = Reporter(enabled=process_state().is_main_process)
    result = run_train(options, reporter)
    final = result["final"]
    from inpo_pipeline.method.objectives import OBJECTIVES

    pairwise = OBJECTIVES[result["options"]["objective"]].pairwise
    reporter.table("inpo train", [
        ("run", result["run_dir"]),
        ("objective", result["options"]["objective"]),
        ("weights", result.get("weights", "")),
        ("pipeline", result.get("pipeline", "—")),
        ("effective batch", result["effective_batch"]),
        ("final loss", f"{final.get('loss', float('nan')):.5f}" + (" (step 0: log 2 = 0.69315)" if pairwise else "")),
        ("implicit accuracy" if pairwise else "winners fit better than the reference",
         f"{final.get('implicit_accuracy', float('nan')):.3f}"),
        ("winners' error − reference's", _excess_line(final)),
        ("time", _time_line(final)),
    ])


def _time_line(final: dict) -> str:
    first, per_step = final.get("seconds_to_first_step"), final.get("seconds_per_step")
    if first is None:
        return "—"
    return f"{first:.1f} s to the first step" + (f", then {per_step:.2f} s per step" if per_step else "")


def _excess_line(final: dict) -> str:
    excess = final.get("winner_error_excess")
    if excess is None:
        return "—"
    rose = final.get("winner_error_above_reference_since_step")
    return f"{excess:+.3g} (last step)" + (f"; above 0 since step {rose}" if rose is not None else "")


@cache_app.command("info")
@_user_errors
def cache_info(
    store: Annotated[str, typer.Argument(help="The cache store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full summary as JSON.")] = False,
) -> None:
    """A readable summary: rows, progress, provenance, size, dropped pairs."""
    from cache_schema import CacheStore
    from inpo_pipeline.method.objectives import beta_convention, served_objectives
    from inpo_pipeline.method.recipes import describe_inversion, store_warnings

    summary = CacheStore.open(store).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    settings, provenance = summary["settings"], summary["provenance"]
    reporter = Reporter(console=None)
    reporter.console.file = sys.stdout
    broken = summary["broken_source_rows"]
    reporter.table(f"inpo cache {summary['path']}", [
        ("schema", summary["schema"]),
        ("rows", f"{summary['rows']} ({summary['rows_done']} done, {summary['rows_valid']} valid)"),
        ("shards done", f"{summary['shards_done']}/{summary['shards']}"
                        + (" — complete" if summary["complete"] else " — INCOMPLETE")),
        ("prompts", f"{summary['prompts'] - 1} distinct + the empty prompt"),
        ("model", f"{settings['model']} ({settings['family']})"
                  + (f", UNet {settings['unet']}" if settings.get("unet") else "")),
        ("denoiser fingerprint", settings["unet_fingerprint"]),
        ("data", provenance.get("data_description", "")),
        ("filter", f"{provenance['filter']['source_rows_scanned']} rows scanned, "
                   f"{provenance['filter']['ties']} ties dropped, {provenance['filter']['kept_pairs']} pairs kept"),
        ("broken pairs", f"{len(broken)}" + (f" (source rows {', '.join(map(str, broken[:20]))}"
                                              f"{' …' if len(broken) > 20 else ''})" if broken else "")),
        ("inversion", describe_inversion(settings)),
        ("objectives", ", ".join(served_objectives(settings))
                       + ("" if "diffusion-dpo" in served_objectives(settings)
                          else " (re-invert with --objectives all for diffusion-dpo and sft)")),
        ("β convention", beta_convention(settings)),
        *(("warning", warning) for warning in store_warnings(settings)),
        ("resolution / dtype", f"{settings['resolution']} px, latents {tuple(summary['layout']['latent_shape'])} "
                               f"stored as {settings['storage_dtype']}"),
        ("chunking", _describe_chunking(summary["layout"])),
        ("denoiser work", f"{summary['unet_row_evaluations']:.0f} row evaluations, "
                      f"padding/idle share {1 - summary['unet_row_evaluations'] / max(summary['padded_row_evaluations'], 1):.1%}"),
        ("bytes on disk", f"{human_bytes(summary['bytes_on_disk'])}: {human_bytes(summary['bytes_per_row'])}/row "
                          f"vs {human_bytes(summary['raw_bytes_per_row'])}/row raw; text embeddings "
                          f"{human_bytes(summary['raw_bytes_per_prompt'])}/prompt raw, stored once per prompt"),
        ("created", f"{provenance.get('created_at')} by inpo {provenance.get('inpo_version')}"
                    + (f", completed {provenance['completed_at']}" if provenance.get("completed_at") else "")),
    ])


def _describe_chunking(layout: dict) -> str:
    rows_per_chunk = layout.get("rows_per_chunk", 1)
    rows = (f"{layout['rows_per_shard']} rows per shard object, one chunk per shard" if rows_per_chunk == layout["rows_per_shard"]
            else f"{layout['rows_per_shard']} rows per shard object in chunks of {rows_per_chunk} (an earlier layout: "
                 "training reads it more slowly)")
    prompts = "one prompt per object" if not layout.get("prompt_shards", True) else \
        f"{layout['prompts_per_chunk']} prompts per shard object"
    return f"{rows}; {prompts}"


@cache_app.command("verify")
@_user_errors
def cache_verify(
    store: Annotated[str, typer.Argument(help="The cache store.")],
    recompute: Annotated[int, typer.Option(help="Also redo K random rows from the source images and compare.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed choosing the rows to recompute.")] = 0,
    device: Annotated[str | None, typer.Option(help="torch device for --recompute.")] = None,
    repair: Annotated[bool, typer.Option(help="Mark shards with lost objects unfinished, for `inpo invert` to redo.")] = False,
) -> None:
    """Check completeness, shapes, NaN/Inf and every checksum; optionally recompute rows."""
    from stages.verify import verify_store

    reporter = Reporter()
    problems = verify_store(store, recompute=recompute, seed=seed, device=device, reporter=reporter, repair=repair)
    for problem in problems:
        typer.echo(f"FAIL {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {store}")


@app.command()
@_user_errors
def example(
    out: Annotated[Path, typer.Option(help="Folder for the example's model, data and store.")] = Path("example-output"),
    pairs: Annotated[int, typer.Option(help="Pairs in the generated data set.")] = 32,
    family: Annotated[str, typer.Option(help="Tiny model: sd15, sdxl, sd3 or flux.")] = "sd15",
    steps: Annotated[int, typer.Option(help="Training steps on the example store.")] = 20,
) -> None:
    """Run the whole pipeline (invert, then train) on a built-in tiny model and generated data."""
    from stages.example import run_example

    run_example(out, pairs=pairs, family=family, steps=steps, reporter=Reporter())


@app.command()
@_user_errors
def export(
    run: Annotated[str, typer.Argument(help="The --out folder of a finished `inpo train` run.")],
    out: Annotated[str, typer.Option(help="Where to write: a folder (diffusers) or a .safetensors file (kohya, comfyui, single-file).")],
    format: Annotated[str, typer.Option(help="diffusers: the LoRA folder, or a full run's pipeline folder; kohya / "
                                             "comfyui: a LoRA as one kohya-layout file (A1111, ComfyUI, SD.Next); "
                                             "single-file: the whole SD1.x model (LoRA fused) as one original-layout "
                                             "checkpoint.")] = "diffusers",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Write a finished run's weights in the format another tool loads."""
    from stages.export import ExportOptions, run_export

    result = run_export(ExportOptions(run=run, out=out, format=format, overwrite=overwrite))
    Reporter().table("inpo export", [(key, str(value)) for key, value in result.items()])


def _register_commands() -> None:
    """Commands defined next to their stages' option sets."""
    from inpo_pipeline.cli.demo import register as register_demo
    from inpo_pipeline.cli.rounds import register as register_rounds
    from inpo_pipeline.cli.sampling import register as register_sampling

    register_sampling(app)
    register_demo(app)
    register_rounds(app)


def _quiet_libraries() -> None:
    """Library progress bars and advice would drown the tool's own report."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


@app.callback()
def _setup() -> None:
    # --help of a sub-command runs this callback first: it must not pay for importing torch
    if not any(argument in ("--help", "-h") for argument in sys.argv[1:]):
        _quiet_libraries()


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`inpo train`: learn the policy UNet from a cache store alone.

Read (micro-batches from the store), compute (policy forward/backward, the InPO loss), write
(checkpoints, metrics, the trained weights), report. No VAE, reference UNet or text encoder is
loaded: the store holds x_t, τ_t, e_ref and the prompt embeddings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import inpo_pipeline
from cache_schema import CacheStore, now_iso
from inpo_pipeline.data.batches import (
    DATA_ORDERS,
    DEFAULT_SHUFFLE_BUFFER,
    BatchSchedule,
    MicroBatches,
    micro_batch_loader,
)
from inpo_pipeline.models.checkpoints import load_training_state, save_training_state
from inpo_pipeline.errors import UserError
from inpo_pipeline.families import family_named
from inpo_pipeline.method.processes import process_from_settings
from inpo_pipeline.method.objectives import (
    DEFAULT_OBJECTIVE, INVERSION_INPUTS, OBJECTIVES, beta_convention, check_served, default_beta, get_objective,
)
from inpo_pipeline.models.policy import (
    export_pipeline, load_policy, policy_errors, save_policy, trainable_parameters, winner_preserving_policy_errors,
)
from inpo_pipeline.method.recipes import store_warnings, train_prompt_dropout_default
from inpo_pipeline.reporting import Reporter

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LR_PER_SAMPLE = 1e-8  # the authors' rule: lr = 1e-8 × effective batch (1.024e-5 at 1024)
PRECISION_OF_COMPUTE_DTYPE = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def store_precision(settings: dict[str, Any]) -> str:
    """The mixed precision under which the store's e_ref was computed (so step 0 gives log 2)."""
    return PRECISION_OF_COMPUTE_DTYPE.get(settings.get("compute_dtype", "float32"), "no")


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


@dataclass
class TrainOptions:
    """The options of `inpo train` (see the CLI for their help). None = the family's default."""

    cache: str
    out: str
    objective: str = DEFAULT_OBJECTIVE
    beta: float | None = None
    lr: float | None = None
    steps: int = 400
    batch_size: int = 8
    grad_accum: int = 16
    warmup: int = 200
    prompt_dropout: float | None = None
    optimizer: str | None = None
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    lora_rank: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    export_pipeline: bool = False
    num_workers: int | None = None  # None: 2 with CUDA, 0 on CPU (measured: docs/benchmarks.md)
    winner_preserving: float | None = None  # μ of the winner-preserving safeguard; None: off
    data_order: str = "blocks"  # "blocks": stored blocks shuffled in a buffer; "rows": a full permutation
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # rows mixed together over all processes (blocks order)
    report_to: str = "none"  # accelerate trackers: none, tensorboard, wandb or all
    validation_prompts: str | None = None  # a prompt set sampled with the policy (inpo_pipeline.evaluation.validation)
    validation_every: int | None = None  # None: checkpoint_every
    validation_seeds: int = 2
    validation_steps: int = 20

    def validate(self) -> None:
        checks = [
            (self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}"),
            (self.beta is None or (math.isfinite(self.beta) and self.beta > 0), "--beta must be a finite number > 0"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "--lr must be a finite number > 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be a finite number >= 0"),
            (not Path(self.out).exists() or Path(self.out).is_dir(),
             f"--out {self.out} is a file; give a folder for the run (it is created if missing)"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.prompt_dropout is None or 0 <= self.prompt_dropout <= 1, "--prompt-dropout must be between 0 and 1"),
            (self.optimizer in (None, "adamw", "adafactor"), "--optimizer must be adamw or adafactor"),
            (self.mixed_precision in (None, "no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
            (self.lora_rank >= 0, "--lora-rank must be >= 0"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.num_workers is None or self.num_workers >= 0, "--num-workers must be >= 0"),
            (self.data_order in DATA_ORDERS, f"--data-order must be one of {', '.join(DATA_ORDERS)}"),
            (self.shuffle_buffer >= 1, "--shuffle-buffer must be at least 1"),
            (self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)}"),
            (self.validation_every is None or self.validation_every >= 1, "--validation-every must be at least 1"),
            (self.validation_seeds >= 1, "--validation-seeds must be at least 1"),
            (self.validation_steps >= 1, "--validation-steps must be at least 1"),
            (self.validation_every is None or self.validation_prompts is not None,
             "--validation-every needs --validation-prompts (the prompt set to sample)"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "--max-grad-norm must be a finite number > 0"),
            (0 <= self.seed < 2**63, "--seed must be between 0 and 2**63 - 1"),
            (self.winner_preserving is None or 0 <= self.winner_preserving <= 1,
             "--winner-preserving must be between 0 and 1 (Diffusion-SDPO uses 0.9)"),
            (self.winner_preserving is None or self.objective not in OBJECTIVES or OBJECTIVES[self.objective].pairwise,
             f"--winner-preserving needs a pairwise objective; {self.objective} never forwards the loser"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.validation_prompts is not None:
            from inpo_pipeline.data.prompts import read_prompts

            # before any run folder exists: a glob, a folder or a file, refused with read_prompts' own message
            try:
                read_prompts(self.validation_prompts)
            except UserError as error:
                raise UserError(f"--validation-prompts: {error}") from error

    def resolved(self, settings: dict[str, Any], effective_batch: int) -> TrainOptions:
        """The options with the store's defaults filled in (the authors' training recipe, DESIGN §1.5)."""
        family = settings["family"]
        values = asdict(self)
        if self.prompt_dropout is None:
            values["prompt_dropout"] = train_prompt_dropout_default(settings)
        if self.mixed_precision is None:
            values["mixed_precision"] = store_precision(settings)
        values["beta"] = self.beta if self.beta is not None else default_beta(get_objective(self.objective), family)
        values["lr"] = self.lr if self.lr is not None else LR_PER_SAMPLE * effective_batch
        spec = family_named(family)
        values["optimizer"] = self.optimizer or spec.default_optimizer
        if self.gradient_checkpointing is None:
            values["gradient_checkpointing"] = spec.default_gradient_checkpointing
        if self.num_workers is None:
            # on a CPU the step itself needs the cores: spawned workers only delay the first step
            values["num_workers"] = 2 if torch.cuda.is_available() else 0
        return TrainOptions(**values)


# ------------------------------------------------------------------------------ the step
def _optimizer(options: TrainOptions, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if options.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=options.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=options.weight_decay)
    return torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay)


def _constant_with_warmup(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr × min(1, (step+1)/warmup): the first update already moves (unlike a 0 at step 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)


# ------------------------------------------------------------------------------ run folder
def _newest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    if not folder.exists():
        return None
    complete = [p for p in folder.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


# what a run recorded before these options existed trained with (its resume keeps that order)
RUN_OPTIONS_BEFORE_FIELDS = {"data_order": "rows", "shuffle_buffer": DEFAULT_SHUFFLE_BUFFER}


def _comparable(options: TrainOptions) -> dict[str, Any]:
    """Options that must match for a resume (not: resume, export, workers, checkpoint cadence)."""
    values = asdict(options)
    for name in ("resume", "export_pipeline", "num_workers", "checkpoint_every", "keep_checkpoints", "steps", "report_to",
                 "validation_prompts", "validation_every", "validation_seeds", "validation_steps"):
        values.pop(name)
    return values


def _prepare_run_dir(options: TrainOptions, is_main: bool, identity: dict[str, Any]) -> Path | None:
    """Check the run folder; returns the checkpoint to resume from, if any.

    `identity` is what else a resume must share with the original run: the process count, the
    effective batch and the store (its settings and creation time).
    """
    run_dir = Path(options.out)
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not options.resume:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if options.resume and occupied:
        previous = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else None
        if previous is not None:
            before = {**RUN_OPTIONS_BEFORE_FIELDS, **previous["options"]}
            differences = [k for k, v in _comparable(options).items() if before.get(k) != v]
            differences += [k for k, v in identity.items() if previous.get("identity", {}).get(k) != v]
            if differences:
                raise UserError(f"--resume with other settings than the run in {run_dir} ({', '.join(differences)}); "
                                "resume with the same store, processes and options, or choose another --out")
        checkpoint = _newest_checkpoint(run_dir)
        if checkpoint is not None:
            reached = json.loads((checkpoint / STATE_FILE).read_text())["step"]
            if reached > options.steps:
                raise UserError(f"--steps {options.steps} is below the checkpoint's step {reached}; "
                                f"give --steps {reached} or more")
        return checkpoint
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return None


# ------------------------------------------------------------------------------ the run
def run_train(options: TrainOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train (or resume) a policy from a store; returns the run's summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.perf_counter()
    options.validate()
    store = CacheStore.open(options.cache)
    if not store.is_complete():
        summary = store.summary()
        raise UserError(
            f"{options.cache} is incomplete ({summary['shards_done']} of {summary['shards']} shards); "
            "finish it by running its `inpo invert` command again"
        )
    settings = store.settings
    family = settings["family"]
    objective = get_objective(options.objective)
    check_served(objective, settings, options.cache)

    mixed_precision = options.mixed_precision or store_precision(settings)
    _forget_other_precision(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=options.grad_accum,
        cpu=not torch.cuda.is_available(), log_with=_trackers(options.report_to), project_dir=options.out,
    )
    reporter = reporter or Reporter(enabled=accelerator.is_main_process)
    effective_batch = options.batch_size * accelerator.num_processes * options.grad_accum
    prompt_dropout_given = options.prompt_dropout is not None
    options = options.resolved(settings, effective_batch)
    rows = store.valid_rows()
    schedule = BatchSchedule(rows, options.batch_size, accelerator.num_processes, accelerator.process_index,
                             options.seed, options.prompt_dropout, order=options.data_order,
                             block_rows=store.layout.rows_per_shard, shuffle_buffer=options.shuffle_buffer)
    if schedule.micro_batches_per_epoch == 0:
        raise UserError(f"{options.cache} has {len(rows)} usable rows, fewer than one global batch "
                        f"({options.batch_size} × {accelerator.num_processes} processes); lower --batch-size")

    identity = {"num_processes": accelerator.num_processes, "effective_batch": effective_batch,
                "store_settings": json.loads(json.dumps(settings, default=str)),
                "store_created_at": store.provenance.get("created_at")}
    checkpoint = _prepare_run_dir(options, accelerator.is_main_process, identity)
    accelerator.wait_for_everyone()
    run_dir = Path(options.out)
    reporter.line(
        f"store {options.cache}: {len(rows)} rows, {family}; effective batch {effective_batch} = "
        f"{options.batch_size} per device × {accelerator.num_processes} process(es) × {options.grad_accum} accumulation"
    )
    beta = f"β {options.beta:g}" if objective.uses_beta else "β unused"
    reporter.line(
        f"objective {objective.name} ({objective.description}), "
        f"{beta}, lr {options.lr:.3g} ({options.optimizer}, warm-up {options.warmup}), "
        f"prompt dropout {options.prompt_dropout}, {options.steps} steps, "
        + (f"LoRA rank {options.lora_rank}" if options.lora_rank else "full fine-tuning")
        + f", mixed precision {options.mixed_precision}"
    )

    for warning in store_warnings(settings):
        reporter.line(f"warning: {warning}")
    inverted_with_captions = float(settings.get("inversion_guidance", 0.0)) != 0.0
    if prompt_dropout_given and options.prompt_dropout > 0 and inverted_with_captions and \
            objective.inputs == INVERSION_INPUTS:
        reporter.line(
            f"warning: --prompt-dropout {options.prompt_dropout} on a store inverted with its captions "
            f"(w_inv {settings['inversion_guidance']}): the dropped rows train on \"\" with x_t and τ that were "
            "inverted with their caption, as asked; the authors drop before inversion (--inversion-prompt-dropout)"
        )
    expected_precision = store_precision(settings)
    if expected_precision != options.mixed_precision:
        reporter.line(
            f"warning: the store's reference errors were computed with compute dtype {settings['compute_dtype']} "
            f"but this run uses --mixed-precision {options.mixed_precision}: the step-0 loss will differ from "
            f"log 2 by rounding noise × β; use --mixed-precision {expected_precision} for exact agreement"
        )

    set_seed(options.seed)
    policy = load_policy(settings, options.lora_rank)
    if options.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    optimizer = _optimizer(options, trainable_parameters(policy))
    scheduler = _constant_with_warmup(optimizer, options.warmup)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    start_step = 0
    if checkpoint is not None:
        load_training_state(checkpoint, accelerator.unwrap_model(policy), optimizer, scheduler, accelerator.scaler,
                            accelerator.process_index)
        start_step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        reporter.line(f"resuming from {checkpoint} (step {start_step})")
    if accelerator.is_main_process:
        _write_run_file(run_dir, options, effective_batch, store, status="running", identity=identity)
        if start_step == 0:
            (run_dir / METRICS_FILE).write_text("")
        else:
            _truncate_metrics(run_dir / METRICS_FILE, start_step)
    if accelerator.log_with:
        # wandb keeps its files in the run folder; its mode (online/offline) is wandb's own setting
        accelerator.init_trackers("inpo", config={k: v for k, v in asdict(options).items() if v is not None},
                                  init_kwargs={"wandb": {"dir": str(run_dir), "name": run_dir.name}})

    validator = None
    if options.validation_prompts and accelerator.is_main_process:
        from inpo_pipeline.evaluation.validation import Validator

        validator = Validator(settings, options.validation_prompts, options.validation_seeds, options.validation_steps)
    remaining = options.steps - start_step
    dataset = MicroBatches(options.cache, schedule, start_step * options.grad_accum, remaining * options.grad_accum,
                           objective.name, process_from_settings(settings))
    loader = micro_batch_loader(dataset, options.num_workers if remaining > 0 else 0)
    metrics = _train_loop(accelerator, policy, optimizer, scheduler, loader, options, start_step, run_dir,
                          schedule, reporter, started, validator)

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {"run_dir": str(run_dir), "effective_batch": effective_batch,
                              "final": metrics, "options": asdict(options)}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy)
        result["weights"] = str(save_policy(unwrapped, run_dir, family, options.lora_rank))
        if options.export_pipeline:
            result["pipeline"] = str(export_pipeline(settings["model"], run_dir, family, options.lora_rank,
                                                     settings.get("unet"), settings.get("vae")))
        _write_run_file(run_dir, options, effective_batch, store, status="finished", final=metrics,
                        identity=identity)
    accelerator.end_training()
    return result


def _forget_other_precision(mixed_precision: str) -> None:
    """Let one process run several trainings with different precisions (sweeps, the demo).

    accelerate keeps one AcceleratorState per process and refuses a second precision; the
    process group itself (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()


REPORT_TO = ("none", "tensorboard", "wandb", "all")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _trackers(report_to: str) -> list[str] | None:
    """accelerate's trackers for --report-to (checked by `validate`); each must be installed
    (`pip install 'inpo[trackers]'`)."""
    wanted = list(TRACKER_PACKAGES) if report_to == "all" else [] if report_to == "none" else [report_to]
    for tracker in wanted:
        try:
            __import__(TRACKER_PACKAGES[tracker])
        except ImportError:
            raise UserError(f"--report-to {report_to} needs {TRACKER_PACKAGES[tracker]}: "
                            "pip install 'inpo[trackers]' (or leave --report-to out)") from None
    return wanted or None


def _write_run_file(run_dir: Path, options: TrainOptions, effective_batch: int, store: CacheStore,
                    status: str, identity: dict[str, Any], final: dict[str, Any] | None = None) -> None:
    record = {
        "status": status, "updated_at": now_iso(), "inpo_version": inpo_pipeline.__version__,
        "options": asdict(options), "effective_batch": effective_batch, "identity": identity,
        "beta_convention": beta_convention(store.settings),
        "store": {"path": CacheStore.identity(options.cache), "settings": store.settings,
                  "provenance": store.provenance},
        "final_metrics": final,
    }
    temporary = run_dir / f".{RUN_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2, default=str))
    os.replace(temporary, run_dir / RUN_FILE)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps ≤ `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _save_checkpoint(accelerator: Any, run_dir: Path, step: int, keep: int, metrics: dict[str, Any],
                     policy: Any, optimizer: Any, scheduler: Any) -> None:
    """The training state (`checkpoints.py`, no pickle) into a temporary folder, renamed into place
    once complete; keep the last K."""
    folder = run_dir / CHECKPOINTS
    temporary = folder / f".tmp-step-{step:07d}"
    final = folder / f"step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_training_state(temporary, accelerator.unwrap_model(policy), optimizer, scheduler, accelerator.scaler,
                        accelerator.process_index, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps({"step": step, "metrics": metrics}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        complete = sorted((p for p in folder.iterdir() if p.name.startswith("step-")), key=lambda p: p.name)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _train_loop(accelerator: Any, policy: torch.nn.Module, optimizer: Any, scheduler: Any, loader: Any,
                options: TrainOptions, start_step: int, run_dir: Path, schedule: BatchSchedule,
                reporter: Reporter, started: float, validator: Any = None) -> dict[str, Any]:
    device = accelerator.device
    objective = OBJECTIVES[options.objective]
    step = start_step
    sums = _StepSums()
    monitor = WinnerMonitor(reporter, options.winner_preserving is not None)
    metrics: dict[str, Any] = {}
    step_started = time.perf_counter()
    first_step_done: float | None = None
    with reporter.training_progress(options.steps, start_step) as update:
        for batch in loader:
            with accelerator.accumulate(policy):
                scale = None
                with accelerator.autocast():
                    if options.winner_preserving is None:
                        chosen, rejected = policy_errors(policy, batch, device)
                    else:
                        chosen, rejected, scale = winner_preserving_policy_errors(
                            policy, batch, device, options.winner_preserving)
                rejected_reference = batch.get("reference_error_rejected")
                result = objective.loss(chosen, rejected, batch["reference_error_chosen"].to(device),
                                        None if rejected_reference is None else rejected_reference.to(device),
                                        options.beta)
                loss = result.loss.mean()
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "min")
                if finite.item() < 1:
                    raise TrainingDiverged(
                        f"the loss became non-finite at step {step + 1}; the last good checkpoint in "
                        f"{run_dir / CHECKPOINTS} is kept — lower --lr or --beta, or use --mixed-precision bf16"
                    )
                accelerator.backward(loss)
                sums.add(result, len(batch["rows"]), scale)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable_parameters(policy), options.max_grad_norm)
                    # fp16's loss scaler skips such steps by design; anywhere else they would
                    # write NaN into the weights (and the next checkpoint)
                    if options.mixed_precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)).all():
                        raise TrainingDiverged(
                            f"the gradient became non-finite at step {step + 1}; the last good checkpoint in "
                            f"{run_dir / CHECKPOINTS} is kept — lower --lr or --beta"
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            step += 1
            elapsed = time.perf_counter() - step_started
            step_started = time.perf_counter()
            if first_step_done is None:
                first_step_done = step_started
            metrics = sums.gather(accelerator)
            metrics.update(step=step, objective=objective.name, lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
                           pairs_per_second=metrics["pairs"] / elapsed if elapsed > 0 else None,
                           epoch=(step * options.grad_accum - 1) // schedule.micro_batches_per_epoch)
            sums = _StepSums()
            monitor.update(step, metrics)
            if accelerator.is_main_process:
                with (run_dir / METRICS_FILE).open("a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
            if accelerator.log_with:
                accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            update(metrics)
            if step % options.checkpoint_every == 0 or step == options.steps:
                _save_checkpoint(accelerator, run_dir, step, options.keep_checkpoints, metrics, policy, optimizer,
                                 scheduler)
            every = options.validation_every or options.checkpoint_every
            if validator is not None and (step % every == 0 or step == options.steps):
                path = validator.write(accelerator.unwrap_model(policy), device, run_dir, step, accelerator.trackers)
                reporter.line(f"step {step}: validation grid {path}")
    metrics["winner_error_above_reference_since_step"] = monitor.rose_at
    # start-up (imports, loading, the first step with its loader start) apart from the steady steps
    if first_step_done is not None:
        metrics["seconds_to_first_step"] = first_step_done - started
        later = step - start_step - 1
        metrics["seconds_per_step"] = (time.perf_counter() - first_step_done) / later if later > 0 else None
    return metrics


class WinnerMonitor:
    """Warns once when the policy fits the winners worse than the reference did.

    A DPO-type loss falls as the loser's error rises faster than the winner's, so it can fall while
    both rise and the winners are learnt worse than before (the failure Diffusion-SDPO names). The
    signal is the mean of e_θ^w − e_ref^w over the last WINDOW steps above 0."""

    WINDOW = 10

    def __init__(self, reporter: Reporter, safeguarded: bool) -> None:
        self.reporter, self.safeguarded = reporter, safeguarded
        self.recent: list[float] = []
        self.rose_at: int | None = None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        excess = metrics.get("winner_error_excess")
        if excess is None:
            return
        self.recent = (self.recent + [excess])[-self.WINDOW:]
        if self.rose_at is None and len(self.recent) == self.WINDOW and sum(self.recent) > 0:
            self.rose_at = step
            remedy = "" if self.safeguarded else "; --winner-preserving 0.9 keeps it from rising"
            self.reporter.line(
                f"warning: step {step}: the winners' error is above the reference's (mean e_θ^w − e_ref^w "
                f"{sum(self.recent) / self.WINDOW:+.3g} over {self.WINDOW} steps): the loss is falling partly by "
                f"fitting the losers worse; in the shapes world this also happened in runs that aligned, so judge "
                f"by samples (docs/proof.md){remedy}"
            )


class _StepSums:
    """Loss, accuracy and margin summed over one optimizer step's micro-batches."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None

    def add(self, result: Any, pairs: int, loser_gradient_scale: torch.Tensor | None = None) -> None:
        # summed where the loss lives: no host round trip per micro-batch, one per optimizer step
        argument = result.argument.detach().double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=argument.device)

        def total(values: torch.Tensor | None) -> torch.Tensor:
            return nan if values is None else values.detach().double().sum()

        values = torch.stack([
            result.loss.detach().double().sum(),
            (argument > 0).double().sum(),
            argument.sum(),
            result.policy_error_chosen.detach().double().sum(),
            total(result.policy_error_rejected),
            total(result.winner_error_excess),
            total(result.loser_error_excess),
            nan if loser_gradient_scale is None else loser_gradient_scale.detach().double().to(argument.device) * pairs,
            torch.tensor(float(pairs), dtype=torch.float64, device=argument.device),
        ])
        self.values = values if self.values is None else self.values + values

    def gather(self, accelerator: Any) -> dict[str, Any]:
        assert self.values is not None
        loss, accurate, margin, chosen, rejected, winner_excess, loser_excess, scale, pairs = (
            accelerator.reduce(self.values.to(accelerator.device), "sum").cpu().tolist()
        )
        count = max(pairs, 1.0)

        def mean(value: float) -> float | None:
            # NaN marks a quantity the objective does not have (SFT's loser; λ when off): null
            return None if math.isnan(value) else value / count

        return {
            "loss": loss / count,
            "implicit_accuracy": accurate / count,
            "margin": margin / count,
            "policy_error_chosen": chosen / count,
            "policy_error_rejected": mean(rejected),
            "winner_error_excess": mean(winner_excess),
            "loser_error_excess": mean(loser_excess),
            "loser_gradient_scale": mean(scale),
            "pairs": int(pairs),
        }

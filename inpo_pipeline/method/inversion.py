"""Stage one's computation for one shard: decode, encode, invert, target, reference errors.

Batch composition is a function of the shard's content only (rows sorted by step count, then
by position), never of the process count or of what was finished before a restart, so every
shard comes out bit-identical however the work was split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_schema import RowPlan, ShardResult, round_to_storage
from inpo_pipeline.method import ddim
from inpo_pipeline.data.sources import PairRecord, PreparedImage, prepare_image
from inpo_pipeline.models.reference import ReferenceModel, constant_time_ids, sdxl_time_ids
from inpo_pipeline.method.objectives import stores_forward_inputs
from inpo_pipeline.method.plan import forward_noise, latent_sample_seed, noise_seed

PromptLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
DECODE_THREADS = min(8, os.cpu_count() or 1)


VAE_LATENT_MODES = ("mean", "sample")


@dataclass(frozen=True)
class InversionConfig:
    """Every setting that changes what a row holds (flips and prompt drops are in the plan)."""

    resolution: int
    storage_dtype: str = "float16"
    mode: str = "exact"
    num_steps: int = 10
    guidance: float = 0.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 8
    time_ids: str = "original"
    vae_latent: str = "mean"
    forward: bool = False  # also the baselines' x0 and forward-noised e_ref (DESIGN §1.7)
    process: dict[str, Any] = field(default_factory=dict)  # the store's recorded process (flow: σ sampling)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], batch_size: int | None = None) -> InversionConfig:
        """The configuration a store was made with (settings of schema v1 get v1's fixed choices)."""
        return cls(
            resolution=settings["resolution"], storage_dtype=settings["storage_dtype"],
            mode=settings["timestep_mode"], num_steps=settings["inversion_steps"],
            guidance=settings["inversion_guidance"], eta=settings["eta"], seed=settings["seed"],
            batch_size=batch_size or settings["batch_size"],
            time_ids=settings.get("time_ids", "original"), vae_latent=settings.get("vae_latent", "mean"),
            forward=stores_forward_inputs(settings), process=dict(settings.get("process", {})),
        )

    @property
    def passes_per_step(self) -> int:
        """UNet evaluations per image per step: 1 for w = 0 or 1, 2 for CFG."""
        return 1 if self.guidance in (0.0, 1.0) else 2


@dataclass
class WorkCounter:
    """UNet work done, for the padding/waste report."""

    unet_calls: int = 0
    row_evaluations: int = 0  # rows that needed the call
    slot_evaluations: int = 0  # batch capacity offered by the calls
    seconds_in_unet: float = 0.0
    seconds_total: float = 0.0

    def add(self, other: WorkCounter) -> None:
        for name in ("unet_calls", "row_evaluations", "slot_evaluations", "seconds_in_unet", "seconds_total"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def padding_share(self) -> float:
        return 1.0 - self.row_evaluations / self.slot_evaluations if self.slot_evaluations else 0.0


@dataclass
class _Job:
    """One image of one row on its way up the inversion trajectory."""

    row: int
    image: int  # 0 = chosen, 1 = rejected
    steps: list[Any]  # ddim.InversionStep or flow.FlowStep: the process's walk
    latent: torch.Tensor = field(repr=False)


Conditioning = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""(text embedding, pooled embedding or None, SDXL time ids or None) of a batch of images."""


def _joined(parts: list[Conditioning]) -> Conditioning:
    """Several conditionings stacked along the batch (None stays None)."""
    return tuple(None if values[0] is None else torch.cat(values) for values in zip(*parts))  # type: ignore[return-value]


def _timed_unet(reference: ReferenceModel, counter: WorkCounter, capacity: int, latents: torch.Tensor,
                labels: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    start = time.perf_counter()
    noise = reference.denoise(latents, labels, *conditioning)
    if noise.is_cuda:
        torch.cuda.synchronize(noise.device)
    counter.seconds_in_unet += time.perf_counter() - start
    counter.unet_calls += 1
    counter.row_evaluations += latents.shape[0]
    counter.slot_evaluations += capacity
    return noise


def invert_shard(
    reference: ReferenceModel,
    plan: RowPlan,
    records: Mapping[int, PairRecord],
    prompt_lookup: PromptLookup,
    config: InversionConfig,
    device: torch.device,
) -> tuple[ShardResult, WorkCounter]:
    """All of one shard's rows: x_t, τ_t and e_ref for chosen and rejected (DESIGN §1.2–§1.4)."""
    started = time.perf_counter()
    counter = WorkCounter()
    num_rows = len(plan.source_row)
    c, h, w = reference.latent_shape(config.resolution)
    process = reference.process(config.resolution, config.process)
    sized = reference.spec.size_conditioning

    prepared = _prepare_pairs(plan, records, config.resolution)
    valid = np.array([prepared[int(s)] is not None for s in plan.source_row], dtype=bool)
    clean = _encode_rows(reference, plan, prepared, valid, config, device)

    time_ids = np.zeros((num_rows, 2, 6), dtype=np.float32)
    for row in np.flatnonzero(valid):
        pair = prepared[int(plan.source_row[row])]
        assert pair is not None
        for image in (0, 1):
            time_ids[row, image] = (
                constant_time_ids(config.resolution) if config.time_ids == "constant"
                else sdxl_time_ids(pair[image].original_size, pair[image].crop_top_left, config.resolution)
            )

    prompt_indices = np.concatenate([[0], plan.prompt_index]).astype(np.int64)
    text, pooled = prompt_lookup(prompt_indices)
    empty_text, row_text = torch.from_numpy(text[:1]), torch.from_numpy(text[1:])
    empty_pooled = torch.from_numpy(pooled[:1]) if pooled is not None else None
    row_pooled = torch.from_numpy(pooled[1:]) if pooled is not None else None

    def conditioning(rows: list[int], images: list[int], use_caption: bool) -> Conditioning:
        index = torch.tensor(rows)
        embedding = row_text[index] if use_caption else empty_text.expand(len(rows), -1, -1)
        pooled_rows = None
        if row_pooled is not None and empty_pooled is not None:
            pooled_rows = row_pooled[index] if use_caption else empty_pooled.expand(len(rows), -1)
        ids = torch.from_numpy(time_ids[rows, images]) if sized else None
        return embedding, pooled_rows, ids

    sigma = plan.sigma
    jobs = [
        _Job(int(row), image,
             process.walk(int(plan.timestep[row]), None if sigma is None else float(sigma[row]), config.mode,
                          config.num_steps),
             clean[(int(row), image)])
        for row in np.flatnonzero(valid)
        for image in (0, 1)
    ]
    jobs.sort(key=lambda job: (-len(job.steps), job.row, job.image))
    steps_taken = np.zeros(num_rows, dtype=np.int16)
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start : start + config.batch_size]
        _invert_batch(reference, process, batch, conditioning, config, plan, counter)
    stored_latent = torch.zeros((num_rows, 2, c, h, w))
    stored_target = torch.zeros((num_rows, 2, c, h, w))
    for job in jobs:
        steps_taken[job.row] = len(job.steps)
        x0 = clean[(job.row, job.image)].unsqueeze(0).cpu()
        # τ from the x_t as stored, so that the stored pair satisfies x_t = √ā·x0 + √(1−ā)·τ
        # up to τ's own rounding (1/√(1−ā) would amplify x_t's rounding ~34× at t = 0)
        latent = torch.from_numpy(round_to_storage(job.latent.cpu().numpy(), config.storage_dtype))
        # in float64: at small t, x_t − √ā·x0 cancels most digits and float32 would leave ~1e-5
        level = None if sigma is None else sigma[job.row : job.row + 1]
        target = process.target(latent.unsqueeze(0), x0, plan.timestep[job.row : job.row + 1], level)[0].float()
        stored_latent[job.row, job.image] = latent
        stored_target[job.row, job.image] = torch.from_numpy(round_to_storage(target.numpy(), config.storage_dtype))

    # e_ref is computed from exactly what will be read back (DESIGN §2, cache properties)
    errors = _reference_errors(
        reference, process, stored_latent, stored_target, valid, plan, conditioning, config.batch_size, counter
    )

    forward: dict[str, np.ndarray] = {}
    if config.forward:
        forward = _forward_inputs(reference, process, clean, valid, plan, conditioning, config, (c, h, w), counter)

    counter.seconds_total = time.perf_counter() - started
    result = ShardResult(
        **forward,
        latent_chosen=stored_latent[:, 0].numpy(),
        latent_rejected=stored_latent[:, 1].numpy(),
        target_chosen=stored_target[:, 0].numpy(),
        target_rejected=stored_target[:, 1].numpy(),
        reference_error_chosen=errors[:, 0],
        reference_error_rejected=errors[:, 1],
        valid=valid.astype(np.uint8),
        inversion_steps=steps_taken,
        time_ids_chosen=time_ids[:, 0] if sized else None,
        time_ids_rejected=time_ids[:, 1] if sized else None,
        stats=np.array([counter.row_evaluations, counter.slot_evaluations, counter.seconds_total]),
    )
    return result, counter


def _forward_inputs(
    reference: ReferenceModel,
    process: Any,
    clean: Mapping[tuple[int, int], torch.Tensor],
    valid: np.ndarray,
    plan: RowPlan,
    conditioning: Callable[[list[int], list[int], bool], Conditioning],
    config: InversionConfig,
    shape: tuple[int, int, int],
    counter: WorkCounter,
) -> dict[str, np.ndarray]:
    """The baselines' cached quantities: stored x0 and e_ref^fwd = mean‖ε_ref(x_fwd, t, c) − ε‖² (DESIGN §1.7;
    for v-models the v of (x0, ε), for flow models x_σ = (1−σ)·x0 + σ·ε and the velocity ε − x0, §1.8).

    ε is one seeded draw per row, the same for winner and loser, as Diffusion-DPO draws it; it
    is regenerated by the trainer, not stored. e_ref^fwd is computed from the x0 as stored.
    """
    num_rows = len(valid)
    stored_clean = torch.zeros((num_rows, 2, *shape))
    for (row, image), latent in clean.items():
        stored_clean[row, image] = torch.from_numpy(round_to_storage(latent.cpu().numpy(), config.storage_dtype))
    noise = torch.from_numpy(forward_noise(config.seed, plan.source_row, plan.draw, shape))
    latents = process.forward_latents(stored_clean, noise, plan.timestep, plan.sigma)
    targets = process.forward_target(stored_clean, noise, plan.timestep, plan.sigma)
    errors = _reference_errors(reference, process, latents, targets, valid, plan, conditioning, config.batch_size,
                               counter)
    return {
        "clean_chosen": stored_clean[:, 0].numpy(),
        "clean_rejected": stored_clean[:, 1].numpy(),
        "forward_error_chosen": errors[:, 0],
        "forward_error_rejected": errors[:, 1],
    }


def latent_shape(reference: ReferenceModel, resolution: int) -> tuple[int, int, int]:
    return reference.latent_shape(resolution)


def _prepare_pairs(
    plan: RowPlan, records: Mapping[int, PairRecord], resolution: int
) -> dict[int, tuple[PreparedImage, PreparedImage] | None]:
    """Decoded chosen/rejected images per source row; None drops the pair as a whole."""
    source_rows = sorted({int(s) for s in plan.source_row})
    images = [(records[row].chosen, records[row].rejected) for row in source_rows]
    # PIL releases the GIL while decoding and resizing, so threads use every core
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        decoded = list(pool.map(lambda pair: [prepare_image(data, resolution) for data in pair], images))
    return {
        row: (chosen, rejected) if chosen is not None and rejected is not None else None
        for row, (chosen, rejected) in zip(source_rows, decoded)
    }


def _encode_rows(
    reference: ReferenceModel,
    plan: RowPlan,
    prepared: Mapping[int, tuple[PreparedImage, PreparedImage] | None],
    valid: np.ndarray,
    config: InversionConfig,
    device: torch.device,
) -> dict[tuple[int, int], torch.Tensor]:
    """x0 of both images of every valid row: the VAE posterior mean, or a seeded sample of it.

    Each (source row, image, flip) is encoded once, however many rows (timestep draws) use it;
    a row's flip comes from the plan, its posterior sample z from (seed, source row, draw, image).
    """
    wanted = sorted({(int(plan.source_row[row]), image, int(plan.flip[row, image]))
                     for row in np.flatnonzero(valid) for image in (0, 1)})
    encoded: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(wanted), config.batch_size):
        batch = wanted[start : start + config.batch_size]
        pixels = []
        for source_row, image, flipped in batch:
            picture = prepared[source_row][image].pixels  # type: ignore[index]
            pixels.append(np.ascontiguousarray(picture[:, :, ::-1]) if flipped else picture)
        mean, std = reference.encode_latent_distribution(torch.from_numpy(np.stack(pixels)).to(device))
        for key, row_mean, row_std in zip(batch, mean, std):
            encoded[key] = (row_mean, row_std)
    clean = {}
    for row in np.flatnonzero(valid):
        source_row, draw = int(plan.source_row[row]), int(plan.draw[row])
        for image in (0, 1):
            mean, std = encoded[(source_row, image, int(plan.flip[row, image]))]
            if config.vae_latent == "sample":
                generator = torch.Generator().manual_seed(latent_sample_seed(config.seed, source_row, draw, image))
                z = torch.randn(mean.shape, generator=generator).to(mean.device)
                clean[(int(row), image)] = reference.to_model_latent(mean + std * z)
            else:
                clean[(int(row), image)] = reference.to_model_latent(mean)
    return clean


def _invert_batch(
    reference: ReferenceModel,
    process: Any,
    batch: list[_Job],
    conditioning: Callable[[list[int], list[int], bool], Conditioning],
    config: InversionConfig,
    plan: RowPlan,
    counter: WorkCounter,
) -> None:
    """Walk a batch of images up their steps; finished images leave the UNet call.

    Step i: the model at each image's label, then the process's step: DDIM from ā_from to ā_to
    (DESIGN §1.2) or Euler from σ to σ' (§1.8); with η > 0 the authors' x ← x + η·σ·z (§1.5),
    z seeded per (seed, row, draw, image, step).
    """
    capacity = config.batch_size * config.passes_per_step
    longest = max(len(job.steps) for job in batch)
    for step in range(longest):
        active = [job for job in batch if len(job.steps) > step]
        rows, images = [job.row for job in active], [job.image for job in active]
        latents = torch.stack([job.latent for job in active])
        steps = [job.steps[step] for job in active]
        labels = torch.tensor([walk_step.label for walk_step in steps])
        if config.guidance in (0.0, 1.0):
            guided = _timed_unet(reference, counter, capacity, latents, labels,
                                 conditioning(rows, images, config.guidance == 1.0))
        else:
            uncond, cond = conditioning(rows, images, False), conditioning(rows, images, True)
            both = _timed_unet(reference, counter, capacity, torch.cat([latents, latents]),
                               torch.cat([labels, labels]), _joined([uncond, cond]))
            noise_uncond, noise_cond = both.chunk(2)
            guided = ddim.guided_noise(noise_uncond, noise_cond, config.guidance)
        moved = process.advance(latents, guided.to(latents.device), steps).float()
        noise_std = process.jump_noise_std(steps) if config.eta > 0 else None
        for index, job in enumerate(active):
            job.latent = moved[index]
            if noise_std is not None:
                seed = noise_seed(config.seed, int(plan.source_row[job.row]), int(plan.draw[job.row]), job.image, step)
                z = torch.randn(job.latent.shape, generator=torch.Generator().manual_seed(seed))
                job.latent = job.latent + float(config.eta * noise_std[index]) * z.to(job.latent.device)


def _reference_errors(
    reference: ReferenceModel,
    process: Any,
    stored_latent: torch.Tensor,
    stored_target: torch.Tensor,
    valid: np.ndarray,
    plan: RowPlan,
    conditioning: Callable[[list[int], list[int], bool], Conditioning],
    batch_size: int,
    counter: WorkCounter,
) -> np.ndarray:
    """e_ref = mean‖ε_ref(x_t, t, c) − τ‖² (DESIGN §1.4; the output and τ in the model's output space)
    for the caption and the empty prompt.

    Returns (rows, 2 images, 2 prompts) float32, prompts ordered [caption, empty].
    """
    errors = np.zeros((len(valid), 2, 2), dtype=np.float32)
    jobs = [(int(row), image, prompt) for row in np.flatnonzero(valid) for image in (0, 1) for prompt in (0, 1)]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        parts: list[Conditioning] = []
        for prompt in (0, 1):
            members = [job for job in batch if job[2] == prompt]
            if members:
                parts.append(conditioning([j[0] for j in members], [j[1] for j in members], prompt == 0))
        ordered = [job for prompt in (0, 1) for job in batch if job[2] == prompt]
        rows = torch.tensor([job[0] for job in ordered])
        images = torch.tensor([job[1] for job in ordered])
        latents = stored_latent[rows, images]
        picked = rows.numpy()
        labels = process.labels(plan.timestep[picked], None if plan.sigma is None else plan.sigma[picked])
        noise = _timed_unet(reference, counter, batch_size, latents, labels, _joined(parts)).cpu()
        mse = ddim.per_sample_mse(noise, stored_target[rows, images])
        for (row, image, prompt), value in zip(ordered, mse.tolist()):
            errors[row, image, prompt] = value
    return errors

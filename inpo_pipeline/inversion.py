"""Stage one's computation for one shard: decode, encode, invert, target, reference errors.

Batch composition is a function of the shard's content only (rows sorted by step count, then
by position), never of the process count or of what was finished before a restart, so every
shard comes out bit-identical however the work was split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_schema import RowPlan, ShardResult, round_to_storage
from inpo_pipeline import ddim
from inpo_pipeline.data import PairRecord, PreparedImage, prepare_image
from inpo_pipeline.models import SDXL, ReferenceModel, sdxl_time_ids, unet_noise
from inpo_pipeline.plan import noise_seed

PromptLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class InversionConfig:
    """Every setting that changes what a row holds."""

    resolution: int
    storage_dtype: str = "float16"
    mode: str = "exact"
    num_steps: int = 10
    guidance: float = 0.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 8

    def trajectory(self, t: int, reference: ReferenceModel) -> list[int]:
        return ddim.trajectory(
            int(t), self.mode, self.num_steps, reference.num_train_timesteps, reference.steps_offset
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
    positions: list[int]
    latent: torch.Tensor = field(repr=False)


def _timed_unet(reference: ReferenceModel, counter: WorkCounter, capacity: int, *args: torch.Tensor | None) -> torch.Tensor:
    start = time.perf_counter()
    with reference.autocast():
        noise = unet_noise(reference.unet, *args).float()  # type: ignore[arg-type]
    if noise.is_cuda:
        torch.cuda.synchronize(noise.device)
    counter.seconds_in_unet += time.perf_counter() - start
    counter.unet_calls += 1
    counter.row_evaluations += args[0].shape[0]  # type: ignore[union-attr]
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
    c, h, w = latent_shape(reference, config.resolution)
    sdxl = reference.family == SDXL

    prepared = _prepare_pairs(plan, records, config.resolution)
    valid = np.array([prepared[int(s)] is not None for s in plan.source_row], dtype=bool)
    clean = _encode_pairs(reference, prepared, config.batch_size, device)

    time_ids = np.zeros((num_rows, 2, 6), dtype=np.float32)
    for row in np.flatnonzero(valid):
        pair = prepared[int(plan.source_row[row])]
        assert pair is not None
        for image in (0, 1):
            time_ids[row, image] = sdxl_time_ids(pair[image].original_size, pair[image].crop_top_left, config.resolution)

    prompt_indices = np.concatenate([[0], plan.prompt_index]).astype(np.int64)
    text, pooled = prompt_lookup(prompt_indices)
    empty_text, row_text = torch.from_numpy(text[:1]), torch.from_numpy(text[1:])
    empty_pooled = torch.from_numpy(pooled[:1]) if pooled is not None else None
    row_pooled = torch.from_numpy(pooled[1:]) if pooled is not None else None

    def conditioning(rows: list[int], images: list[int], use_caption: bool) -> tuple[torch.Tensor, ...]:
        index = torch.tensor(rows)
        embedding = row_text[index] if use_caption else empty_text.expand(len(rows), -1, -1)
        if not sdxl:
            return (embedding,)
        assert row_pooled is not None and empty_pooled is not None
        pooled_rows = row_pooled[index] if use_caption else empty_pooled.expand(len(rows), -1)
        ids = torch.from_numpy(time_ids[rows, images])
        return embedding, pooled_rows, ids

    alphas = reference.alphas_cumprod
    jobs = [
        _Job(int(row), image, config.trajectory(int(plan.timestep[row]), reference),
             clean[int(plan.source_row[row])][image])
        for row in np.flatnonzero(valid)
        for image in (0, 1)
    ]
    jobs.sort(key=lambda job: (-len(job.positions), job.row, job.image))
    steps_taken = np.zeros(num_rows, dtype=np.int16)
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start : start + config.batch_size]
        _invert_batch(reference, batch, conditioning, config, alphas, plan, counter)
    stored_latent = torch.zeros((num_rows, 2, c, h, w))
    stored_target = torch.zeros((num_rows, 2, c, h, w))
    for job in jobs:
        steps_taken[job.row] = len(job.positions) - 1
        t = torch.tensor([int(plan.timestep[job.row])])
        x0 = clean[int(plan.source_row[job.row])][job.image].unsqueeze(0).cpu()
        # τ from the x_t as stored, so that the stored pair satisfies x_t = √ā·x0 + √(1−ā)·τ
        # up to τ's own rounding (1/√(1−ā) would amplify x_t's rounding ~34× at t = 0)
        latent = torch.from_numpy(round_to_storage(job.latent.cpu().numpy(), config.storage_dtype))
        target = ddim.single_step_target(latent.unsqueeze(0), x0, ddim.alpha_bar_at(alphas, t))[0]
        stored_latent[job.row, job.image] = latent
        stored_target[job.row, job.image] = torch.from_numpy(round_to_storage(target.numpy(), config.storage_dtype))

    # e_ref is computed from exactly what will be read back (DESIGN §2, cache properties)
    errors = _reference_errors(
        reference, stored_latent, stored_target, valid, plan, conditioning, config.batch_size, counter
    )

    counter.seconds_total = time.perf_counter() - started
    result = ShardResult(
        latent_chosen=stored_latent[:, 0].numpy(),
        latent_rejected=stored_latent[:, 1].numpy(),
        target_chosen=stored_target[:, 0].numpy(),
        target_rejected=stored_target[:, 1].numpy(),
        reference_error_chosen=errors[:, 0],
        reference_error_rejected=errors[:, 1],
        valid=valid.astype(np.uint8),
        inversion_steps=steps_taken,
        time_ids_chosen=time_ids[:, 0] if sdxl else None,
        time_ids_rejected=time_ids[:, 1] if sdxl else None,
        stats=np.array([counter.row_evaluations, counter.slot_evaluations, counter.seconds_total]),
    )
    return result, counter


def latent_shape(reference: ReferenceModel, resolution: int) -> tuple[int, int, int]:
    side = resolution // reference.vae_scale_factor
    return int(reference.unet.config.in_channels), side, side


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


def _encode_pairs(
    reference: ReferenceModel,
    prepared: Mapping[int, tuple[PreparedImage, PreparedImage] | None],
    batch_size: int,
    device: torch.device,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """x0 = VAE latents of both images of every decodable pair, in source-row order."""
    images = [(row, image, pair[image].pixels) for row, pair in sorted(prepared.items()) if pair for image in (0, 1)]
    latents: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([item[2] for item in batch])).to(device)
        encoded = reference.encode_images(pixels)
        for (row, image, _), latent in zip(batch, encoded):
            latents[(row, image)] = latent
    return {row: (latents[(row, 0)], latents[(row, 1)]) for row, pair in prepared.items() if pair}


def _invert_batch(
    reference: ReferenceModel,
    batch: list[_Job],
    conditioning: Callable[[list[int], list[int], bool], tuple[torch.Tensor, ...]],
    config: InversionConfig,
    alphas: torch.Tensor,
    plan: RowPlan,
    counter: WorkCounter,
) -> None:
    """Walk a batch of images up their trajectories; finished images leave the UNet call."""
    noises = {}
    if config.eta > 0:
        for job in batch:
            generator = torch.Generator().manual_seed(
                noise_seed(config.seed, int(plan.source_row[job.row]), int(plan.draw[job.row]), job.image)
            )
            noises[id(job)] = torch.randn((max(len(job.positions) - 1, 1), *job.latent.shape), generator=generator)
    capacity = config.batch_size * config.passes_per_step
    longest = max(len(job.positions) for job in batch) - 1
    for step in range(longest):
        active = [job for job in batch if len(job.positions) - 1 > step]
        rows, images = [job.row for job in active], [job.image for job in active]
        latents = torch.stack([job.latent for job in active])
        here = torch.tensor([job.positions[step] for job in active])
        there = torch.tensor([job.positions[step + 1] for job in active])
        if config.guidance in (0.0, 1.0):
            noise = _timed_unet(reference, counter, capacity, latents, there,
                                *conditioning(rows, images, config.guidance == 1.0))
            guided = noise
        else:
            uncond, cond = conditioning(rows, images, False), conditioning(rows, images, True)
            both = _timed_unet(reference, counter, capacity, torch.cat([latents, latents]),
                               torch.cat([there, there]), *(torch.cat(pair) for pair in zip(uncond, cond)))
            noise_uncond, noise_cond = both.chunk(2)
            guided = ddim.guided_noise(noise_uncond, noise_cond, config.guidance)
        moved = ddim.inversion_step(
            latents, guided.to(latents.device), ddim.alpha_bar_at(alphas, here), ddim.alpha_bar_at(alphas, there)
        ).float()
        for index, job in enumerate(active):
            job.latent = moved[index]
            if config.eta > 0:
                job.latent = job.latent + config.eta * noises[id(job)][step].to(job.latent.device)


def _reference_errors(
    reference: ReferenceModel,
    stored_latent: torch.Tensor,
    stored_target: torch.Tensor,
    valid: np.ndarray,
    plan: RowPlan,
    conditioning: Callable[[list[int], list[int], bool], tuple[torch.Tensor, ...]],
    batch_size: int,
    counter: WorkCounter,
) -> np.ndarray:
    """e_ref = mean‖ε_ref(x_t, t, c) − τ‖² (DESIGN §1.4) for the caption and the empty prompt.

    Returns (rows, 2 images, 2 prompts) float32, prompts ordered [caption, empty].
    """
    errors = np.zeros((len(valid), 2, 2), dtype=np.float32)
    jobs = [(int(row), image, prompt) for row in np.flatnonzero(valid) for image in (0, 1) for prompt in (0, 1)]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        parts: list[tuple[torch.Tensor, ...]] = []
        for prompt in (0, 1):
            members = [job for job in batch if job[2] == prompt]
            if members:
                parts.append(conditioning([j[0] for j in members], [j[1] for j in members], prompt == 0))
        ordered = [job for prompt in (0, 1) for job in batch if job[2] == prompt]
        rows = torch.tensor([job[0] for job in ordered])
        images = torch.tensor([job[1] for job in ordered])
        latents = stored_latent[rows, images]
        timesteps = torch.from_numpy(plan.timestep[rows.numpy()].astype(np.int64))
        extra = tuple(torch.cat(tensors) for tensors in zip(*parts))
        noise = _timed_unet(reference, counter, batch_size, latents, timesteps, *extra).cpu()
        mse = ddim.per_sample_mse(noise, stored_target[rows, images])
        for (row, image, prompt), value in zip(ordered, mse.tolist()):
            errors[row, image, prompt] = value
    return errors

"""DDIM inversion math: trajectories, the inversion step, the single-step target.

Every function here is pure (tensors in, tensors out) and cites the equation of
``shared/DESIGN.md`` it computes. Timesteps are integer indices into the scheduler's
``alphas_cumprod`` (0..T-1). The clean image sits *before* timestep 0: it is written as
position ``CLEAN = -1`` with ``alpha_bar = 1``, so a trajectory from the image to ``t``
covers ``t + 1`` timestep units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

CLEAN = -1
"""Trajectory position of the clean latent x0 (alpha_bar = 1)."""

TIMESTEP_MODES = ("exact", "authors")


def alpha_bar_at(alphas_cumprod: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ā at integer trajectory positions, with ā(CLEAN) = 1 (DESIGN §1.2: the walk starts at x0)."""
    positions = positions.long()
    safe = positions.clamp(min=0)
    values = alphas_cumprod.to(positions.device)[safe]
    return torch.where(positions < 0, torch.ones_like(values), values)


def exact_trajectory(t: int, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Positions of an `exact` inversion from x0 to t (issue 2, `--timestep-mode exact`).

    m = max(1, ceil(n·(t+1)/T)) nearly equal steps from CLEAN (-1) to t, so that no step is
    longer than ceil(T/n) timestep units and the walk ends exactly at t. (The issue writes ⌈n·t/T⌉;
    counting the distance from the clean image, t+1, keeps t = 0 at one step instead of none.)
    Returns [CLEAN, s_1, ..., s_m = t].
    """
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"timestep {t} outside 0..{num_train_timesteps - 1}")
    distance = t + 1
    steps = max(1, math.ceil(num_steps * distance / num_train_timesteps))
    return [CLEAN + round(i * distance / steps) for i in range(steps + 1)]


RETIRED_MODES = {
    "grid": "--timestep-mode grid was removed: it ended one stride below the authors' walk, called the "
    "UNet at the destination label and started from ā = 1, so it did not reproduce the released code "
    "(DESIGN §1.5); use --timestep-mode authors (or --recipe authors)",
}


@dataclass(frozen=True)
class InversionStep:
    """One UNet call of an inversion walk: ε at `label`, then DDIM from ā_from to ā_to."""

    label: int
    alpha_bar_from: float
    alpha_bar_to: float


def exact_steps(t: int, num_steps: int, alphas_cumprod: torch.Tensor) -> list[InversionStep]:
    """The project's `exact` variant (DESIGN §1.2): walk from x0 (ā = 1) exactly to t.

    Positions from :func:`exact_trajectory`; each step calls the UNet at its destination label
    s', the usual inversion approximation ε(x_{s'}) ≈ ε(x_s, s').
    """
    positions = exact_trajectory(t, num_steps, len(alphas_cumprod))
    alphas = alphas_cumprod.double().tolist()
    value = [1.0 if s == CLEAN else alphas[s] for s in positions]
    return [InversionStep(there, value[i], value[i + 1]) for i, there in enumerate(positions[1:])]


def authors_departures(
    num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0, timestep_spacing: str = "leading"
) -> tuple[list[int], int]:
    """The departures of diffusers 0.20's ``DDIMInverseScheduler`` and its stride (DESIGN §1.5).

    The n-point grid (``leading``: j·(T//n) + steps_offset; ``trailing``: round(T − j·T/n) − 1,
    ascending) is rolled by one and its first entry set to (second entry − stride):
    SD's leading grid with offset 1 gives D = [−99, 1, 101, …, 801], stride 100.
    """
    stride = num_train_timesteps // num_steps
    if timestep_spacing == "leading":
        grid = [j * stride + steps_offset for j in range(num_steps)]
    elif timestep_spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        grid = sorted(round(num_train_timesteps - j * ratio) - 1 for j in range(num_steps))
    else:
        raise ValueError(
            f"timestep_spacing {timestep_spacing!r}: the authors' inverse scheduler supports leading or trailing"
        )
    departures = [grid[-1], *grid[:-1]]  # np.roll(grid, 1)
    departures[0] = (departures[1] if num_steps > 1 else grid[0]) - stride
    if departures[-1] + stride >= num_train_timesteps:
        raise ValueError(f"the inverse grid would step past timestep {num_train_timesteps - 1}")
    return departures, stride


def authors_steps(
    t: int, num_steps: int, alphas_cumprod: torch.Tensor, scheduler_config: dict[str, Any]
) -> list[InversionStep]:
    """The released loop's walk for label t (DESIGN §1.5).

    For every departure d < t, in order: ε = UNet(x, label d), then DDIM from ā_d to ā_{d+s}, where
    ā_d for d < 0 is 1 with ``set_alpha_to_one`` and ā_0 without. So there is always at least one
    step, and the walk ends at level d_last + s (≥ t for t ≤ 901), not at t.
    """
    num_train_timesteps = len(alphas_cumprod)
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"timestep {t} outside 0..{num_train_timesteps - 1}")
    departures, stride = authors_departures(
        num_steps, num_train_timesteps, int(scheduler_config.get("steps_offset", 0)),
        scheduler_config.get("timestep_spacing", "leading"),
    )
    alphas = alphas_cumprod.double().tolist()
    initial = 1.0 if scheduler_config.get("set_alpha_to_one", True) else alphas[0]
    return [InversionStep(d, alphas[d] if d >= 0 else initial, alphas[d + stride]) for d in departures if d < t]


def inversion_steps(
    t: int, mode: str, num_steps: int, alphas_cumprod: torch.Tensor, scheduler_config: dict[str, Any]
) -> list[InversionStep]:
    """The walk for label t under `mode` ('exact' or 'authors')."""
    if mode == "exact":
        return exact_steps(t, num_steps, alphas_cumprod)
    if mode == "authors":
        return authors_steps(t, num_steps, alphas_cumprod, scheduler_config)
    raise ValueError(RETIRED_MODES.get(mode, f"unknown timestep mode {mode!r}; use one of {TIMESTEP_MODES}"))


def jump_noise_std(alpha_bar_from: torch.Tensor, alpha_bar_to: torch.Tensor) -> torch.Tensor:
    """σ of the inversion noise η·σ·z added after a step from ā_from up to ā_to (DESIGN §1.5).

    σ² = (1−ā_from)/(1−ā_to) · (1 − ā_to/ā_from), the DDPM posterior variance of the jump
    (diffusers' ``DDIMScheduler._get_variance(to, from)``); 0 from the clean image (ā_from = 1).
    """
    alpha_bar_from, alpha_bar_to = alpha_bar_from.double(), alpha_bar_to.double()
    variance = (1 - alpha_bar_from) / (1 - alpha_bar_to) * (1 - alpha_bar_to / alpha_bar_from)
    return variance.clamp(min=0).sqrt()


def guided_noise(
    noise_uncond: torch.Tensor | None, noise_cond: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    """ε̂ = ε(∅) + w·(ε(c) − ε(∅)) (DESIGN §1.2). w = 0 and w = 1 need only one of the two."""
    if guidance == 0.0:
        assert noise_uncond is not None
        return noise_uncond
    if guidance == 1.0:
        assert noise_cond is not None
        return noise_cond
    assert noise_uncond is not None and noise_cond is not None
    return noise_uncond + guidance * (noise_cond - noise_uncond)


def _coefficients(alpha_bar: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ā) and sqrt(1−ā) per row, shaped to broadcast over `like`.

    Computed in float64 and cast last: in bf16, ā_0 = 0.99915 rounds to 1 and 1−ā would be 0.
    """
    alpha_bar = alpha_bar.to(device=like.device, dtype=torch.float64).reshape(-1, *([1] * (like.ndim - 1)))
    return alpha_bar.sqrt().to(like.dtype), (1 - alpha_bar).sqrt().to(like.dtype)


def inversion_step(
    latent: torch.Tensor,
    noise_pred: torch.Tensor,
    alpha_bar_from: torch.Tensor,
    alpha_bar_to: torch.Tensor,
) -> torch.Tensor:
    """One deterministic DDIM step from position s to s' (DESIGN §1.2), per row.

    x̂0 = (x_s − sqrt(1−ā_s)·ε̂) / sqrt(ā_s)
    x_{s'} = sqrt(ā_{s'})·x̂0 + sqrt(1−ā_{s'})·ε̂

    Used upwards (s < s') this is inversion; used downwards it is the DDIM sampler (η = 0),
    which is how the round-trip test closes the loop.
    """
    signal_from, noise_from = _coefficients(alpha_bar_from, latent)
    signal_to, noise_to = _coefficients(alpha_bar_to, latent)
    predicted_x0 = (latent - noise_from * noise_pred) / signal_from
    return signal_to * predicted_x0 + noise_to * noise_pred


def single_step_target(
    latent_t: torch.Tensor, latent_0: torch.Tensor, alpha_bar_t: torch.Tensor
) -> torch.Tensor:
    """τ_t = (x_t − sqrt(ā_t)·x0) / sqrt(1−ā_t) (DESIGN §1.3), per row."""
    signal, noise = _coefficients(alpha_bar_t, latent_t)
    return (latent_t - signal * latent_0) / noise


def forward_noised(latent_0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ā_t)·x0 + sqrt(1−ā_t)·ε, the forward process of Diffusion-DPO and SFT (DESIGN §1.7).

    Stage one (for the cached reference errors) and the trainer's loader (for the policy's input)
    both call this on the same float32 values on the CPU, so the two x_t are bit-identical.
    """
    signal, noise_scale = _coefficients(alpha_bar_t, latent_0)
    return signal * latent_0 + noise_scale * noise


def forward_latents(
    clean: torch.Tensor, noise: torch.Tensor, timesteps: np.ndarray, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_fwd of (rows, 2, C, h, w) clean latents with one ε per row, shared by both images (DESIGN §1.7).

    Stage one (for the cached forward errors) and the trainer's loader (for the policy's input)
    call exactly this on exactly the stored x0 and the regenerated ε, on the CPU in float32, so
    the two x_fwd are bit-identical.
    """
    rows = clean.shape[0]
    alpha_bar = alpha_bar_at(alphas_cumprod, torch.from_numpy(np.repeat(np.asarray(timesteps, dtype=np.int64), 2)))
    both = noise.unsqueeze(1).expand(-1, 2, *noise.shape[1:]).reshape(rows * 2, *noise.shape[1:])
    flat = clean.reshape(rows * 2, *clean.shape[2:])
    return forward_noised(flat, both, alpha_bar).reshape(clean.shape)


def predicted_clean(
    latent_t: torch.Tensor, noise_pred: torch.Tensor, alpha_bar_t: torch.Tensor
) -> torch.Tensor:
    """x0(t) = (x_t − sqrt(1−ā_t)·ε) / sqrt(ā_t): the single-step view (DESIGN §1.1)."""
    signal, noise = _coefficients(alpha_bar_t, latent_t)
    return (latent_t - noise * noise_pred) / signal


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean‖ε − τ‖² over each sample's C×H×W elements (DESIGN §1.4), in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    difference = prediction.to(dtype) - target.to(dtype)
    return difference.pow(2).flatten(1).mean(dim=1)

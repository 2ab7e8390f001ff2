"""Flow-matching math (DESIGN §1.8): σ levels, the Euler inversion walk, the velocity target.

x_σ = (1−σ)·x0 + σ·ε, σ ∈ [0, 1]; the model predicts v ≈ ε − x0 at timestep 1000·σ. Pure
functions, tensors or arrays in and out, each next to the equation it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SIGMA_MIN = 1e-3
"""Smallest training σ: τ_v = (x_σ − x0)/σ divides by σ, so the storage rounding of x_σ is
amplified 1/σ; SD3 and FLUX sample no lower level than 1/1000 either (timestep ≥ 1)."""

FLOW_TIMESTEP_MODES = ("exact", "shifted-grid")
SIGMA_SAMPLINGS = ("logit-normal", "uniform")


@dataclass(frozen=True)
class FlowStep:
    """One velocity evaluation of the Euler walk: v at `label` = 1000·σ_from, then σ_from → σ_to."""

    label: float
    sigma_from: float
    sigma_to: float


def shift_sigma(sigma: np.ndarray | torch.Tensor, shift: float) -> Any:
    """SD3's static shift σ' = s·σ / (1 + (s − 1)·σ) (FlowMatchEulerDiscreteScheduler)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift_mu(image_tokens: int, config: dict[str, Any]) -> float:
    """FLUX's resolution-dependent μ: linear in the number of 2×2 latent tokens between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) (FluxPipeline.calculate_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_tokens * slope + base - slope * base_len


def time_shift(sigma: np.ndarray | torch.Tensor, mu: float) -> Any:
    """The dynamic (exponential) shift σ' = e^μ / (e^μ + (1/σ − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def shifted(sigma: np.ndarray, scheduler_config: dict[str, Any], image_tokens: int) -> np.ndarray:
    """σ after the scheduler's shift: static (SD3) or resolution-dependent (FLUX)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if scheduler_config.get("use_dynamic_shifting"):
        inside = np.clip(sigma, 1e-12, 1.0)
        return np.where(sigma > 0, time_shift(inside, dynamic_shift_mu(image_tokens, scheduler_config)), 0.0)
    return shift_sigma(sigma, float(scheduler_config.get("shift", 1.0)))


def sigmas_from_uniform(uniform: np.ndarray, sampling: str, logit_mean: float, logit_std: float) -> np.ndarray:
    """Training levels before the shift: uniform u itself, or SD3's logit-normal σ = sigmoid(m + s·Φ⁻¹(u))."""
    uniform = np.asarray(uniform, dtype=np.float64)
    if sampling == "uniform":
        return uniform
    if sampling == "logit-normal":
        inside = np.clip(uniform, 1e-12, 1 - 1e-12)
        normal = torch.special.ndtri(torch.from_numpy(inside)).numpy()
        return 1.0 / (1.0 + np.exp(-(logit_mean + logit_std * normal)))
    raise ValueError(f"sigma sampling must be one of {SIGMA_SAMPLINGS}")


def training_sigmas(uniform: np.ndarray, sampling: str, logit_mean: float, logit_std: float,
                    scheduler_config: dict[str, Any], image_tokens: int) -> np.ndarray:
    """Each row's σ: drawn per `sampling`, shifted like the scheduler, kept in [SIGMA_MIN, 1];
    float32, the precision the model and the store see."""
    sigma = shifted(sigmas_from_uniform(uniform, sampling, logit_mean, logit_std), scheduler_config, image_tokens)
    return np.clip(sigma, SIGMA_MIN, 1.0).astype(np.float32)


def sampler_sigmas(num_steps: int, scheduler_config: dict[str, Any], image_tokens: int) -> np.ndarray:
    """The descending levels 1 = σ_0 > … > σ_n = 0 of the family pipeline's n-step sampler, taken from
    diffusers' FlowMatchEulerDiscreteScheduler itself: SD3's pipeline calls set_timesteps(n) (its
    grid ends at the shifted σ_min, shifted once more), FLUX's passes σ = linspace(1, 1/n, n) and
    the resolution's μ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if scheduler_config.get("use_dynamic_shifting"):
        scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps),
                                mu=dynamic_shift_mu(image_tokens, scheduler_config))
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.double().numpy()


def exact_walk(sigma: float, num_steps: int) -> list[FlowStep]:
    """`exact`: m = max(1, ⌈n·σ⌉) equal Euler steps from 0 to exactly σ (the flow analogue of
    ddim.exact_trajectory: no step longer than 1/n)."""
    steps = max(1, math.ceil(num_steps * sigma - 1e-9))
    levels = [sigma * i / steps for i in range(steps + 1)]
    return [FlowStep(1000.0 * levels[i], levels[i], levels[i + 1]) for i in range(steps)]


def shifted_grid_walk(sigma: float, num_steps: int, scheduler_config: dict[str, Any], image_tokens: int) -> list[FlowStep]:
    """`shifted-grid`: evaluate v only at the n-step sampler's levels below σ (ascending, from 0),
    the last step landing on σ itself, so the velocities of inversion are taken where the
    sampler takes them."""
    grid = sorted(float(s) for s in sampler_sigmas(num_steps, scheduler_config, image_tokens) if s < sigma)
    levels = [*grid, sigma]
    return [FlowStep(1000.0 * levels[i], levels[i], levels[i + 1]) for i in range(len(levels) - 1)]


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, sigma_from: torch.Tensor,
               sigma_to: torch.Tensor) -> torch.Tensor:
    """x_{σ'} = x_σ + (σ' − σ)·v(x_σ, σ) (DESIGN §1.8), per row; upwards it inverts, downwards it samples."""
    delta = (sigma_to.double() - sigma_from.double()).to(latent.device).reshape(-1, *([1] * (latent.ndim - 1)))
    return latent + delta.to(latent.dtype) * velocity.to(latent.dtype)


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=torch.float64).reshape(-1, *([1] * (like.ndim - 1)))


def velocity_target(latent: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """τ_v = (x_σ − x0)/σ, the velocity of the straight line through x0 and x_σ (DESIGN §1.8)."""
    return (latent.double() - clean.double()) / _column(sigma, latent)


def forward_noised(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1−σ)·x0 + σ·ε (DESIGN §1.8): Flow-DPO's input, formed from recorded noise."""
    column = _column(sigma, clean).to(clean.dtype)
    return (1 - column) * clean + column * noise


# FlowMatchEulerDiscreteScheduler options that change its σ grid in ways this module does not
# reproduce (option: the value it must keep)
UNSUPPORTED_SCHEDULER_OPTIONS = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                                 "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                 "stochastic_sampling": False}


def unsupported_scheduler_options(config: dict[str, Any]) -> list[str]:
    """The options of a flow scheduler config whose σ grid inpo would not reproduce."""
    found = [f"{name}={config[name]!r}" for name, default in UNSUPPORTED_SCHEDULER_OPTIONS.items()
             if config.get(name, default) not in (default,)]
    if config.get("use_dynamic_shifting") and config.get("time_shift_type", "exponential") != "exponential":
        found.append(f"time_shift_type={config['time_shift_type']!r}")
    return found

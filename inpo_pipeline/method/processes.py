"""The model-output adapter: one object per noise process that inversion, targets, the trainer
and the baselines all go through, so no family is a special case in the stage runners.

* `DiffusionProcess` — the DDPM schedule ā_t of SD1.x/2.x/SDXL, integer timesteps, the UNet
  predicting ε (``prediction_type: epsilon``) or v = √ā·ε − √(1−ā)·x0 (``v_prediction``, SD2.x).
* `FlowProcess` — rectified flow of SD3/FLUX (DESIGN §1.8): σ ∈ [0, 1], timestep 1000·σ, the
  transformer predicting the velocity v ≈ ε − x0.

Errors are measured in the model's own output space (ε, v or velocity): every target the store
holds is in that space, so the trainer compares the raw output with the stored target and never
converts. For ε-models this is exactly DESIGN §1.3–§1.4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inpo_pipeline.method import ddim
from inpo_pipeline.method import flow
from inpo_pipeline.method.plan import row_keys, sample_timesteps

PREDICTIONS = ("epsilon", "v_prediction")


class ProcessError(ValueError):
    """A setting the process cannot honour; the message is one line for the user."""


def _uniform(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class DiffusionProcess:
    """DDPM ā_t; the UNet predicts ε or v (DESIGN §1.1–§1.5)."""

    alphas_cumprod: torch.Tensor  # float64, index t
    scheduler_config: dict[str, Any]
    prediction: str = "epsilon"
    kind: str = "diffusion"
    timestep_modes: tuple[str, ...] = ddim.TIMESTEP_MODES

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ProcessError(f"prediction type {self.prediction!r}: inpo supports {', '.join(PREDICTIONS)} "
                               "UNets and flow-matching transformers")

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "prediction": self.prediction}

    # ---------------------------------------------------------------- levels
    def sample_levels(self, seed: int, source_row: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """t ~ U{0..T−1} per row (DESIGN §1.5); no σ."""
        return sample_timesteps(seed, source_row, draw, len(self.alphas_cumprod)), None

    def labels(self, timestep: np.ndarray, sigma: np.ndarray | None) -> torch.Tensor:
        """What the UNet is called with: the integer timestep."""
        return torch.from_numpy(np.asarray(timestep).astype(np.int64))

    def _alpha_bar(self, timestep: np.ndarray | torch.Tensor) -> torch.Tensor:
        return ddim.alpha_bar_at(self.alphas_cumprod, torch.as_tensor(np.asarray(timestep)).long())

    # ---------------------------------------------------------------- inversion
    def walk(self, timestep: int, sigma: float | None, mode: str, num_steps: int) -> list[ddim.InversionStep]:
        return ddim.inversion_steps(int(timestep), mode, num_steps, self.alphas_cumprod, self.scheduler_config)

    def as_noise(self, output: torch.Tensor, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ε from the UNet's output: itself, or ε = √ā·v + √(1−ā)·x for a v-model, at the label's ā
        (the ā the UNet was told its input is at)."""
        if self.prediction == "epsilon":
            return output
        signal, noise = ddim._coefficients(self._alpha_bar(labels), latent)  # noqa: SLF001
        return signal * output + noise * latent

    def advance(self, latent: torch.Tensor, output: torch.Tensor, steps: list[ddim.InversionStep]) -> torch.Tensor:
        """One DDIM step per row from ā_from to ā_to (DESIGN §1.2) with the output as ε."""
        labels = torch.tensor([step.label for step in steps])
        alpha_from = torch.tensor([step.alpha_bar_from for step in steps], dtype=torch.float64)
        alpha_to = torch.tensor([step.alpha_bar_to for step in steps], dtype=torch.float64)
        return ddim.inversion_step(latent, self.as_noise(output, latent, labels), alpha_from, alpha_to)

    def jump_noise_std(self, steps: list[ddim.InversionStep]) -> list[float]:
        """σ of the authors' η·σ·z after each step (DESIGN §1.5)."""
        alpha_from = torch.tensor([step.alpha_bar_from for step in steps], dtype=torch.float64)
        alpha_to = torch.tensor([step.alpha_bar_to for step in steps], dtype=torch.float64)
        return ddim.jump_noise_std(alpha_from, alpha_to).tolist()

    # ---------------------------------------------------------------- targets
    def target(self, latent: torch.Tensor, clean: torch.Tensor, timestep: np.ndarray,
               sigma: np.ndarray | None) -> torch.Tensor:
        """The single-step target in output space, float64: τ_t (DESIGN §1.3), or for a v-model
        v_τ = √ā·τ − √(1−ā)·x0, the v of the same (x_t, x0)."""
        alpha_bar = self._alpha_bar(timestep)
        tau = ddim.single_step_target(latent.double(), clean.double(), alpha_bar)
        if self.prediction == "epsilon":
            return tau
        signal, noise = ddim._coefficients(alpha_bar, tau)  # noqa: SLF001
        return signal * tau - noise * clean.double()

    def forward_latents(self, clean: torch.Tensor, noise: torch.Tensor, timestep: np.ndarray,
                        sigma: np.ndarray | None) -> torch.Tensor:
        """x_fwd = √ā·x0 + √(1−ā)·ε of (rows, 2, …) with one ε per row (DESIGN §1.7)."""
        return ddim.forward_latents(clean, noise, timestep, self.alphas_cumprod)

    def forward_target(self, clean: torch.Tensor, noise: torch.Tensor, timestep: np.ndarray,
                       sigma: np.ndarray | None) -> torch.Tensor:
        """The forward objectives' target, (rows, 2, …): ε itself, or v = √ā·ε − √(1−ā)·x0."""
        both = noise.unsqueeze(1).expand(-1, 2, *noise.shape[1:])
        if self.prediction == "epsilon":
            return both
        alpha_bar = self._alpha_bar(np.repeat(np.asarray(timestep), 2))
        flat_clean = clean.reshape(-1, *clean.shape[2:])
        signal, noise_scale = ddim._coefficients(alpha_bar, flat_clean.double())  # noqa: SLF001
        flat = signal * both.reshape(flat_clean.shape).double() - noise_scale * flat_clean.double()
        return flat.float().reshape(clean.shape)


@dataclass
class FlowProcess:
    """Rectified flow (DESIGN §1.8): x_σ = (1−σ)·x0 + σ·ε, v ≈ ε − x0, timestep 1000·σ."""

    scheduler_config: dict[str, Any]
    image_tokens: int  # 2×2 latent patches of the training resolution (FLUX's dynamic shift)
    sigma_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    kind: str = "flow"
    prediction: str = "flow"
    timestep_modes: tuple[str, ...] = flow.FLOW_TIMESTEP_MODES

    def __post_init__(self) -> None:
        unsupported = flow.unsupported_scheduler_options(self.scheduler_config)
        if unsupported:
            raise ProcessError(f"the model's flow scheduler sets {', '.join(unsupported)}, whose σ grid inpo does not "
                               "reproduce; save the pipeline with a FlowMatchEulerDiscreteScheduler without it")
        if self.sigma_sampling not in flow.SIGMA_SAMPLINGS:
            raise ProcessError(f"--sigma-sampling must be one of {', '.join(flow.SIGMA_SAMPLINGS)}")
        if not self.logit_std > 0:
            raise ProcessError("--logit-std must be above 0")

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "prediction": self.prediction, "sigma_sampling": self.sigma_sampling,
                "logit_mean": self.logit_mean, "logit_std": self.logit_std, "image_tokens": self.image_tokens,
                "sigma_min": flow.SIGMA_MIN,
                "shift": ("dynamic" if self.scheduler_config.get("use_dynamic_shifting")
                          else float(self.scheduler_config.get("shift", 1.0)))}

    def sample_levels(self, seed: int, source_row: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """σ per row, a hash of (seed, source row, draw) through the chosen sampling and the shift;
        the integer timestep round(1000·σ) is kept beside it for summaries."""
        uniform = _uniform(row_keys(seed, source_row, draw, salt=1))
        sigma = flow.training_sigmas(uniform, self.sigma_sampling, self.logit_mean, self.logit_std,
                                     self.scheduler_config, self.image_tokens)
        return np.rint(sigma.astype(np.float64) * 1000).astype(np.int32), sigma

    def labels(self, timestep: np.ndarray, sigma: np.ndarray | None) -> torch.Tensor:
        """What the transformer is called with: timestep 1000·σ (float32)."""
        assert sigma is not None, "a flow store holds σ per row"
        return torch.from_numpy(np.asarray(sigma, dtype=np.float32) * np.float32(1000))

    def walk(self, timestep: int, sigma: float | None, mode: str, num_steps: int) -> list[flow.FlowStep]:
        assert sigma is not None
        if mode == "exact":
            return flow.exact_walk(float(sigma), num_steps)
        if mode == "shifted-grid":
            return flow.shifted_grid_walk(float(sigma), num_steps, self.scheduler_config, self.image_tokens)
        raise ProcessError(f"timestep mode {mode!r} is not a flow walk; use one of {', '.join(self.timestep_modes)}")

    def advance(self, latent: torch.Tensor, output: torch.Tensor, steps: list[flow.FlowStep]) -> torch.Tensor:
        sigma_from = torch.tensor([step.sigma_from for step in steps], dtype=torch.float64)
        sigma_to = torch.tensor([step.sigma_to for step in steps], dtype=torch.float64)
        return flow.euler_step(latent, output, sigma_from, sigma_to)

    def jump_noise_std(self, steps: list[flow.FlowStep]) -> list[float]:
        raise ProcessError("--eta (the authors' DDPM noise) has no flow counterpart; use --eta 0 on flow models")

    def target(self, latent: torch.Tensor, clean: torch.Tensor, timestep: np.ndarray,
               sigma: np.ndarray | None) -> torch.Tensor:
        """τ_v = (x_σ − x0)/σ (DESIGN §1.8), float64."""
        assert sigma is not None
        return flow.velocity_target(latent, clean, torch.from_numpy(np.asarray(sigma, dtype=np.float64)))

    def forward_latents(self, clean: torch.Tensor, noise: torch.Tensor, timestep: np.ndarray,
                        sigma: np.ndarray | None) -> torch.Tensor:
        """x_σ = (1−σ)·x0 + σ·ε for both images of each row, one ε per row (Flow-DPO's input)."""
        assert sigma is not None
        both = noise.unsqueeze(1).expand(-1, 2, *noise.shape[1:]).reshape(-1, *noise.shape[1:])
        flat = clean.reshape(-1, *clean.shape[2:])
        levels = torch.from_numpy(np.repeat(np.asarray(sigma, dtype=np.float64), 2))
        return flow.forward_noised(flat, both, levels).reshape(clean.shape)

    def forward_target(self, clean: torch.Tensor, noise: torch.Tensor, timestep: np.ndarray,
                       sigma: np.ndarray | None) -> torch.Tensor:
        """Flow-DPO's velocity target ε − x0."""
        return noise.unsqueeze(1) - clean


Process = DiffusionProcess | FlowProcess


def process_for(family: Any, scheduler_config: dict[str, Any], alphas_cumprod: torch.Tensor | None,
                latent_shape: tuple[int, int, int] | None = None, options: dict[str, Any] | None = None) -> Process:
    """The process of a family's scheduler (options: the store's recorded σ sampling)."""
    options = options or {}
    if family.process_kind == "flow":
        side = (latent_shape[1] * latent_shape[2]) // 4 if latent_shape else 0
        return FlowProcess(dict(scheduler_config), int(options.get("image_tokens", side)),
                           options.get("sigma_sampling", "logit-normal"), float(options.get("logit_mean", 0.0)),
                           float(options.get("logit_std", 1.0)))
    assert alphas_cumprod is not None
    return DiffusionProcess(alphas_cumprod, dict(scheduler_config), scheduler_config.get("prediction_type", "epsilon"))


def process_from_settings(settings: dict[str, Any]) -> Process:
    """The process a store was made with (stores before flow support hold ε-model settings)."""
    from inpo_pipeline.families import family_named
    from inpo_pipeline.models.reference import alphas_cumprod_from_config

    family = family_named(settings["family"])
    scheduler = settings["scheduler"]
    alphas = None if family.process_kind == "flow" else alphas_cumprod_from_config(scheduler)
    return process_for(family, scheduler, alphas, options=settings.get("process", {}))

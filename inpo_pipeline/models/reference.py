"""Loading a pipeline's parts for stage one, identifying the reference weights, and calling them.

The family (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1) is read from the pipeline's ``model_index.json``
and decides how parts load and how the denoiser is called (``inpo_pipeline.families``); the
noise process decides what its output means (``inpo_pipeline.method.processes``). Everything is loaded
part by part through ``from_pretrained``, the same path for a hub id and a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from inpo_pipeline.families import FAMILIES, Family, ModelError, TextEncoders, fingerprint_module, load_json
from inpo_pipeline.families import detect_family as detect_family_spec
from inpo_pipeline.families.base import load_part
from inpo_pipeline.families.stable_diffusion import TIME_ID_MODES, constant_time_ids, sdxl_time_ids
from inpo_pipeline.method.processes import PREDICTIONS, Process, process_for

SD15 = "sd15"
SDXL = "sdxl"
SD3 = "sd3"
FLUX = "flux"
_load_json = load_json

__all__ = ["FAMILIES", "ModelError", "TextEncoders", "TIME_ID_MODES", "constant_time_ids", "sdxl_time_ids",
           "fingerprint_module"]


def detect_family(model: str) -> str:
    """The family's name ('sd15', 'sdxl', 'sd3', 'flux') from the pipeline's model_index.json."""
    return detect_family_spec(model).name


def load_scheduler_config(model: str, family: Family | None = None) -> dict[str, Any]:
    """The pipeline's scheduler config; a UNet's prediction type must be ε or v."""
    config = _load_json(model, "scheduler_config.json", "scheduler")
    if not config:
        raise ModelError(f"{model} has no scheduler/scheduler_config.json")
    prediction = config.get("prediction_type", "epsilon")
    if (family is None or family.process_kind == "diffusion") and prediction not in PREDICTIONS:
        raise ModelError(
            f"{model} predicts {prediction!r}; inpo supports {' and '.join(PREDICTIONS)} UNets and flow-matching "
            "transformers (SD3, FLUX)"
        )
    return config


def alphas_cumprod_from_config(config: dict[str, Any]) -> torch.Tensor:
    """ā_t for t = 0..T-1 in float64, from the scheduler's beta schedule."""
    from diffusers import DDIMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    scheduler = DDIMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
    return scheduler.alphas_cumprod.to(torch.float64)


def load_unet(model: str, unet_path: str | None = None) -> torch.nn.Module:
    """The reference (or starting) denoiser, UNet or transformer, in float32, eval mode, gradients off."""
    return detect_family_spec(model).load_denoiser(model, unet_path)


def load_vae(model: str, vae_path: str | None = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return load_part(AutoencoderKL, "VAE", "vae", model, vae_path)


@dataclass
class ReferenceModel:
    """Everything stage one needs from a pipeline, plus the facts recorded in the store."""

    model: str
    family: str
    unet: torch.nn.Module  # the denoiser: a UNet, or the transformer of a flow family
    vae: torch.nn.Module | None
    text: TextEncoders | None
    scheduler_config: dict[str, Any]
    alphas_cumprod: torch.Tensor | None  # None for flow families
    unet_fingerprint: str
    unet_path: str | None = None
    vae_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32

    @property
    def spec(self) -> Family:
        """The family's behaviour (loading, encoding, calling the denoiser)."""
        return FAMILIES[self.family]

    def process(self, resolution: int, options: dict[str, Any] | None = None) -> Process:
        """The noise process at `resolution` (flow: with the σ sampling of `options`)."""
        return process_for(self.spec, self.scheduler_config, self.alphas_cumprod,
                           self.latent_shape(resolution), options)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae_scale_factor
        return self.spec.latent_channels(self.unet), side, side

    def denoise(self, latents: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The reference denoiser's output in float32 under the compute precision."""
        guidance = self.extra.get("guidance_embedding")
        guidance_tensor = None if guidance is None else torch.tensor([float(guidance)])
        with self.autocast():
            return self.spec.denoise(self.unet, latents, labels, text, pooled, time_ids, guidance_tensor).float()

    def autocast(self) -> Any:
        """The precision context of every UNet call (see :meth:`to`)."""
        import contextlib

        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        device = next(self.unet.parameters()).device
        return torch.autocast(device.type, dtype=self.compute_dtype)

    @property
    def vae_scale_factor(self) -> int:
        assert self.vae is not None
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_downsampling(self) -> int:
        return self.spec.denoiser_downsampling(self.unet)

    @property
    def native_resolution(self) -> int:
        assert self.vae is not None
        return self.spec.native_resolution(self.unet, self.vae)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def steps_offset(self) -> int:
        return int(self.scheduler_config.get("steps_offset", 0))

    def check_resolution(self, resolution: int) -> None:
        multiple = self.vae_scale_factor * self.unet_downsampling
        if resolution < multiple or resolution % multiple:
            raise ModelError(
                f"--resolution {resolution} is not a multiple of {multiple} "
                f"(VAE factor {self.vae_scale_factor} × {self.spec.denoiser_label} downsampling {self.unet_downsampling})"
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> ReferenceModel:
        """Move the parts to `device`; UNet calls then run in `dtype` under autocast.

        The weights stay float32 and reduced precision comes from autocast, exactly as
        `inpo train --mixed-precision bf16|fp16` runs the policy: the cached e_ref and the
        trainer's e_θ then carry the same rounding, and the step-0 loss stays log 2.
        """
        self.unet.to(device=device)
        self.compute_dtype = dtype
        if self.vae is not None:
            # the VAE stays float32: SD's VAE overflows in fp16 and encoding is a small cost
            self.vae.to(device=device)
        if self.text is not None:
            for encoder in self.text.encoders:
                encoder.to(device=device)
        return self

    @torch.no_grad()
    def encode_latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, float32, in the VAE's own units (see :meth:`to_model_latent`)."""
        assert self.vae is not None
        vae_device = next(self.vae.parameters()).device
        distribution = self.vae.encode(pixels.to(vae_device, torch.float32)).latent_dist
        return distribution.mean.float(), distribution.std.float()

    def to_model_latent(self, vae_latent: torch.Tensor) -> torch.Tensor:
        """(VAE latent − shift) × scaling factor: the latents the UNet sees (DESIGN §1 notation).

        Applied after drawing a posterior sample, in the authors' order (``sample() × scale``).
        """
        assert self.vae is not None
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((vae_latent - shift) * self.vae.config.scaling_factor).float()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior means in model-latent units (the deterministic x0 of `--vae-latent mean`)."""
        return self.to_model_latent(self.encode_latent_distribution(pixels)[0])


def load_reference(
    model: str,
    *,
    unet_path: str | None = None,
    vae_path: str | None = None,
    with_vae: bool = True,
    with_text: bool = True,
) -> ReferenceModel:
    """Load the frozen reference pipeline parts named by MODEL (and optional overrides)."""
    family = detect_family_spec(model)
    scheduler_config = load_scheduler_config(model, family)
    unet = family.load_denoiser(model, unet_path)
    vae = load_vae(model, vae_path) if with_vae else None
    text = family.load_text(model) if with_text else None
    family.check_denoiser(unet, text, model)
    guidance = family.guidance_embedding(unet)
    return ReferenceModel(
        model=model,
        family=family.name,
        unet=unet,
        vae=vae,
        text=text,
        scheduler_config=dict(scheduler_config),
        alphas_cumprod=alphas_cumprod_from_config(scheduler_config) if family.process_kind == "diffusion" else None,
        unet_fingerprint=fingerprint_module(unet),
        unet_path=unet_path,
        vae_path=vae_path,
        extra={} if guidance is None else {"guidance_embedding": guidance},
    )


def unet_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embedding: torch.Tensor,
    pooled_embedding: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε(x, t, c) of a Stable Diffusion UNet with per-row timesteps; SDXL extras when given."""
    return FAMILIES[SD15].denoise(unet, latents, timesteps, text_embedding, pooled_embedding, time_ids)

"""Loading a diffusers pipeline's parts, identifying the reference weights, and calling them.

SD1.5-type pipelines have one CLIP text encoder; SDXL-type ones have two, a pooled embedding
and size/crop "time ids". The family is read from the pipeline's ``model_index.json``.
Everything is loaded part by part through ``from_pretrained``, the same path for a hub id and
a local folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SD15 = "sd15"
SDXL = "sdxl"
FAMILIES = (SD15, SDXL)


class ModelError(Exception):
    """A model that cannot be used; the message is one line for the user."""


def _load_json(model: str, filename: str, subfolder: str | None = None) -> dict[str, Any]:
    """A config file of a local folder or a hub repository."""
    local = Path(model) / (subfolder or "") / filename
    if Path(model).is_dir():
        if not local.exists():
            return {}
        return json.loads(local.read_text())
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, filename, subfolder=subfolder)
    except Exception as error:
        raise ModelError(
            f"cannot find model {model!r}: not a local folder, and the hub lookup failed ({type(error).__name__})"
        ) from error
    return json.loads(Path(path).read_text())


def detect_family(model: str) -> str:
    """'sd15' or 'sdxl' from the pipeline's model_index.json."""
    index = _load_json(model, "model_index.json")
    if not index:
        raise ModelError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index:
            raise ModelError(f"{model} has no {part!r} in model_index.json; expected an SD1.5 or SDXL pipeline")
    return SDXL if "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] else SD15


def load_scheduler_config(model: str) -> dict[str, Any]:
    config = _load_json(model, "scheduler_config.json", "scheduler")
    if not config:
        raise ModelError(f"{model} has no scheduler/scheduler_config.json")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelError(
            f"{model} predicts {prediction!r}; inpo supports only epsilon-prediction models for now"
        )
    return config


def alphas_cumprod_from_config(config: dict[str, Any]) -> torch.Tensor:
    """ā_t for t = 0..T-1 in float64, from the scheduler's beta schedule."""
    from diffusers import DDIMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    scheduler = DDIMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
    return scheduler.alphas_cumprod.to(torch.float64)


def _part_location(path: str, subfolder: str) -> tuple[str, str | None]:
    """Accept either a bare component folder or a pipeline folder holding `subfolder`."""
    candidate = Path(path)
    if candidate.is_dir() and (candidate / "config.json").exists():
        return path, None
    if candidate.is_dir() and (candidate / subfolder / "config.json").exists():
        return path, subfolder
    if candidate.exists():
        raise ModelError(f"{path} holds no {subfolder} (no config.json there or in {subfolder}/)")
    return path, subfolder


def _load_part(model_class: Any, label: str, subfolder: str, model: str, override: str | None) -> torch.nn.Module:
    """One frozen float32 part: from `override` (a part or pipeline folder) or MODEL/subfolder."""
    location, folder = _part_location(override, subfolder) if override else (model, subfolder)
    try:
        part = model_class.from_pretrained(location, subfolder=folder, torch_dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a {label} from {location}: {str(error).splitlines()[0]}") from error
    return part.eval().requires_grad_(False)


def load_unet(model: str, unet_path: str | None = None) -> torch.nn.Module:
    """The reference (or starting) UNet in float32, in eval mode, gradients off."""
    from diffusers import UNet2DConditionModel

    return _load_part(UNet2DConditionModel, "UNet", "unet", model, unet_path)


def load_vae(model: str, vae_path: str | None = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return _load_part(AutoencoderKL, "VAE", "vae", model, vae_path)


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, shape, float32 bytes), in name order.

    Identifies the weights themselves, not the file they came from: the same UNet saved as
    safetensors or as a .bin gives the same fingerprint; one changed weight gives another.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TextEncoders:
    """The tokenizer(s) and text encoder(s) of one pipeline."""

    family: str
    tokenizers: list[Any]
    encoders: list[torch.nn.Module]

    @property
    def embedding_shape(self) -> tuple[int, int]:
        length = self.tokenizers[0].model_max_length
        width = sum(encoder.config.hidden_size for encoder in self.encoders)
        return length, width

    @property
    def pooled_dim(self) -> int | None:
        if self.family != SDXL:
            return None
        return int(self.encoders[-1].config.projection_dim)

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token embeddings (B, L, D) and, for SDXL, pooled embeddings (B, D2); float32.

        SD1.5: the encoder's last hidden state. SDXL: the penultimate hidden states of both
        encoders concatenated, and the second encoder's projected pooled output, as the SDXL
        pipeline conditions its UNet.
        """
        hidden: list[torch.Tensor] = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            tokens = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(device)
            if self.family == SD15:
                hidden.append(encoder(tokens)[0].float())
            else:
                output = encoder(tokens, output_hidden_states=True)
                hidden.append(output.hidden_states[-2].float())
                if hasattr(output, "text_embeds"):
                    pooled = output.text_embeds.float()
        return torch.cat(hidden, dim=-1), pooled


def load_text_encoders(model: str, family: str) -> TextEncoders:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")]
        encoders: list[torch.nn.Module] = [
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
        ]
        if family == SDXL:
            tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    model, subfolder="text_encoder_2", torch_dtype=torch.float32
                )
            )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the text encoder(s) of {model}: {str(error).splitlines()[0]}") from error
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    return TextEncoders(family, tokenizers, encoders)


@dataclass
class ReferenceModel:
    """Everything stage one needs from a pipeline, plus the facts recorded in the store."""

    model: str
    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text: TextEncoders | None
    scheduler_config: dict[str, Any]
    alphas_cumprod: torch.Tensor
    unet_fingerprint: str
    unet_path: str | None = None
    vae_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32

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
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

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
                f"(VAE factor {self.vae_scale_factor} × UNet downsampling {self.unet_downsampling})"
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
    family = detect_family(model)
    scheduler_config = load_scheduler_config(model)
    unet = load_unet(model, unet_path)
    if family == SDXL and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ModelError(f"the UNet for {model} is not SDXL-shaped (no text_time embedding) but the pipeline is")
    vae = load_vae(model, vae_path) if with_vae else None
    text = load_text_encoders(model, family) if with_text else None
    if text is not None:
        width = text.embedding_shape[1]
        if width != unet.config.cross_attention_dim:
            raise ModelError(
                f"the text encoders give {width}-wide embeddings but the UNet expects "
                f"{unet.config.cross_attention_dim}: the UNet does not belong to this pipeline"
            )
    return ReferenceModel(
        model=model,
        family=family,
        unet=unet,
        vae=vae,
        text=text,
        scheduler_config=dict(scheduler_config),
        alphas_cumprod=alphas_cumprod_from_config(scheduler_config),
        unet_fingerprint=fingerprint_module(unet),
        unet_path=unet_path,
        vae_path=vae_path,
    )


def unet_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embedding: torch.Tensor,
    pooled_embedding: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε(x, t, c) with per-row timesteps, in the UNet's dtype; SDXL extras when given."""
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    added = None
    if pooled_embedding is not None:
        assert time_ids is not None
        added = {"text_embeds": pooled_embedding.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
    return unet(
        latents.to(device, dtype),
        timesteps.to(device),
        encoder_hidden_states=text_embedding.to(device, dtype),
        added_cond_kwargs=added,
    ).sample


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> np.ndarray:
    """SDXL's size conditioning: (orig h, orig w, crop top, crop left, target h, target w)."""
    return np.array([*original_size, *crop_top_left, resolution, resolution], dtype=np.float32)


TIME_ID_MODES = ("original", "constant")


def constant_time_ids(resolution: int) -> np.ndarray:
    """The authors' SDXL conditioning (R, R, 0, 0, R, R) whatever the image's size (DESIGN §1.5)."""
    return sdxl_time_ids((resolution, resolution), (0, 0), resolution)

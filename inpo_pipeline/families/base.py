"""What a model family is to inpo: how to load its parts, encode prompts, and call its denoiser.

A family is one small module (``stable_diffusion.py``, ``sd3.py``, ``flux.py``) registered in
``families/__init__.py``. Everything that differs between families lives behind this interface,
so the stage runners never branch on a family's name: they call ``family.denoise`` and the
family's noise process (``inpo_pipeline.method.processes``) and get the same kind of answer from all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class ModelError(Exception):
    """A model that cannot be used; the message is one line for the user."""


def load_json(model: str, filename: str, subfolder: str | None = None) -> dict[str, Any]:
    """A config file of a local folder or a hub repository ({} when a local folder lacks it)."""
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


def part_location(path: str, subfolder: str) -> tuple[str, str | None]:
    """Accept either a bare component folder or a pipeline folder holding `subfolder`."""
    candidate = Path(path)
    if candidate.is_dir() and (candidate / "config.json").exists():
        return path, None
    if candidate.is_dir() and (candidate / subfolder / "config.json").exists():
        return path, subfolder
    if candidate.exists():
        raise ModelError(f"{path} holds no {subfolder} (no config.json there or in {subfolder}/)")
    return path, subfolder


def load_part(model_class: Any, label: str, subfolder: str, model: str, override: str | None) -> torch.nn.Module:
    """One frozen float32 part: from `override` (a part or pipeline folder) or MODEL/subfolder."""
    location, folder = part_location(override, subfolder) if override else (model, subfolder)
    try:
        part = model_class.from_pretrained(location, subfolder=folder, torch_dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a {label} from {location}: {str(error).splitlines()[0]}") from error
    return part.eval().requires_grad_(False)


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
    """A family's tokenizer(s) and text encoder(s), and how it turns prompts into conditioning."""

    family: Family
    model: str
    parts: dict[str, Any]

    def encode(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token embeddings (B, L, D) and pooled embeddings (B, D2) or None; float32."""
        with torch.no_grad():
            text, pooled = self.family.encode_prompts(self, list(texts), device)
        return text.float(), None if pooled is None else pooled.float()

    @property
    def encoders(self) -> list[torch.nn.Module]:
        return [part for part in self.parts.values() if isinstance(part, torch.nn.Module)]

    def _shapes(self) -> tuple[tuple[int, int], int | None]:
        if not hasattr(self, "_cached_shapes"):
            device = self.encoders[0].device if self.encoders else torch.device("cpu")
            text, pooled = self.encode([""], device)
            self._cached_shapes = ((int(text.shape[1]), int(text.shape[2])),
                                   None if pooled is None else int(pooled.shape[-1]))
        return self._cached_shapes

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """(tokens, width) of one prompt's embedding, as stored."""
        return self._shapes()[0]

    @property
    def pooled_dim(self) -> int | None:
        return self._shapes()[1]


class Family:
    """One model family. Subclasses set the class attributes and implement the hooks."""

    name: str = ""
    pipeline_class: str = ""  # the diffusers pipeline's class name
    denoiser_folder: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    lora_layers_argument: str = "unet_lora_layers"  # of the pipeline's save_lora_weights
    size_conditioning: bool = False  # SDXL's per-image time ids
    default_optimizer: str = "adamw"
    default_gradient_checkpointing: bool = False
    default_sampling_guidance: float = 7.5
    process_kind: str = "diffusion"  # "diffusion" (DDPM ā, ε or v) or "flow" (DESIGN §1.8)
    pipeline_extras: dict[str, Any] = {}  # from_pretrained keywords (no safety checker, ...)

    # ------------------------------------------------------------------ recognising and loading
    def matches(self, index: dict[str, Any]) -> bool:
        """Whether a pipeline's model_index.json belongs to this family."""
        raise NotImplementedError

    def pipeline_kwargs(self, model: str) -> dict[str, Any]:
        """Keywords of the family pipeline's from_pretrained for `model` (no safety checker, absent parts)."""
        return dict(self.pipeline_extras)

    def diffusers_class(self, name: str | None = None) -> Any:
        import diffusers

        return getattr(diffusers, name or self.pipeline_class)

    def load_denoiser(self, model: str, override: str | None = None) -> torch.nn.Module:
        """The UNet or transformer in float32, eval mode, gradients off."""
        return load_part(self.diffusers_class(self.denoiser_class), self.denoiser_label, self.denoiser_folder,
                         model, override)

    @property
    def denoiser_label(self) -> str:
        return "UNet" if self.denoiser_folder == "unet" else "transformer"

    def load_text(self, model: str) -> TextEncoders:
        raise NotImplementedError

    def encode_prompts(self, text: TextEncoders, texts: list[str],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def check_denoiser(self, denoiser: torch.nn.Module, text: TextEncoders | None, model: str) -> None:
        """Refuse a UNet/transformer that does not belong to this pipeline (one line)."""

    # ------------------------------------------------------------------ geometry
    def latent_channels(self, denoiser: torch.nn.Module) -> int:
        return int(denoiser.config.in_channels)

    def denoiser_downsampling(self, denoiser: torch.nn.Module) -> int:
        """How many latent pixels one side of the denoiser's coarsest grid spans."""
        return 2 ** (len(denoiser.config.block_out_channels) - 1)

    def native_resolution(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> int:
        """The image side the model was trained at: the denoiser's latent sample size × the VAE's factor."""
        return int(denoiser.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ calling
    def denoise(self, denoiser: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                text: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's raw output (ε, v or velocity: see the process) at per-row labels."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling (`inpo sample`)
    samplers: dict[str, str] = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpm++": "DPMSolverMultistepScheduler",
    }
    default_sampler: str = "ddim"
    sampling_call_extras: dict[str, Any] = {"eta": 0.0}  # keywords of every pipeline call

    def pipeline_call_extras(self, pipeline: Any) -> dict[str, Any]:
        """Keywords of every sampling call of this pipeline (so it conditions as stage one encoded)."""
        return dict(self.sampling_call_extras)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Initial noise (B, C, H, W) in the layout the pipeline's `latents=` expects."""
        return latents

    def pipeline_text_widths(self, pipeline: Any) -> tuple[int, int | None]:
        """(per-token width, pooled width or None) the pipeline's text encoders give, from their configs."""
        raise NotImplementedError

    def denoiser_text_widths(self, denoiser: torch.nn.Module) -> tuple[int, int | None]:
        """(per-token width, pooled width or None) the denoiser expects."""
        raise NotImplementedError

    def check_pipeline_denoiser(self, pipeline: Any, where: str) -> None:
        """One line when the pipeline's denoiser (swapped in from `where`) does not take its text."""
        denoiser = getattr(pipeline, self.denoiser_folder)
        given, expected = self.pipeline_text_widths(pipeline), self.denoiser_text_widths(denoiser)
        if given != expected:
            raise ModelError(
                f"the {self.denoiser_label} from {where} does not fit this {self.name} pipeline: it expects text "
                f"embeddings {expected[0]} wide (pooled {expected[1]}), the pipeline gives {given[0]} (pooled {given[1]})"
            )

    def lora_layers(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained LoRA weights in the key layout the pipeline's `load_lora_weights` reads
        (UNet: diffusers' layout, as its SD LoRA scripts save)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    # ------------------------------------------------------------------ defaults
    def default_beta(self, objective: str) -> float | None:
        return None

    def guidance_embedding(self, denoiser: torch.nn.Module) -> float | None:
        """The value of a guidance-distilled model's guidance input (FLUX.1-dev), else None."""
        return None


def config_of(module: torch.nn.Module) -> Any:
    """The diffusers config of a denoiser, through a DDP wrapper."""
    return getattr(module, "config", None) or module.module.config  # type: ignore[union-attr]


def dtype_and_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(module.parameters())
    return parameter.dtype, parameter.device

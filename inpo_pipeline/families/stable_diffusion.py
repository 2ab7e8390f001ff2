"""Stable Diffusion 1.x/2.x (one CLIP encoder) and SDXL (two, pooled embedding, size time ids).

Both are UNet families on the DDPM schedule; whether the UNet predicts ε or v is the
scheduler's ``prediction_type`` and is handled by the process (``inpo_pipeline.method.processes``),
not here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inpo_pipeline.families.base import Family, ModelError, TextEncoders, dtype_and_device


class StableDiffusion(Family):
    """SD 1.x / 2.x: `StableDiffusionPipeline`, the text encoder's last hidden state."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    default_sampling_guidance = 7.5
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),)

    def matches(self, index: dict[str, Any]) -> bool:
        has_unet = bool(index.get("unet", [None])[0])
        return has_unet and not (index.get("text_encoder_2") or [None])[0]

    def default_beta(self, objective: str) -> float | None:
        return {"inpo": 2000.0, "diffusion-dpo": 5000.0}.get(objective)

    def load_text(self, model: str) -> TextEncoders:
        import transformers

        parts: dict[str, Any] = {}
        try:
            for tokenizer, encoder, encoder_class in self.text_parts:
                parts[tokenizer] = transformers.CLIPTokenizer.from_pretrained(model, subfolder=tokenizer)
                parts[encoder] = getattr(transformers, encoder_class).from_pretrained(
                    model, subfolder=encoder, torch_dtype=torch.float32).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load the text encoder(s) of {model}: {str(error).splitlines()[0]}") from error
        return TextEncoders(self, model, parts)

    def _token_ids(self, tokenizer: Any, texts: list[str], device: torch.device) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)

    def encode_prompts(self, text: TextEncoders, texts: list[str],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's last hidden state, as StableDiffusionPipeline conditions its UNet."""
        tokens = self._token_ids(text.parts["tokenizer"], texts, device)
        return text.parts["text_encoder"](tokens)[0].float(), None

    def check_denoiser(self, denoiser: torch.nn.Module, text: TextEncoders | None, model: str) -> None:
        if getattr(denoiser.config, "addition_embed_type", None) == "text_time":
            raise ModelError(f"the UNet for {model} is SDXL-shaped (text_time embedding) but the pipeline is not")
        self._check_width(denoiser, text)

    def _check_width(self, denoiser: torch.nn.Module, text: TextEncoders | None) -> None:
        if text is None:
            return
        width = text.embedding_shape[1]
        if width != denoiser.config.cross_attention_dim:
            raise ModelError(
                f"the text encoders give {width}-wide embeddings but the UNet expects "
                f"{denoiser.config.cross_attention_dim}: the UNet does not belong to this pipeline"
            )

    def pipeline_text_widths(self, pipeline: Any) -> tuple[int, int | None]:
        encoders = [getattr(pipeline, encoder) for _, encoder, _ in self.text_parts]
        pooled = int(encoders[-1].config.projection_dim) if self.size_conditioning else None
        return sum(int(encoder.config.hidden_size) for encoder in encoders), pooled

    def denoiser_text_widths(self, denoiser: torch.nn.Module) -> tuple[int, int | None]:
        config = denoiser.config
        sdxl_unet = getattr(config, "addition_embed_type", None) == "text_time"
        pooled = None
        if sdxl_unet:
            # the added embedding takes the pooled text and 6 Fourier-embedded size ids
            pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
        return int(config.cross_attention_dim), pooled

    def denoise(self, denoiser: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                text: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """ε (or v) of the UNet with per-row integer timesteps; SDXL's extras when given."""
        dtype, device = dtype_and_device(denoiser)
        added = None
        if pooled is not None:
            assert time_ids is not None
            added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
        return denoiser(latents.to(device, dtype), labels.to(device), encoder_hidden_states=text.to(device, dtype),
                        added_cond_kwargs=added).sample


class StableDiffusionXL(StableDiffusion):
    """SDXL: `StableDiffusionXLPipeline`, two CLIP encoders, pooled embedding, size time ids."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_extras: dict[str, Any] = {}
    size_conditioning = True
    default_optimizer = "adafactor"
    default_gradient_checkpointing = True
    default_sampling_guidance = 5.0
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),
                  ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))

    def matches(self, index: dict[str, Any]) -> bool:
        return bool(index.get("unet", [None])[0]) and bool((index.get("text_encoder_2") or [None])[0])

    def default_beta(self, objective: str) -> float | None:
        return {"inpo": 5000.0, "diffusion-dpo": 5000.0}.get(objective)

    def encode_prompts(self, text: TextEncoders, texts: list[str],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The penultimate hidden states of both encoders concatenated, and the second encoder's
        projected pooled output, as the SDXL pipeline conditions its UNet."""
        hidden, pooled = [], None
        for tokenizer, encoder, _ in self.text_parts:
            tokens = self._token_ids(text.parts[tokenizer], texts, device)
            output = text.parts[encoder](tokens, output_hidden_states=True)
            hidden.append(output.hidden_states[-2].float())
            if hasattr(output, "text_embeds"):
                pooled = output.text_embeds.float()
        return torch.cat(hidden, dim=-1), pooled

    def check_denoiser(self, denoiser: torch.nn.Module, text: TextEncoders | None, model: str) -> None:
        if getattr(denoiser.config, "addition_embed_type", None) != "text_time":
            raise ModelError(f"the UNet for {model} is not SDXL-shaped (no text_time embedding) but the pipeline is")
        self._check_width(denoiser, text)


TIME_ID_MODES = ("original", "constant")


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> np.ndarray:
    """SDXL's size conditioning: (orig h, orig w, crop top, crop left, target h, target w)."""
    return np.array([*original_size, *crop_top_left, resolution, resolution], dtype=np.float32)


def constant_time_ids(resolution: int) -> np.ndarray:
    """The authors' SDXL conditioning (R, R, 0, 0, R, R) whatever the image's size (DESIGN §1.5)."""
    return sdxl_time_ids((resolution, resolution), (0, 0), resolution)

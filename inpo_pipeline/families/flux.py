"""FLUX.1: `FluxTransformer2DModel`, CLIP (pooled) + T5, 2×2-packed latents, position ids,
the guidance embedding of guidance-distilled models and a resolution-dependent shift.

The store keeps latents unpacked (C, H, W) like every other family; packing, the image and
text position ids and the guidance value are applied here, on every call, exactly as
``FluxPipeline`` does (its own static helpers are used).
"""

from __future__ import annotations

from typing import Any

import torch

from inpo_pipeline.families.base import TextEncoders, config_of, dtype_and_device
from inpo_pipeline.families.transformer import FlowTransformerFamily

DEFAULT_GUIDANCE_EMBEDDING = 3.5
"""FluxPipeline's default guidance_scale: what FLUX.1-dev's guidance embedding sees when sampling."""


class Flux(FlowTransformerFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    default_sampling_guidance = 3.5
    text_parts = (("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModel"),
                  ("tokenizer_2", "text_encoder_2", "T5TokenizerFast", "T5EncoderModel"))
    pipeline_sequence_length = 512

    def matches(self, index: dict[str, Any]) -> bool:
        return index.get("_class_name", "") == "FluxPipeline"

    def encode_prompts(self, text: TextEncoders, texts: list[str],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled, _ids = self.text_pipeline(text).encode_prompt(
            texts, texts, device=device, max_sequence_length=self.sequence_length(text))
        return embeds, pooled

    def latent_channels(self, denoiser: torch.nn.Module) -> int:
        return int(config_of(denoiser).in_channels) // 4  # the transformer sees 2×2 patches packed into channels

    def denoiser_downsampling(self, denoiser: torch.nn.Module) -> int:
        return 2  # the 2×2 packing

    def native_resolution(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> int:
        """FluxTransformer2DModel records no sample size; the VAE's (1024 for FLUX.1) is the image side."""
        return int(vae.config.sample_size)

    def guidance_embedding(self, denoiser: torch.nn.Module) -> float | None:
        return DEFAULT_GUIDANCE_EMBEDDING if getattr(config_of(denoiser), "guidance_embeds", False) else None

    def pipeline_text_widths(self, pipeline: Any) -> tuple[int, int | None]:
        return int(pipeline.text_encoder_2.config.d_model), int(pipeline.text_encoder.config.hidden_size)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """FluxPipeline takes `latents=` packed into 2×2 patches."""
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def denoise(self, denoiser: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                text: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity (unpacked to (B, C, H, W)) at timestep 1000·σ, called as FluxPipeline calls it:
        packed 2×2 latents, image ids (row, column), zero text ids, timestep σ, and the guidance value."""
        from diffusers import FluxPipeline

        dtype, device = dtype_and_device(denoiser)
        assert pooled is not None, "FLUX needs pooled projections"
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents.to(device, dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        if getattr(config_of(denoiser), "guidance_embeds", False):
            value = guidance if guidance is not None else torch.full((batch,), DEFAULT_GUIDANCE_EMBEDDING)
            guidance = value.to(device, torch.float32).expand(batch)
        else:
            guidance = None
        output = denoiser(hidden_states=packed, timestep=(labels.to(device, dtype) / 1000), guidance=guidance,
                          pooled_projections=pooled.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                          txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return output.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            batch, channels, height, width)

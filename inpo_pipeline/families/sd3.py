"""Stable Diffusion 3 / 3.5: `SD3Transformer2DModel`, CLIP-L + CLIP-G + T5, pooled projections,
a static shift.

Prompts are encoded by the pipeline's own ``encode_prompt`` (on a pipeline holding only the
text parts), so the stored conditioning is exactly what ``StableDiffusion3Pipeline`` feeds its
transformer when sampling. The T5 sequence length is min(tokenizer_3's model_max_length, 256),
256 being the pipeline's default; without a T5 encoder (SD3's documented memory option) the
pipeline's zeros stand in.
"""

from __future__ import annotations

from typing import Any

import torch

from inpo_pipeline.families.base import TextEncoders, dtype_and_device
from inpo_pipeline.families.transformer import FlowTransformerFamily


class StableDiffusion3(FlowTransformerFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    default_sampling_guidance = 7.0
    text_parts = (("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModelWithProjection"),
                  ("tokenizer_2", "text_encoder_2", "CLIPTokenizer", "CLIPTextModelWithProjection"),
                  ("tokenizer_3", "text_encoder_3", "T5TokenizerFast", "T5EncoderModel"))
    pipeline_sequence_length = 256
    optional_encoders = ("text_encoder_3",)

    def matches(self, index: dict[str, Any]) -> bool:
        return index.get("_class_name", "").startswith("StableDiffusion3")

    def text_pipeline(self, text: TextEncoders) -> Any:
        """The text-only pipeline; without T5 its encode_prompt reads the transformer's
        joint_attention_dim for the zeros that stand in, so it is given that config alone."""
        pipeline = super().text_pipeline(text)
        if text.parts.get("text_encoder_3") is None and pipeline.transformer is None:
            from types import SimpleNamespace

            from diffusers import SD3Transformer2DModel

            config = SD3Transformer2DModel.load_config(text.model, subfolder=self.denoiser_folder)
            # bypasses DiffusionPipeline.__setattr__, which would register the stand-in as a component
            object.__setattr__(pipeline, "transformer", SimpleNamespace(config=SimpleNamespace(**config)))
        return pipeline

    def encode_prompts(self, text: TextEncoders, texts: list[str],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, _, pooled, _ = self.text_pipeline(text).encode_prompt(
            texts, texts, texts, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.sequence_length(text))
        return embeds, pooled

    def pipeline_text_widths(self, pipeline: Any) -> tuple[int, int | None]:
        clip = [pipeline.text_encoder, pipeline.text_encoder_2]
        pooled = sum(int(encoder.config.projection_dim) for encoder in clip)
        t5 = pipeline.text_encoder_3
        # without T5 the pipeline pads with zeros of the transformer's own width
        width = int(t5.config.d_model) if t5 is not None else int(pipeline.transformer.config.joint_attention_dim)
        return width, pooled

    def denoiser_downsampling(self, denoiser: torch.nn.Module) -> int:
        return int(denoiser.config.patch_size)

    def denoise(self, denoiser: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                text: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity v ≈ ε − x0 at timestep 1000·σ (DESIGN §1.8), as the SD3 pipeline calls it."""
        dtype, device = dtype_and_device(denoiser)
        assert pooled is not None, "SD3 needs pooled projections"
        return denoiser(hidden_states=latents.to(device, dtype), timestep=labels.to(device, dtype),
                        encoder_hidden_states=text.to(device, dtype), pooled_projections=pooled.to(device, dtype),
                        return_dict=False)[0]

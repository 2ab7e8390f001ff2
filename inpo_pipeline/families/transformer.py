"""What the flow-matching transformer families (SD3, FLUX.1) share: a `transformer/` denoiser
with joint attention over text and image tokens, a velocity output (DESIGN §1.8), CLIP + T5 text
encoded by the family pipeline's own ``encode_prompt``, LoRA on the joint attention's projections
saved in peft's keys, and the pipeline's own FlowMatch Euler sampler."""

from __future__ import annotations

from typing import Any

import torch

from inpo_pipeline.families.base import Family, ModelError, TextEncoders, load_json

TRANSFORMER_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
"""The joint attention's image and text projections (diffusers' SD3/FLUX LoRA training targets)."""

FLOW_BETA = {"inpo": 100.0, "diffusion-dpo": 100.0}
"""β of the flow families (velocity errors): calibrated in the flow shapes world (docs/proof.md,
"Flow models"); the β/2 · Δe convention is the ε-models', the error space is the velocity's."""


class FlowTransformerFamily(Family):
    """The shared part of SD3 and FLUX; subclasses set the pipeline, the text parts and `denoise`."""

    denoiser_folder = "transformer"
    lora_targets = TRANSFORMER_LORA_TARGETS
    lora_layers_argument = "transformer_lora_layers"
    default_gradient_checkpointing = True
    process_kind = "flow"
    samplers = {"flow-euler": "FlowMatchEulerDiscreteScheduler"}  # the pipeline's own sampler
    default_sampler = "flow-euler"
    sampling_call_extras: dict[str, Any] = {}
    # (tokenizer folder, encoder folder, tokenizer class, encoder class); the last one is T5
    text_parts: tuple[tuple[str, str, str, str], ...] = ()
    pipeline_sequence_length = 256  # the pipeline's default max_sequence_length
    optional_encoders: tuple[str, ...] = ()  # encoders a pipeline may omit (SD3's T5)

    def default_beta(self, objective: str) -> float | None:
        return FLOW_BETA.get(objective)

    def pipeline_kwargs(self, model: str) -> dict[str, Any]:
        """An optional encoder the folder was saved without (SD3 without T5) is passed as None,
        as diffusers' from_pretrained requires."""
        index = load_json(model, "model_index.json")
        absent: dict[str, Any] = {}
        for tokenizer, encoder, _, _ in self.text_parts:
            if encoder in self.optional_encoders and not (index.get(encoder) or [None])[0]:
                absent.update({encoder: None, tokenizer: None})
        return {**self.pipeline_extras, **absent}

    def load_text(self, model: str) -> TextEncoders:
        import transformers

        index = load_json(model, "model_index.json")
        parts: dict[str, Any] = {}
        try:
            for tokenizer, encoder, tokenizer_class, encoder_class in self.text_parts:
                if encoder in self.optional_encoders and not (index.get(encoder) or [None])[0]:
                    parts[tokenizer] = parts[encoder] = None  # the pipeline's zeros stand in
                    continue
                parts[tokenizer] = getattr(transformers, tokenizer_class).from_pretrained(model, subfolder=tokenizer)
                parts[encoder] = getattr(transformers, encoder_class).from_pretrained(
                    model, subfolder=encoder, torch_dtype=torch.float32).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load the text encoder(s) of {model}: {str(error).splitlines()[0]}") from error
        return TextEncoders(self, model, parts)

    def sequence_length(self, text: TextEncoders) -> int:
        """T5 tokens per prompt: min(the T5 tokenizer's model_max_length, the pipeline's default).
        Sampling passes the same `max_sequence_length` (`pipeline_call_extras`): T5 is called
        without an attention mask, so the padding length changes the conditioning."""
        return self._sequence_length(text.parts.get(self.text_parts[-1][0]))

    def _sequence_length(self, tokenizer: Any) -> int:
        limit = getattr(tokenizer, "model_max_length", None) or self.pipeline_sequence_length
        return int(min(limit, self.pipeline_sequence_length))

    def pipeline_call_extras(self, pipeline: Any) -> dict[str, Any]:
        return {"max_sequence_length": self._sequence_length(getattr(pipeline, self.text_parts[-1][0], None))}

    def text_pipeline(self, text: TextEncoders) -> Any:
        """The family's pipeline holding the text parts only: its encode_prompt is the reference."""
        if not hasattr(text, "_pipeline"):
            text._pipeline = self.diffusers_class()(transformer=None, vae=None, scheduler=None,  # type: ignore[attr-defined]
                                                    **text.parts)
        return text._pipeline  # type: ignore[attr-defined]

    def check_denoiser(self, denoiser: torch.nn.Module, text: TextEncoders | None, model: str) -> None:
        if text is None:
            return
        given = (text.embedding_shape[1], text.pooled_dim)
        expected = self.denoiser_text_widths(denoiser)
        if given != expected:
            raise ModelError(
                f"the text encoders give {given[0]}-wide embeddings and {given[1]}-wide pooled ones but the transformer "
                f"expects {expected[0]} and {expected[1]}: it does not belong to {model}"
            )

    def denoiser_text_widths(self, denoiser: torch.nn.Module) -> tuple[int, int | None]:
        return int(denoiser.config.joint_attention_dim), int(denoiser.config.pooled_projection_dim)

    def lora_layers(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """peft's own keys: what the SD3/FLUX pipelines' `load_lora_weights` reads for a transformer
        (diffusers' SD3/FLUX LoRA scripts save them unconverted)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

"""The policy of stage two (a UNet or a flow transformer): loaded from the store's reference,
trained, saved, exported. Everything family-specific comes from `inpo_pipeline.families`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo_pipeline.method import ddim
from inpo_pipeline.data.batches import denoiser_inputs, read_micro_batch
from inpo_pipeline.errors import UserError
from inpo_pipeline.families import family_named, family_of_denoiser
from inpo_pipeline.method.loss import scale_gradient, winner_preserving_scale
from inpo_pipeline.models.reference import fingerprint_module, load_unet
from inpo_pipeline.method.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from inpo_pipeline.method.processes import process_from_settings

LORA_FOLDER = "lora"
PIPELINE_FOLDER = "pipeline"


def load_policy(settings: dict[str, Any], lora_rank: int) -> torch.nn.Module:
    """The reference denoiser named by the store, checked against its fingerprint, made trainable.

    With `lora_rank` > 0 only LoRA adapters on the attention projections (the family's
    `lora_targets`) train; their B matrices start at zero, so the policy starts exactly equal to
    the reference either way.
    """
    family = family_named(settings["family"])
    unet = family.load_denoiser(settings["model"], settings.get("unet"))
    fingerprint = fingerprint_module(unet)
    if fingerprint != settings["unet_fingerprint"]:
        where = settings.get("unet") or settings["model"]
        raise UserError(
            f"the {family.denoiser_label} at {where} has other weights than the store's reference "
            f"(fingerprint {fingerprint[:12]}… vs {settings['unet_fingerprint'][:12]}…); "
            "train from the weights the store was inverted with, or re-invert"
        )
    if lora_rank > 0:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(family.lora_targets)))
    else:
        unet.requires_grad_(True)
    return unet.train()


def _prediction_and_target(policy: torch.nn.Module, batch: dict[str, torch.Tensor],
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's output on a loader micro-batch, and its target, in float32 on `device`.

    The loader hands stored values over in the storage dtype and each prompt once (see
    `batches.assemble_micro_batch`): they become float32 here, on the device (exact), and the
    prompts are repeated for the rejected images."""
    inputs = denoiser_inputs(batch, device)
    output = family_of_denoiser(policy).denoise(
        policy, inputs["latents"], inputs["timesteps"], inputs["text"], inputs.get("pooled"), inputs.get("time_ids"),
        inputs.get("guidance"))
    return output, inputs["targets"]


def policy_errors(
    policy: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """e_θ = mean‖output_θ(x_t, t, c) − target‖² of the chosen images and, in a pairwise batch, the
    rejected ones (DESIGN §1.4; the target is τ_t for InPO and ε for the forward objectives, §1.7,
    or their v / velocity forms for v- and flow models, §1.8)."""
    noise, targets = _prediction_and_target(policy, batch, device)
    errors = ddim.per_sample_mse(noise, targets)
    pairs = len(batch["rows"])
    return errors[:pairs], (errors[pairs:] if len(errors) > pairs else None)


def winner_preserving_policy_errors(
    policy: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, mu: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`policy_errors` of a pairwise batch whose rejected errors carry their gradient scaled by
    λ = `loss.winner_preserving_scale` (values unchanged), and λ."""
    noise, targets = _prediction_and_target(policy, batch, device)
    errors = ddim.per_sample_mse(noise, targets)
    pairs = len(batch["rows"])
    residual = noise.detach().float() - targets.float()
    scale = winner_preserving_scale(residual[:pairs], residual[pairs:], mu)
    return errors[:pairs], scale_gradient(errors[pairs:], scale), scale


def _on(values: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else values.to(device)


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def save_policy(unet: torch.nn.Module, run_dir: Path, family: str, lora_rank: int) -> Path:
    """Full denoiser in diffusers format, or LoRA weights that the family pipeline's
    `load_lora_weights` reads."""
    spec = family_named(family)
    if lora_rank > 0:
        layers = spec.lora_layers(unet)
        target = run_dir / LORA_FOLDER
        spec.diffusers_class().save_lora_weights(save_directory=str(target), safe_serialization=True,
                                                 **{spec.lora_layers_argument: layers})
        return target
    target = run_dir / spec.denoiser_folder
    unet.save_pretrained(str(target), safe_serialization=True)
    return target


def export_pipeline(
    model: str, run_dir: Path, family: str, lora_rank: int, unet: str | None = None, vae: str | None = None,
    target: Path | None = None,
) -> Path:
    """A complete pipeline folder with the trained denoiser (LoRA fused in) that from_pretrained loads.

    `unet`/`vae` are the store's overrides: a LoRA is fused into the reference denoiser it was
    trained on (say an SFT UNet), not into the pipeline's own.
    """
    from diffusers import AutoencoderKL

    spec = family_named(family)
    pipeline_class = spec.diffusers_class()
    parts: dict[str, Any] = {}
    if lora_rank == 0:
        parts[spec.denoiser_folder] = spec.diffusers_class(spec.denoiser_class).from_pretrained(
            str(run_dir / spec.denoiser_folder))
    elif unet:
        parts[spec.denoiser_folder] = load_unet(model, unet)
    if vae:
        parts["vae"] = AutoencoderKL.from_pretrained(vae) if (Path(vae) / "config.json").exists() \
            else AutoencoderKL.from_pretrained(vae, subfolder="vae")
    extra = {key: value for key, value in spec.pipeline_kwargs(model).items() if key != "feature_extractor"}
    pipeline = pipeline_class.from_pretrained(model, **parts, **extra)
    if lora_rank > 0:
        pipeline.load_lora_weights(str(run_dir / LORA_FOLDER))
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    target = target or run_dir / PIPELINE_FOLDER  # default: the run's own pipeline/ folder
    pipeline.save_pretrained(str(target), safe_serialization=True)
    return target


@torch.no_grad()
def preference_metrics(
    policy: torch.nn.Module, store: Any, rows: Any, beta: float, *, empty_prompt: bool = False,
    batch_size: int = 16, device: torch.device | None = None, objective: str = DEFAULT_OBJECTIVE,
) -> dict[str, float]:
    """Mean loss, implicit accuracy and margin of `objective` for `policy` over store rows (no training).

    With the reference as policy this is the step-0 check of DESIGN §2: loss log 2, margin 0
    for the pairwise objectives, margin 0 for SFT.
    """
    spec = OBJECTIVES[objective]
    process = process_from_settings(store.settings)
    device = device or next(policy.parameters()).device
    losses, arguments = [], []
    rows = np.asarray(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = read_micro_batch(store, chunk, np.full(len(chunk), empty_prompt), objective, process)
        chosen, rejected = policy_errors(policy, batch, device)
        result = spec.loss(chosen, rejected, batch["reference_error_chosen"].to(device),
                           _on(batch.get("reference_error_rejected"), device), beta)
        losses.append(result.loss.double().cpu())
        arguments.append(result.argument.double().cpu())
    loss, argument = torch.cat(losses), torch.cat(arguments)
    return {"loss": loss.mean().item(), "implicit_accuracy": (argument > 0).double().mean().item(),
            "margin": argument.mean().item(), "max_abs_margin": argument.abs().max().item()}

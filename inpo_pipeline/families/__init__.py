"""Model families: the one place that knows how a pipeline's parts are loaded and called.

Adding a family is one module here plus one line in FAMILIES; the stage runners only use the
`Family` interface (base.py) and the family's noise process (inpo_pipeline.method.processes).
"""

from __future__ import annotations

from typing import Any

from inpo_pipeline.families.base import (
    Family, ModelError, TextEncoders, fingerprint_module, load_json,
)
from inpo_pipeline.families.flux import Flux
from inpo_pipeline.families.sd3 import StableDiffusion3
from inpo_pipeline.families.stable_diffusion import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, Family] = {family.name: family for family in
                               (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
SUPPORTED = "SD1.x/2.x (StableDiffusionPipeline), SDXL, SD3/SD3.5 or FLUX.1"


def family_of_index(index: dict[str, Any], model: str) -> Family:
    for family in FAMILIES.values():
        if family.matches(index):
            missing = [part for part in (family.denoiser_folder, "vae", "scheduler") if part not in index]
            if missing:
                raise ModelError(f"{model} has no {missing[0]!r} in model_index.json; expected a {family.name} pipeline")
            return family
    raise ModelError(f"{model} ({index.get('_class_name', 'unknown class')}) is not a pipeline inpo supports; "
                     f"expected {SUPPORTED}")


def detect_family(model: str) -> Family:
    """The family of a pipeline, from its model_index.json."""
    index = load_json(model, "model_index.json")
    if not index:
        raise ModelError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    if index.get("unet") and "tokenizer" not in index:
        raise ModelError(f"{model} has no 'tokenizer' in model_index.json; expected an SD1.5 or SDXL pipeline")
    return family_of_index(index, model)


def family_of_denoiser(denoiser: Any) -> Family:
    """The family that calls this denoiser (a DDP/compile wrapper is looked through). SD1.x/2.x
    and SDXL share a UNet class and a calling convention (SDXL's extras are passed when present)."""
    inner = getattr(denoiser, "module", None) or getattr(denoiser, "_orig_mod", None) or denoiser
    for family in FAMILIES.values():
        if type(inner).__name__ == family.denoiser_class:
            return family
    raise ModelError(f"{type(inner).__name__} is not a denoiser of a family inpo supports ({SUPPORTED})")


def family_named(name: str) -> Family:
    """The family a store or run names (its settings' "family")."""
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}; this inpo knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "ModelError", "TextEncoders", "detect_family", "family_named", "family_of_denoiser",
           "fingerprint_module", "load_json"]

"""A trained LoRA in the key layouts other tools load: kohya's, which A1111, ComfyUI, SD.Next and
InvokeAI read. The conversion is diffusers' own (`convert_state_dict_to_kohya`); this module only
takes a run's diffusers-format LoRA apart and records what the file came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

KOHYA_FORMATS = ("kohya", "comfyui")  # the same file: ComfyUI reads kohya's keys
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DENOISER_PREFIX = "unet."  # how diffusers' save_lora_weights names the UNet's adapters


def kohya_state_dict(diffusers_lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya keys (lora_unet_…lora_down/lora_up.weight and …alpha) of a diffusers-format UNet LoRA.

    Only UNet adapters are taken (inpo trains no text encoder); alpha is the rank, as in the
    LoRA inpo trains (lora_alpha = r: scale 1)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    if not diffusers_lora or not all(key.startswith(DENOISER_PREFIX) for key in diffusers_lora):
        raise ValueError("the LoRA file holds keys other than the UNet's adapters")
    # diffusers saves lora.down/lora.up; kohya's converter takes peft's lora_A/lora_B
    peft = convert_unet_state_dict_to_peft(diffusers_lora)
    return convert_state_dict_to_kohya(peft)  # "unet." becomes kohya's "lora_unet_"


def kohya_metadata(run_record: dict[str, Any], rank: int) -> dict[str, str]:
    """safetensors metadata in the fields kohya's tools read, plus where the weights came from."""
    settings = run_record["store"]["settings"]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}.get(settings["family"], settings["family"]),
        "ss_sd_model_name": str(settings.get("model")),
        "inpo_objective": str(run_record["options"]["objective"]),
        "inpo_run": json.dumps({"options": run_record["options"], "beta_convention": run_record.get("beta_convention")},
                               default=str),
    }


def read_diffusers_lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / DIFFUSERS_LORA_FILE))

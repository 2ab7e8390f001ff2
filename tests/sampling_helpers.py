"""Helpers shared by the `inpo sample` / `inpo eval` tests."""

from __future__ import annotations

from pathlib import Path

import torch

from inpo_pipeline.models.reference import load_unet


def perturbed_unet(model: Path, out: Path, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """The model's UNet with seeded Gaussian noise on every weight, saved at `out` (a stand-in for a trained UNet)."""
    unet = load_unet(str(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    unet.save_pretrained(out)
    return unet

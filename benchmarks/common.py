"""Benchmark fixtures: SD1.5-shaped pipelines with random weights, built from configs.

`sd15` is the real SD1.5 architecture (UNet 860M, VAE, 12-layer CLIP text encoder) with random
weights; `small` is a scaled-down model of the same shape for CPU runs; `tiny` is the test
suite's model. None needs a download.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from inpo_pipeline.example import BOS_TOKEN_ID, EOS_TOKEN_ID, build_tiny_sd15, build_tiny_tokenizer

SHAPES = {
    "sd15": {
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=49408, hidden_act="quick_gelu"),
        "resolution": 512,
    },
    "small": {
        "unet": dict(sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=128, attention_head_dim=8),
        "vae": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256),
        "text": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     vocab_size=1000, hidden_act="quick_gelu"),
        "resolution": 256,
    },
}


def build_shaped_pipeline(path: Path, shape: str, seed: int = 0) -> Path:
    """A pipeline folder of the given shape (random weights), built once and reused."""
    if (path / "model_index.json").exists():
        return path
    if shape == "tiny":
        return build_tiny_sd15(path, seed)
    spec = SHAPES[shape]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **spec["unet"])
    vae_blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, **spec["vae"])
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                                        pad_token_id=EOS_TOKEN_ID, max_position_embeddings=77, **spec["text"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tiny_tokenizer(path / "tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
             "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return facts


def dump(report: dict) -> None:
    print(json.dumps(report, indent=2))

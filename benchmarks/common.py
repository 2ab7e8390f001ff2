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

from inpo_pipeline.worlds.example import BOS_TOKEN_ID, EOS_TOKEN_ID, build_tiny_sd15, build_tiny_tokenizer

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


FLOW_SHAPES = {
    # a CPU-sized SD3-type transformer: 4 joint blocks, 128 wide, patch 2, at 256 px with the small VAE (×8)
    "small-sd3": {
        "transformer": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                            caption_projection_dim=128, pooled_projection_dim=256, pos_embed_max_size=32),
        "resolution": 256,
    },
}


def build_small_sd3(path: Path, seed: int = 0) -> Path:
    """`small-sd3`: the small SD1.5 shape's VAE and CLIP width, two CLIPs with projections, a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from inpo_pipeline.worlds.example import T5_MAX_LENGTH, build_tiny_t5_tokenizer, caption_words

    spec = SHAPES["small"]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**FLOW_SHAPES["small-sd3"]["transformer"])
    vae_blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, scaling_factor=1.5305, shift_factor=0.0609,
                        **spec["vae"])
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                                                       pad_token_id=EOS_TOKEN_ID, max_position_embeddings=77,
                                                       projection_dim=128, **spec["text"])) for _ in range(2)]
    t5_tokenizer = build_tiny_t5_tokenizer(path / "tokenizer_3", caption_words(), T5_MAX_LENGTH)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=256, d_kv=32, d_ff=512, num_layers=2,
                                 num_heads=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, is_encoder_decoder=False))
    tokenizer = build_tiny_tokenizer(path / "tokenizer")
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=clip[0], tokenizer=tokenizer, text_encoder_2=clip[1],
                                    tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path)
    return path


def build_shaped_pipeline(path: Path, shape: str, seed: int = 0) -> Path:
    """A pipeline folder of the given shape (random weights), built once and reused."""
    if (path / "model_index.json").exists():
        return path
    if shape == "tiny":
        return build_tiny_sd15(path, seed)
    if shape in ("tiny-sd3", "tiny-flux"):
        from inpo_pipeline.worlds.example import build_tiny_flux, build_tiny_sd3

        return (build_tiny_sd3 if shape == "tiny-sd3" else build_tiny_flux)(path, seed)
    if shape == "small-sd3":
        return build_small_sd3(path, seed)
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

"""The shapes world for flow-matching models: a tiny Stable-Diffusion-3-type pipeline.

The same images, captions and rewards as :mod:`inpo_pipeline.worlds.shapes` (32×32 coloured shapes), but
the model is a diffusers ``StableDiffusion3Pipeline`` folder, so that InPO on flow models
(DESIGN §1.8) can be proven where the true preference is known:

* **VAE**: the committed SD1.5 world's AutoencoderKL (``worlds/shapes/vae``, trained on the same
  images; 32×32 → 8×8×4 latents), its scaling factor kept and ``shift_factor`` set to 0.0 (SD3's
  pipeline computes ``latents / scaling_factor + shift_factor`` and fails on None).
* **Text**: SD3's three encoders, tiny and frozen at seeded random weights — two
  CLIPTextModelWithProjection (hidden 32, projection 32: the pooled projection is 64 wide) on the
  world's byte-level CLIP tokenizer, and a T5EncoderModel (d_model 64 = the transformer's
  joint_attention_dim) on a Unigram T5 tokenizer built offline over the caption words.
* **Transformer**: an SD3Transformer2DModel on 8×8×4 latents, trained from scratch by
  :func:`build_flow_world` with rectified flow (DESIGN §1.8): x_σ = (1−σ)·x0 + σ·ε, target
  v = ε − x0, timestep = 1000·σ, σ from SD3's logit-normal density followed by the scheduler's
  shift, captions dropped to "" for classifier-free guidance.
* **Sampler** (:func:`sample_flow`): FlowMatchEulerDiscreteScheduler, one torch.Generator per
  image seed, T5 sequence length :data:`MAX_SEQUENCE_LENGTH` (the length it was trained with).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.worlds.shapes import IMAGE_SIZE, Progress, _no_progress

DEFAULT_FLOW_WORLD = Path(__file__).resolve().parents[2] / "worlds" / "shapes-flow"

MAX_SEQUENCE_LENGTH = 32
"""T5 tokens per prompt, at training and at sampling (the pipeline's default of 256 would pad the
prompt differently from training and change the conditioning)."""
CLIP_MAX_LENGTH = 24
"""CLIP tokens per prompt (the tokenizers' model_max_length; SD3's pipeline reads it from there).
The longest caption, "a purple triangle", is 17 byte-level tokens with BOS and EOS. Fewer than
SD's 77 because the text tokens dominate the joint attention's cost: 24 + 32 context tokens train
~3× faster than 77 + 32 beside 64 image tokens."""
TEXT_PROJECTION_DIM = 32
T5_DIM = 64
"""T5's d_model = the transformer's joint_attention_dim; the CLIP hidden states (2 × 32) are
zero-padded to it by SD3's encode_prompt."""


# --------------------------------------------------------------------------------- config
@dataclass
class FlowWorldConfig:
    """What `build_flow_world` trains; the defaults are the committed world's."""

    seed: int = 0
    train_images: int = 8192
    steps: int = 5000
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    threads: int = 2
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    patch_size: int = 1
    eval_seeds: int = 40
    """Seeds per held-out prompt for the base-quality numbers in world.json (0: skip)."""
    eval_steps: int = 20
    eval_guidance: float = 4.0


@dataclass(frozen=True)
class FlowSamplerSettings:
    """Same for base and aligned: FlowMatchEuler steps, guidance; one torch.Generator per image seed."""

    steps: int = 20
    guidance: float = 4.0
    batch_size: int = 64


# --------------------------------------------------------------------------------- parts
def world_words() -> list[str]:
    """Every word of the world's captions, in a fixed order."""
    return ["a", *world.COLOURS, *world.SHAPES]


def build_t5_tokenizer(path: Path | str) -> Any:
    """The world's T5TokenizerFast: a Unigram model over the caption words, letters as fallback
    (`example.build_tiny_t5_tokenizer`), MAX_SEQUENCE_LENGTH tokens."""
    from inpo_pipeline.worlds.example import build_tiny_t5_tokenizer

    return build_tiny_t5_tokenizer(path, world_words(), MAX_SEQUENCE_LENGTH)


def build_clip_tokenizer(path: Path | str) -> Any:
    """The shapes world's byte-level CLIP tokenizer with model_max_length CLIP_MAX_LENGTH."""
    from transformers import CLIPTokenizer

    from inpo_pipeline.worlds.example import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(path)
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    tokenizer.save_pretrained(path)
    return CLIPTokenizer.from_pretrained(path)


def new_text_encoders(seed: int) -> tuple[Any, Any, Any]:
    """Two CLIPTextModelWithProjection and a T5EncoderModel, each built right after its own seed."""
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from inpo_pipeline.worlds.example import _text_config

    encoders = []
    for offset in (0, 1):
        torch.manual_seed(seed + offset)
        clip = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_PROJECTION_DIM))
        encoders.append(clip.eval().requires_grad_(False))
    torch.manual_seed(seed + 2)
    t5_config = T5Config(vocab_size=4 + len(world_words()) + 26, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                         eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    t5 = T5EncoderModel(t5_config).eval().requires_grad_(False)
    return encoders[0], encoders[1], t5


def new_transformer(config: FlowWorldConfig | None = None) -> Any:
    """An SD3Transformer2DModel on 8×8×4 latents; joint attention over 64-wide text features.

    pos_embed_max_size is the latent grid itself: SD3's default (96) would store a 96×96 table.
    """
    from diffusers import SD3Transformer2DModel

    config = config or FlowWorldConfig()
    grid = IMAGE_SIZE // 4
    return SD3Transformer2DModel(
        sample_size=grid, patch_size=config.patch_size, in_channels=4, out_channels=4, num_layers=config.layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads, joint_attention_dim=T5_DIM,
        caption_projection_dim=config.heads * config.head_dim, pooled_projection_dim=2 * TEXT_PROJECTION_DIM,
        pos_embed_max_size=grid // config.patch_size,
    )


def flow_scheduler(shift: float) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_world_vae(shift_factor: float = 0.0) -> Any:
    """The committed SD1.5 world's VAE with `shift_factor` set (SD3 decodes latents/scale + shift)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(world.DEFAULT_WORLD / "vae"))
    vae.register_to_config(shift_factor=shift_factor)
    return vae.eval().requires_grad_(False)


def text_pipeline(vae: Any, tokenizers: Sequence[Any], encoders: Sequence[Any], scheduler: Any,
                  transformer: Any = None) -> Any:
    """A StableDiffusion3Pipeline from the parts (the transformer may be None for encoding only)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2], tokenizer_3=tokenizers[2],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_flow_prompts(pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (N, CLIP + T5 tokens, 64), pooled (N, 64)) by the pipeline's own encode_prompt,
    so training conditions exactly as sampling does."""
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_SEQUENCE_LENGTH)
    return embeds, pooled


# --------------------------------------------------------------------------------- training
def sample_sigmas(count: int, config: FlowWorldConfig, generator: torch.Generator) -> torch.Tensor:
    """σ ∈ (0, 1): SD3's logit-normal u = sigmoid(N(m, s)), then the scheduler's shift
    σ = shift·u / (1 + (shift − 1)·u) (DESIGN §1.8: timestep = 1000·σ after the shift)."""
    u = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(count, generator=generator))
    return config.shift * u / (1 + (config.shift - 1) * u)


def flow_loss(transformer: Any, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
              embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Rectified flow (DESIGN §1.8): x_σ = (1−σ)·x0 + σ·ε, mean‖v_θ(x_σ, 1000·σ, c) − (ε − x0)‖²."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    velocity = transformer(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=1000 * sigma).sample
    return (velocity - (noise - x0)).pow(2).mean()


def train_transformer(latents: torch.Tensor, prompt_index: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                      config: FlowWorldConfig, progress: Progress = _no_progress) -> tuple[Any, list[float]]:
    """Rectified flow on the scaled latents, captions replaced by "" (row 0) at the dropout rate, on
    a seeded data order and noise; returns the EMA of the weights and the loss per step."""
    torch.manual_seed(config.seed)
    transformer = new_transformer(config)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
    # OneCycle needs ≥ 2 warm-up steps (tiny test builds have few steps)
    warmup = max(0.05, 2.5 / config.steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=warmup)
    generator = torch.Generator().manual_seed(config.seed + 2)
    losses: list[float] = []
    transformer.train()
    with progress("world: SD3 transformer", config.steps) as advance:
        for step, indices in enumerate(world._epochs(len(latents), config.batch, config.steps, config.seed + 3)):
            x0 = latents[indices]
            noise = torch.randn(x0.shape, generator=generator)
            sigma = sample_sigmas(len(x0), config, generator)
            keep = torch.rand(len(x0), generator=generator) >= config.caption_dropout
            rows = torch.where(keep, prompt_index[indices], torch.zeros_like(indices))
            loss = flow_loss(transformer, x0, noise, sigma, embeds[rows], pooled[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            # the warm-up of the decay lets the EMA follow the fast early changes
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for target, source in zip(ema.parameters(), transformer.parameters()):
                    target.lerp_(source, 1 - decay)
            losses.append(float(loss.detach()))
            advance(1)
    return ema.eval(), losses


def build_flow_world(out: Path | str, config: FlowWorldConfig | None = None,
                     progress: Progress = _no_progress) -> dict[str, Any]:
    """Train the flow world's transformer from scratch and save a StableDiffusion3Pipeline folder.

    Deterministic like `world.build_world`: seeded scenes, data order, noise and text encoders,
    deterministic algorithms, a fixed thread count. Writes `world.json` (config, timings, the
    VAE scaling, the T5 sequence length, base-model quality on held-out prompts) beside the parts.
    """
    config = config or FlowWorldConfig()
    out = Path(out)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    scenes = world.sample_scenes(config.train_images, config.seed)
    vae = load_world_vae()
    raw = world.encode_latents(vae, world.render(scenes))
    scaling = float(vae.config.scaling_factor)
    latents = raw * scaling

    tokenizers = (build_clip_tokenizer(out / "tokenizer"), build_clip_tokenizer(out / "tokenizer_2"),
                  build_t5_tokenizer(out / "tokenizer_3"))
    encoders = new_text_encoders(config.seed)
    scheduler = flow_scheduler(config.shift)
    pipe = text_pipeline(vae, tokenizers, encoders, scheduler)
    prompts = ["", *world.ALL_PROMPTS]
    embeds, pooled = encode_flow_prompts(pipe, prompts)
    lookup = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([lookup[c] for c in scenes.captions()])
    middle = time.perf_counter()
    transformer, losses = train_transformer(latents, prompt_index, embeds, pooled, config, progress)
    timings = {"prepare_seconds": middle - started, "transformer_seconds": time.perf_counter() - middle}
    torch.use_deterministic_algorithms(False)

    pipe = text_pipeline(vae, tokenizers, encoders, scheduler, transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    tail = losses[-max(1, len(losses) // 10):]
    record: dict[str, Any] = {
        "config": asdict(config), "timings": timings,
        "vae_scaling_factor": scaling, "vae_scaling_source": "kept from worlds/shapes/vae (1/std of its latents)",
        "latent_std_after_scaling": float(latents.std()), "latent_mean_after_scaling": float(latents.mean()),
        "vae_shift_factor": 0.0, "max_sequence_length": MAX_SEQUENCE_LENGTH, "clip_max_length": CLIP_MAX_LENGTH,
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "final_loss": float(np.mean(tail)), "torch_version": torch.__version__,
    }
    if config.eval_seeds:
        settings = FlowSamplerSettings(steps=config.eval_steps, guidance=config.eval_guidance)
        evaluated = time.perf_counter()
        record["base_quality"] = base_quality(load_flow_pipeline(out), settings, config.eval_seeds)
        timings["eval_seconds"] = time.perf_counter() - evaluated
    timings["total_seconds"] = time.perf_counter() - started
    (out / "world.json").write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------------- sampling
def load_flow_pipeline(model: Path | str, transformer: Path | str | None = None) -> Any:
    """The flow world's StableDiffusion3Pipeline, optionally with another transformer (a run's folder)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    parts: dict[str, Any] = {}
    if transformer is not None:
        parts["transformer"] = SD3Transformer2DModel.from_pretrained(str(transformer))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_flow(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: FlowSamplerSettings,
                advance: Callable[[int], Any] | None = None) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1]; image i from prompts[i] and torch.Generator(seeds[i]).

    The T5 prompt is MAX_SEQUENCE_LENGTH tokens, as in training; the negative prompt is "".
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    for start in range(0, len(prompts), settings.batch_size):
        part = slice(start, start + settings.batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[part]]
        result = pipe(list(prompts[part]), num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      generator=generators, output_type="np", height=IMAGE_SIZE, width=IMAGE_SIZE,
                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        out.append(np.asarray(result.images, dtype=np.float32))
        if advance is not None:
            advance(len(generators))
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


# --------------------------------------------------------------------------------- base quality
def colour_scores(images: np.ndarray) -> np.ndarray:
    """(N, 6): the colour reward of each image for each named colour, in COLOURS order."""
    return np.stack([world.reward(images, f"a {c} x") for c in world.COLOURS], axis=1)


def quality_numbers(images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """How well samples follow their prompts and how much the rewards vary from seed to seed.

    colour_accuracy: share of images whose best-scoring colour is the named one (chance 1/6);
    own_over_shifted: mean reward of the named colour over that of the next colour in COLOURS.
    """
    names = list(world.COLOURS)
    named = np.array([names.index(world.named_colour(p)) for p in prompts])
    scores = colour_scores(images)
    own = scores[np.arange(len(named)), named]
    shifted = scores[np.arange(len(named)), (named + 1) % len(names)]
    numbers: dict[str, Any] = {
        "n": len(prompts), "colour_reward_mean": float(own.mean()),
        "colour_reward_interval": world.bootstrap_mean_interval(own),
        "colour_accuracy": float((scores.argmax(1) == named).mean()),
        "own_over_shifted": float(own.mean() / max(shifted.mean(), 1e-12)),
        "object_found": float((world.size_reward(images) > 0.01).mean()),
    }
    for name, score in world.REWARDS.items():
        values = score(images, list(prompts))
        numbers[f"{name}_mean"] = float(values.mean())
        numbers[f"{name}_std"] = float(values.std())
    return numbers


def base_quality(pipe: Any, settings: FlowSamplerSettings, seeds_per_prompt: int = 40) -> dict[str, Any]:
    """quality_numbers on the 6 held-out prompts × seeds 0..seeds_per_prompt−1 (the proof's protocol)."""
    prompts = [p for p in world.HELD_OUT_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [s for _ in world.HELD_OUT_PROMPTS for s in range(seeds_per_prompt)]
    numbers = quality_numbers(sample_flow(pipe, prompts, seeds, settings), prompts)
    numbers["sampler"] = asdict(settings)
    return numbers

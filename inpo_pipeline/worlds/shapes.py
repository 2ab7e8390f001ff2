"""A small world where the true preference is known: coloured shapes, a tiny SD1.5-type model, a reward.

Real SD weights and Pick-a-Pic cannot be used offline, so alignment is shown here, in a world
whose "people" are a fixed function:

* **Images**: 32×32 RGB, one shape (circle, square, triangle) in one of six named colours on a
  grey background. Size, position, background grey and a small jitter of the shape's colour are
  random. Captions name colour and shape only: ``"a red circle"``.
* **Reward** (:func:`reward`): how much of the image is the colour the prompt names,
  r(x, c) = mean over pixels p of exp(−‖x_p − rgb(c)‖² / (2σ²)), σ = 0.2, pixels in [0, 1].
  It grows with the shape's area and with the fidelity of its colour, is 0 ≤ r ≤ 1, is exact and
  cheap on any image, and the caption does not determine it (size and jitter are free), so a
  base model's samples differ in reward from seed to seed.
* **Model**: a diffusers StableDiffusionPipeline folder of the SD1.5 kind (AutoencoderKL with ×4
  downsampling → 8×8×4 latents, a small UNet2DConditionModel, a frozen random CLIP text encoder
  with the byte-level tiny tokenizer, SD's DDIM scheduler), trained from scratch by
  :func:`build_world` (VAE first, then the UNet on its latents with caption dropout for CFG).
* **Preference data** (:func:`write_preference_parquet`): the base model's own samples, two seeds
  per prompt, labelled by the reward, in the Pick-a-Pic parquet layout.
* **Statistics**: the Wilson score interval for win rates (a tie counts half a win) and a seeded
  bootstrap interval for mean paired differences.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo_pipeline.evaluation.stats import clustered_mean, compare_paired, wilson_interval

IMAGE_SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.75),
    "cyan": (0.10, 0.80, 0.85),
}
SHAPES = ("circle", "square", "triangle")
REWARD_SIGMA = 0.2
RADIUS_RANGE = (4.0, 11.0)
BACKGROUND_RANGE = (0.15, 0.85)
COLOUR_JITTER = 0.12
SUPERSAMPLE = 4

ALL_PROMPTS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
HELD_OUT_PROMPTS = tuple(f"a {colour} {SHAPES[i % len(SHAPES)]}" for i, colour in enumerate(COLOURS))
"""Six prompts (each colour once, each shape twice) never used in preference data."""
TRAIN_PROMPTS = tuple(p for p in ALL_PROMPTS if p not in HELD_OUT_PROMPTS)

DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "worlds" / "shapes"


# --------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class Scenes:
    """Parameters of N scenes (arrays of length N)."""

    colour: np.ndarray  # int index into COLOURS
    shape: np.ndarray  # int index into SHAPES
    radius: np.ndarray
    centre_x: np.ndarray
    centre_y: np.ndarray
    background: np.ndarray  # grey level in [0, 1]
    jitter: np.ndarray  # (N, 3) added to the named colour

    def captions(self) -> list[str]:
        names = list(COLOURS)
        return [f"a {names[c]} {SHAPES[s]}" for c, s in zip(self.colour, self.shape)]


def sample_scenes(count: int, seed: int) -> Scenes:
    """`count` random scenes from a seeded numpy generator (same seed → same scenes)."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, len(COLOURS), count)
    shape = rng.integers(0, len(SHAPES), count)
    radius = rng.uniform(*RADIUS_RANGE, count)
    centre_x = rng.uniform(radius, IMAGE_SIZE - radius)
    centre_y = rng.uniform(radius, IMAGE_SIZE - radius)
    background = rng.uniform(*BACKGROUND_RANGE, count)
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (count, 3))
    return Scenes(colour, shape, radius, centre_x, centre_y, background, jitter)


def shape_coverage(shape: np.ndarray, radius: np.ndarray, centre_x: np.ndarray, centre_y: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (N, H, W) in [0, 1]: the share of 4×4 sub-pixels inside each shape.

    circle: distance ≤ r; square: both offsets ≤ 0.85·r; triangle (apex up): −r ≤ dy ≤ r and
    |dx| ≤ (dy + r)/2.
    """
    fine = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    dx = fine[None, None, :] - centre_x[:, None, None].astype(np.float32)
    dy = fine[None, :, None] - centre_y[:, None, None].astype(np.float32)
    r = radius[:, None, None].astype(np.float32)
    kind = shape[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    inside = np.where(kind == 0, circle, np.where(kind == 1, square, triangle)).astype(np.float32)
    n = len(shape)
    return inside.reshape(n, IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(2, 4))


def render(scenes: Scenes, chunk: int = 256) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1]."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    out = []
    for start in range(0, len(scenes.colour), chunk):
        part = slice(start, start + chunk)
        alpha = shape_coverage(scenes.shape[part], scenes.radius[part], scenes.centre_x[part], scenes.centre_y[part])
        fill = np.clip(palette[scenes.colour[part]] + scenes.jitter[part], 0, 1).astype(np.float32)
        grey = scenes.background[part].astype(np.float32)[:, None, None, None]
        out.append(alpha[..., None] * fill[:, None, None, :] + (1 - alpha[..., None]) * grey)
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """One image (H, W, 3) in [0, 1] or uint8 as PNG bytes (lossless, so rewards survive)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------------- reward
def named_colour(prompt: str) -> str:
    """The colour word of a prompt (the first one of COLOURS it contains as a word)."""
    words = prompt.lower().replace(",", " ").split()
    for word in words:
        if word in COLOURS:
            return word
    raise ValueError(f"the prompt {prompt!r} names none of the colours {list(COLOURS)}")


def reward(images: np.ndarray, prompts: str | Sequence[str]) -> np.ndarray:
    """r(x, c) = mean over pixels of exp(−‖x_p − rgb(c)‖² / (2σ²)), σ = REWARD_SIGMA.

    `images`: (H, W, 3) or (N, H, W, 3), float in [0, 1] or uint8 (divided by 255). Returns a
    float64 array of shape (N,) (or a 0-d array for one image).
    """
    array = np.asarray(images)
    single = array.ndim == 3
    pixels = (array.astype(np.float64) / 255.0) if array.dtype == np.uint8 else array.astype(np.float64)
    if single:
        pixels = pixels[None]
    names = [prompts] * len(pixels) if isinstance(prompts, str) else list(prompts)
    if len(names) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(names)} prompts")
    targets = np.array([COLOURS[named_colour(p)] for p in names], dtype=np.float64)
    distance2 = ((pixels - targets[:, None, None, :]) ** 2).sum(-1)
    values = np.exp(-distance2 / (2 * REWARD_SIGMA**2)).mean(axis=(1, 2))
    return values[0] if single else values


def _unit_pixels(images: np.ndarray) -> tuple[np.ndarray, bool]:
    array = np.asarray(images)
    pixels = (array.astype(np.float64) / 255.0) if array.dtype == np.uint8 else array.astype(np.float64)
    if pixels.ndim == 3:
        return pixels[None], True
    return pixels, False


def object_mask(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) in [0, 1]: how surely a pixel belongs to the shape. The background is grey
    (saturation max − min = 0) and every named colour, jittered, has saturation ≥ 0.36; the ramp
    from 0.1 to 0.3 keeps the measure smooth in the pixels."""
    saturation = pixels.max(-1) - pixels.min(-1)
    return np.clip((saturation - 0.1) / 0.2, 0.0, 1.0)


def luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels @ np.array([0.299, 0.587, 0.114])


def size_reward(images: np.ndarray, prompts: str | Sequence[str] = "") -> np.ndarray:
    """The object's size: the share of the image its mask covers, in [0, 1] (colour-blind)."""
    pixels, single = _unit_pixels(images)
    values = object_mask(pixels).mean(axis=(1, 2))
    return values[0] if single else values


def _mask_centroid(images: np.ndarray, axis: int) -> tuple[np.ndarray, bool]:
    """The object mask's centroid along image `axis` (1: rows, 2: columns) in [0, 1]; 0.5 with no object."""
    pixels, single = _unit_pixels(images)
    mask = object_mask(pixels)
    coordinates = (np.arange(pixels.shape[axis]) + 0.5) / pixels.shape[axis]
    weight = mask.sum(axis=(1, 2))
    moment = (mask * coordinates.reshape((1, -1, 1) if axis == 1 else (1, 1, -1))).sum(axis=(1, 2))
    return np.where(weight > 1.0, moment / np.maximum(weight, 1e-9), 0.5), single


def position_reward(images: np.ndarray, prompts: str | Sequence[str] = "") -> np.ndarray:
    """How far right the object sits: its mask's centroid x / width, in [0, 1]; 0.5 with no object."""
    values, single = _mask_centroid(images, axis=2)
    return values[0] if single else values


def height_reward(images: np.ndarray, prompts: str | Sequence[str] = "") -> np.ndarray:
    """How high the object sits: 1 − its mask's centroid y / height, in [0, 1]; 0.5 with no object.
    Unlike `position_reward` it survives horizontal flips (the authors' augmentation)."""
    centroid, single = _mask_centroid(images, axis=1)
    values = 1.0 - centroid
    return values[0] if single else values


def brightness_reward(images: np.ndarray, prompts: str | Sequence[str] = "") -> np.ndarray:
    """A whole-image property: mean luminance (0.299 R + 0.587 G + 0.114 B), in [0, 1]. In this
    world it is mostly the background's grey, which the caption leaves free."""
    pixels, single = _unit_pixels(images)
    values = luminance(pixels).mean(axis=(1, 2))
    return values[0] if single else values


def contrast_reward(images: np.ndarray, prompts: str | Sequence[str] = "") -> np.ndarray:
    """A whole-image property: the standard deviation of luminance over the pixels."""
    pixels, single = _unit_pixels(images)
    values = luminance(pixels).std(axis=(1, 2))
    return values[0] if single else values


# name → r(images, prompts): the preference labels' and the evaluation's reward. "colour" is the
# object's named colour (the proof's reward); size, height and position are properties of the
# object (position, left to right, is mirrored by horizontal flips); brightness and contrast of
# the whole image.
REWARDS: dict[str, Callable[..., np.ndarray]] = {
    "colour": reward, "size": size_reward, "height": height_reward, "position": position_reward,
    "brightness": brightness_reward, "contrast": contrast_reward,
}


# --------------------------------------------------------------------------------- statistics
def bootstrap_mean_interval(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of a mean, with a fixed seed (reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


@dataclass
class Comparison:
    """Aligned vs base on the same prompts and seeds (intervals: `inpo_pipeline.evaluation.stats`)."""

    n: int
    base_mean: float
    base_interval: tuple[float, float]
    aligned_mean: float
    aligned_interval: tuple[float, float]
    difference: float
    difference_interval: tuple[float, float]
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_interval: tuple[float, float]
    difference_p_value: float = float("nan")
    win_p_value: float = float("nan")
    prompts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(base: np.ndarray, aligned: np.ndarray, prompts: Sequence[str] | None = None, seed: int = 0,
            tie_tolerance: float = 1e-9) -> Comparison:
    """Mean rewards, the paired difference and the win rate, with 95% intervals and p-values.

    A sample is won when aligned − base > tie_tolerance, tied when |aligned − base| ≤ it (half a
    win). With `prompts` (each sample's prompt) every interval is the cluster bootstrap of
    `stats.compare_paired`, a prompt's seeds resampled together, and the p-values its sign-flip
    test over prompts; without, the samples count as independent.
    """
    base, aligned = np.asarray(base, np.float64), np.asarray(aligned, np.float64)
    paired = compare_paired(aligned - base, prompts, tie_tolerance=tie_tolerance, seed=seed)
    base_mean, aligned_mean = clustered_mean(base, prompts, seed=seed), clustered_mean(aligned, prompts, seed=seed)
    delta, rate = paired.mean_difference, paired.win_rate
    return Comparison(
        n=paired.n, base_mean=base_mean.estimate, base_interval=(base_mean.low, base_mean.high),
        aligned_mean=aligned_mean.estimate, aligned_interval=(aligned_mean.low, aligned_mean.high),
        difference=delta.estimate, difference_interval=(delta.low, delta.high),
        wins=paired.wins, ties=paired.ties, losses=paired.losses, win_rate=rate.estimate,
        win_interval=(rate.low, rate.high), difference_p_value=delta.p_value, win_p_value=rate.p_value,
        prompts=rate.prompts,
    )


# --------------------------------------------------------------------------------- the model
@dataclass
class WorldConfig:
    """What `build_world` trains; the defaults are the committed world's."""

    seed: int = 0
    train_images: int = 8192
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    threads: int = 2


def new_vae() -> Any:
    """AutoencoderKL with ×4 downsampling: a 32×32 image has 8×8×4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def new_unet() -> Any:
    """A two-level UNet2DConditionModel on 8×8×4 latents, cross-attention on the 4×4 level."""
    from diffusers import UNet2DConditionModel

    from inpo_pipeline.worlds.example import TEXT_HIDDEN_SIZE

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=IMAGE_SIZE // 4,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE, attention_head_dim=8, norm_num_groups=32,
    )


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] → (N, 3, H, W) in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2 - 1


def _epochs(count: int, batch: int, steps: int, seed: int) -> Any:
    """Index batches over a seeded permutation per epoch: a fixed data order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(count, generator=generator).tolist()
        chosen, order = order[:batch], order[batch:]
        yield torch.tensor(chosen)


Progress = Callable[[str, int], Any]
"""`progress(name, total)` returns a context manager yielding `advance(n)` (Reporter.progress)."""


def _no_progress(name: str, total: int) -> Any:
    import contextlib

    return contextlib.nullcontext(lambda _n: None)


def train_vae(images: np.ndarray, config: WorldConfig, progress: Progress = _no_progress) -> Any:
    """Reconstruction (MSE) + a small KL on the seeded data order; returns the VAE in eval mode."""
    torch.manual_seed(config.seed)
    vae = new_vae()
    pixels = _pixels(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.vae_lr, total_steps=config.vae_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.seed + 1)
    vae.train()
    with progress("world: VAE", config.vae_steps) as advance:
        for indices in _epochs(len(pixels), config.vae_batch, config.vae_steps, config.seed):
            batch = pixels[indices]
            posterior = vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator)
            latents = posterior.mean + posterior.std * noise
            loss = (vae.decode(latents).sample - batch).pow(2).mean() + config.vae_kl_weight * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            advance(1)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Distribution means of the VAE (not yet scaled)."""
    pixels = _pixels(images)
    return torch.cat([vae.encode(pixels[i : i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    return text_encoder(tokens)[0]


def train_unet(latents: torch.Tensor, prompt_index: torch.Tensor, embeddings: torch.Tensor, config: WorldConfig,
               alphas_cumprod: torch.Tensor, progress: Progress = _no_progress) -> Any:
    """ε-prediction on the scaled latents, captions replaced by "" (embedding row 0) at the dropout
    rate; returns the EMA of the weights."""
    import copy

    torch.manual_seed(config.seed)
    unet = new_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.unet_lr, total_steps=config.unet_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.seed + 2)
    alphas = alphas_cumprod.float()
    unet.train()
    with progress("world: UNet", config.unet_steps) as advance:
        for step, indices in enumerate(_epochs(len(latents), config.unet_batch, config.unet_steps, config.seed + 3)):
            x0 = latents[indices]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, len(alphas), (len(x0),), generator=generator)
            keep = torch.rand(len(x0), generator=generator) >= config.caption_dropout
            context = embeddings[torch.where(keep, prompt_index[indices], torch.zeros_like(indices))]
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = (unet(noisy, t, encoder_hidden_states=context).sample - noise).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for target, source in zip(ema.parameters(), unet.parameters()):
                    target.lerp_(source, 1 - decay)
            advance(1)
    return ema.eval()


def build_world(out: Path | str, config: WorldConfig | None = None, progress: Progress = _no_progress) -> dict[str, Any]:
    """Train the world model from scratch and save it as a StableDiffusionPipeline folder.

    Deterministic: seeded data, seeded data order and noise, deterministic algorithms, a fixed
    thread count (float sums depend on it). Writes `world.json` (config, timings) beside the parts.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from inpo_pipeline.worlds.example import _ddim_scheduler, _text_config, build_tiny_tokenizer

    config = config or WorldConfig()
    out = Path(out)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    scenes = sample_scenes(config.train_images, config.seed)
    images = render(scenes)
    vae = train_vae(images, config, progress)
    timings["vae_seconds"] = time.perf_counter() - started

    raw = encode_latents(vae, images)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling

    tokenizer = build_tiny_tokenizer(out / "tokenizer")
    torch.manual_seed(config.seed)
    text_encoder = CLIPTextModel(_text_config()).eval().requires_grad_(False)
    prompts = ["", *ALL_PROMPTS]
    embeddings = encode_prompts(tokenizer, text_encoder, prompts)
    lookup = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([lookup[c] for c in scenes.captions()])
    scheduler = _ddim_scheduler()
    middle = time.perf_counter()
    unet = train_unet(latents, prompt_index, embeddings, config, scheduler.alphas_cumprod, progress)
    timings["unet_seconds"] = time.perf_counter() - middle
    torch.use_deterministic_algorithms(False)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    timings["total_seconds"] = time.perf_counter() - started
    record = {"config": asdict(config), "timings": timings, "vae_scaling_factor": scaling,
              "torch_version": torch.__version__}
    (out / "world.json").write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplerSettings:
    """Same for base and aligned: DDIM, steps, guidance; one torch.Generator per image seed."""

    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 64


def load_pipeline(model: Path | str, unet: Path | str | None = None) -> Any:
    """The world's StableDiffusionPipeline (DDIM), optionally with another UNet (a run's `unet/`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    parts: dict[str, Any] = {}
    if unet is not None:
        parts["unet"] = UNet2DConditionModel.from_pretrained(str(unet))
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False, **parts)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings,
           advance: Callable[[int], Any] | None = None) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1]; image i from prompts[i] and torch.Generator(seeds[i])."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    for start in range(0, len(prompts), settings.batch_size):
        part = slice(start, start + settings.batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[part]]
        result = pipe(list(prompts[part]), num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      generator=generators, output_type="np", height=IMAGE_SIZE, width=IMAGE_SIZE)
        out.append(np.asarray(result.images, dtype=np.float32))
        if advance is not None:
            advance(len(generators))
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


# --------------------------------------------------------------------------------- preference data
LABELINGS = ("reward", "shuffled", "reversed")


def preference_labels(reward_0: np.ndarray, reward_1: np.ndarray, labeling: str = "reward", seed: int = 0) -> np.ndarray:
    """label_0 per pair: 1.0 when image 0 is preferred, 0.0 when image 1, 0.5 on an exact tie.

    reward: the higher reward wins; reversed: the lower wins; shuffled: each pair's winner is a
    seeded fair coin (the labels carry no information about the reward).
    """
    if labeling not in LABELINGS:
        raise ValueError(f"labeling must be one of {LABELINGS}")
    first = np.where(reward_0 > reward_1, 1.0, np.where(reward_0 < reward_1, 0.0, 0.5))
    if labeling == "reversed":
        return np.where(first == 0.5, 0.5, 1.0 - first)
    if labeling == "shuffled":
        return np.random.default_rng(seed).integers(0, 2, len(first)).astype(np.float64)
    return first


def write_preference_parquet(path: Path | str, prompts: Sequence[str], images_0: np.ndarray, images_1: np.ndarray,
                             labels_0: np.ndarray) -> Path:
    """A Pick-a-Pic v2 layout parquet (caption, jpg_0/jpg_1 as PNG bytes, label_0/label_1, uids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inpo_pipeline.worlds.example import PICKAPIC_SCHEMA

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[Any]] = {name: [] for name in PICKAPIC_SCHEMA.names}
    for row, (prompt, first, second, label) in enumerate(zip(prompts, images_0, images_1, labels_0)):
        uids = (f"{row:08d}-0", f"{row:08d}-1")
        columns["best_image_uid"].append("" if label == 0.5 else uids[0] if label == 1.0 else uids[1])
        columns["caption"].append(prompt)
        columns["image_0_uid"].append(uids[0])
        columns["image_1_uid"].append(uids[1])
        columns["jpg_0"].append(png_bytes(first))
        columns["jpg_1"].append(png_bytes(second))
        columns["label_0"].append(float(label))
        columns["label_1"].append(1.0 - float(label))
        columns["user_id"].append(0)
    pq.write_table(pa.table(columns, schema=PICKAPIC_SCHEMA), path, row_group_size=256)
    return path

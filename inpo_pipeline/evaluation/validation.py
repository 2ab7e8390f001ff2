"""Validation images during training: fixed prompts × fixed seeds sampled with the current policy.

`inpo train --validation-prompts FILE --validation-every N` draws, every N steps and at the end,
one image per (prompt, seed) with the family's default sampler, from the noise of
`sampling.initial_latents` (so step 100's image and step 200's start from the same noise), tiles
them into one grid (rows: prompts, columns: seeds), writes RUN/validation/step-NNNNNNN.png and
hands the grid to the run's trackers. Sampling runs under `torch.random.fork_rng`, in eval mode
and without gradients: a run with validation trains bit for bit like one without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inpo_pipeline.evaluation import sampling
from inpo_pipeline.errors import UserError
from inpo_pipeline.families import family_named
from inpo_pipeline.data.prompts import read_prompts

VALIDATION_FOLDER = "validation"
DEFAULT_VALIDATION_STEPS = 20


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images tiled row by row, `columns` per row (all images of the first one's size)."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        canvas.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return canvas


class Validator:
    """Samples the validation grid of a policy trained from a store with `settings`."""

    def __init__(self, settings: dict[str, Any], prompts: str, seeds: int = 2,
                 steps: int = DEFAULT_VALIDATION_STEPS) -> None:
        if seeds < 1 or steps < 1:
            raise UserError("--validation-seeds and --validation-steps must be at least 1")
        self.prompts = [prompt.text for prompt in read_prompts(prompts).prompts]
        if not self.prompts:
            raise UserError(f"--validation-prompts {prompts} holds no prompt")
        self.settings, self.seeds, self.steps = settings, seeds, steps
        self.family = family_named(settings["family"])
        self.pipeline: Any = None

    def _pipeline(self, policy: torch.nn.Module, device: torch.device) -> Any:
        if self.pipeline is None:
            model = self.settings["model"]
            parts: dict[str, Any] = {self.family.denoiser_folder: policy, **self.family.pipeline_kwargs(model)}
            if self.settings.get("vae"):
                from diffusers import AutoencoderKL

                vae = self.settings["vae"]
                parts["vae"] = AutoencoderKL.from_pretrained(vae) if (Path(vae) / "config.json").exists() \
                    else AutoencoderKL.from_pretrained(vae, subfolder="vae")
            pipeline = self.family.diffusers_class().from_pretrained(model, **parts)
            pipeline.scheduler = sampling.make_scheduler(self.family.default_sampler, pipeline.scheduler.config,
                                                         self.family)
            for name, component in pipeline.components.items():
                if isinstance(component, torch.nn.Module) and component is not policy:
                    component.to(device)
            pipeline.set_progress_bar_config(disable=True)
            self.pipeline = pipeline
        return self.pipeline

    @torch.no_grad()
    def images(self, policy: torch.nn.Module, device: torch.device) -> list[Image.Image]:
        """One image per (prompt, seed), prompt-major; the policy's mode and every RNG are restored."""
        pipeline = self._pipeline(policy, device)
        denoiser = sampling.denoiser_of(pipeline)
        resolution = int(self.settings["resolution"])
        side = resolution // pipeline.vae_scale_factor
        channels = self.family.latent_channels(denoiser)
        guidance = sampling.DEFAULT_GUIDANCE[self.family.name]
        jobs = [(prompt, seed) for prompt in self.prompts for seed in range(self.seeds)]
        was_training = policy.training
        devices = [device.index or 0] if device.type == "cuda" else []
        images: list[Image.Image] = []
        with torch.random.fork_rng(devices=devices):
            policy.eval()
            try:
                for start in range(0, len(jobs), 8):
                    batch = jobs[start:start + 8]
                    latents, generators = sampling.initial_latents([seed for _, seed in batch], (channels, side, side))
                    images += pipeline(
                        prompt=[prompt for prompt, _ in batch], height=resolution, width=resolution,
                        num_inference_steps=self.steps, guidance_scale=guidance,
                        **self.family.pipeline_call_extras(pipeline),
                        latents=self.family.pipeline_latents(latents).to(device, denoiser.dtype),
                        generator=generators, output_type="pil",
                    ).images
            finally:
                policy.train(was_training)
        return images

    def write(self, policy: torch.nn.Module, device: torch.device, run_dir: Path, step: int,
              trackers: list[Any]) -> Path:
        """The grid of `step` into RUN/validation/ and to every tracker; returns the PNG's path."""
        picture = grid(self.images(policy, device), self.seeds)
        folder = run_dir / VALIDATION_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:07d}.png"
        temporary = path.with_name(path.name + ".tmp")
        picture.save(temporary, format="PNG")
        temporary.replace(path)
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.asarray(picture)[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({"validation": [picture]}, step=step)
        return path

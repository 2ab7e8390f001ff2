"""`inpo sample`: images for a prompt set under one pinned protocol, resumable.

Read the prompts, load the pipeline (UNet swap / LoRA), then generate every (prompt, seed)
image not yet in OUT, in batches, each image from its own seeded noise (see
`inpo_pipeline.evaluation.sampling`). Images are written atomically, then recorded in the manifest.
"""

from __future__ import annotations

import math

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import inpo_pipeline
from inpo_pipeline.evaluation import sampling
from inpo_pipeline.errors import UserError
from inpo_pipeline.families import family_named
from inpo_pipeline.data.prompts import Prompt, read_prompts
from inpo_pipeline.reporting import Reporter


@dataclass
class SampleOptions:
    """The options of `inpo sample` (see the CLI for their help). None = the model's default."""

    model: str
    prompts: str
    out: str
    unet: str | None = None
    lora: str | None = None
    seeds: int = 1
    steps: int = 50
    guidance: float | None = None
    resolution: int | None = None
    scheduler: str | None = None  # None: the family's default (ddim; flow-euler for flow models)
    batch_size: int = 4
    dtype: str | None = None
    device: str | None = None

    def validate(self) -> None:
        checks = [
            (self.seeds >= 1, "--seeds must be at least 1"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.guidance is None or (math.isfinite(self.guidance) and self.guidance >= 0),
             "--guidance must be a finite number >= 0"),
            (self.resolution is None or self.resolution >= 8, "--resolution must be at least 8"),
            (self.scheduler is None or self.scheduler in sampling.SCHEDULERS,
             f"--scheduler must be one of {', '.join(sampling.SCHEDULERS)}"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.dtype is None or self.dtype in sampling.DTYPES, f"--dtype must be one of {', '.join(sampling.DTYPES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def _check_resolution(pipeline: Any, family: Any, resolution: int) -> None:
    multiple = pipeline.vae_scale_factor * family.denoiser_downsampling(sampling.denoiser_of(pipeline))
    if resolution % multiple:
        raise UserError(f"--resolution {resolution} is not a multiple of {multiple} "
                        f"(VAE factor {pipeline.vae_scale_factor} × {family.denoiser_label} downsampling)")


def _check_existing(out: Path, records: list[dict[str, Any]], model: dict[str, Any], protocol: dict[str, Any]) -> None:
    """A folder being resumed must hold images of the same weights under the same protocol."""
    if not records:
        return
    first = records[0]
    for what, ours in (("model", model), ("protocol", protocol)):
        theirs = first.get(what)
        if theirs != ours:
            keys = sorted(k for k in set(ours) | set(theirs or {}) if (theirs or {}).get(k) != ours.get(k))
            raise UserError(f"{out} holds images of another {what} (differs in {', '.join(keys)}); "
                            "give another --out or the same options")


def run_sample(options: SampleOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Generate the missing images of OUT; returns a summary."""
    reporter = reporter or Reporter()
    options.validate()
    started = time.perf_counter()
    prompt_set = read_prompts(options.prompts)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = options.dtype or ("float16" if device.type == "cuda" else "float32")
    with reporter.status(f"loading {options.model}"):
        pipeline, model = sampling.load_sampling_pipeline(
            options.model, unet=options.unet, lora=options.lora, dtype=sampling.DTYPES[dtype_name], device=device)
    family = family_named(model["family"])
    denoiser = sampling.denoiser_of(pipeline)
    scheduler_name = options.scheduler or family.default_sampler
    pipeline.scheduler = sampling.make_scheduler(scheduler_name, pipeline.scheduler.config, family)
    resolution = options.resolution or family.native_resolution(denoiser, pipeline.vae)
    _check_resolution(pipeline, family, resolution)
    guidance = options.guidance if options.guidance is not None else sampling.DEFAULT_GUIDANCE[model["family"]]
    protocol = {
        "prompts": prompt_set.identity(),
        "seeds": list(range(options.seeds)),
        "steps": options.steps,
        "guidance": guidance,
        "resolution": resolution,
        "scheduler": scheduler_name,
        "scheduler_config": sampling.scheduler_settings(pipeline.scheduler),
        "eta": 0.0,
        "negative_prompt": "",
        "dtype": dtype_name,
        "noise": sampling.NOISE,
    }
    # the flow pipelines' T5 length (eta is recorded above for every family)
    protocol.update({key: value for key, value in family.pipeline_call_extras(pipeline).items() if key != "eta"})
    protocol = json.loads(json.dumps(protocol))
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sampling.read_manifest(out)
    _check_existing(out, existing, model, protocol)

    def record(prompt: Prompt, seed: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"file": sampling.image_name(prompt.index, seed), "prompt_index": prompt.index,
                                 "seed": seed, "prompt": prompt.text}
        if prompt_set.group_key:
            entry[prompt_set.group_key] = prompt.group
        return {**entry, "model": model, "protocol": protocol, "prompt_source": prompt_set.source,
                "inpo_version": inpo_pipeline.__version__}

    jobs = [(prompt, seed) for prompt in prompt_set.prompts for seed in range(options.seeds)]
    recorded = {r["file"] for r in existing}
    # images written by a run killed before its manifest line are recorded now, not redrawn
    present = [record(p, s) for p, s in jobs if (out / sampling.image_name(p.index, s)).exists()]
    sampling.write_manifest(out, [r for r in present if r["file"] in recorded]
                            + [r for r in present if r["file"] not in recorded])
    done = {r["file"] for r in present}
    todo = [(p, s) for p, s in jobs if sampling.image_name(p.index, s) not in done]
    reporter.line(f"{len(jobs)} images ({len(prompt_set)} prompts × {options.seeds} seeds): "
                  f"{len(done)} present, {len(todo)} to generate on {device} ({dtype_name})")
    channels = family.latent_channels(denoiser)
    latent_side = resolution // pipeline.vae_scale_factor
    with reporter.progress("sampling", len(todo), "img") as advance:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start:start + options.batch_size]
            latents, generators = sampling.initial_latents([s for _, s in batch], (channels, latent_side, latent_side))
            with torch.no_grad():
                images = pipeline(
                    prompt=[p.text for p, _ in batch], height=resolution, width=resolution,
                    num_inference_steps=options.steps, guidance_scale=guidance, **family.pipeline_call_extras(pipeline),
                    latents=family.pipeline_latents(latents).to(device, denoiser.dtype), generator=generators,
                    output_type="pil",
                ).images
            for (prompt, seed), image in zip(batch, images):
                target = out / sampling.image_name(prompt.index, seed)
                temporary = target.with_name(target.name + ".tmp")
                image.save(temporary, format="PNG")
                os.replace(temporary, target)
            sampling.append_manifest(out, [record(p, s) for p, s in batch])
            advance(len(batch))
    return {"out": str(out), "images": len(jobs), "generated": len(todo), "skipped": len(done),
            "prompts": len(prompt_set), "seeds": options.seeds, "device": str(device), "model": model,
            "protocol": protocol, "seconds": time.perf_counter() - started}

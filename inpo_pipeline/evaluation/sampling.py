"""Sampling under a pinned protocol: the pipeline, the scheduler, the noise, the image manifest.

Image (prompt i, seed s) starts from the latent noise of ``torch.Generator("cpu").manual_seed(s)``
drawn in float32 on the CPU, one generator per image; the same generator then feeds the
scheduler's own noise (ancestral samplers). So an image depends only on its prompt, its seed,
the protocol and the weights: not on the batch it was drawn in, not on the device, and the
base and the aligned model start every image from the same noise.

A sample folder holds ``p{prompt:05d}_s{seed}.png`` images and ``manifest.jsonl``: one JSON line
per image with its file, prompt index, prompt, seed, group (Parti category / HPS style), the
model's identity and the full protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inpo_pipeline.errors import UserError
from inpo_pipeline.families import FAMILIES, Family, ModelError, detect_family
from inpo_pipeline.models.reference import fingerprint_module, load_unet

MANIFEST = "manifest.jsonl"
SCHEDULERS: dict[str, str] = {name: scheduler for family in FAMILIES.values()
                              for name, scheduler in family.samplers.items()}
"""Every sampler `inpo sample --scheduler` knows; each family accepts its own (`Family.samplers`)."""
DEFAULT_GUIDANCE = {name: family.default_sampling_guidance for name, family in FAMILIES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NOISE = "per image: torch.Generator('cpu').manual_seed(seed), float32 randn, then the scheduler's init sigma"


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:05d}_s{seed}.png"


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, H, W) float32 CPU noise, row i from a generator seeded with seeds[i], and the generators."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return latents, generators


def make_scheduler(name: str, config: dict[str, Any], family: Family | None = None) -> Any:
    """The named scheduler built from a pipeline's scheduler config (its betas, offsets or shift)."""
    import diffusers

    known = family.samplers if family is not None else FAMILIES["sd15"].samplers
    if name not in known:
        owner = f" for {family.name} models" if family is not None else ""
        raise UserError(f"--scheduler must be one of {', '.join(known)}{owner}")
    return getattr(diffusers, known[name]).from_config(config)


def scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """The scheduler's configuration as plain JSON (diffusers' bookkeeping keys left out)."""
    config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    return json.loads(json.dumps(config, default=str))


def _lora_location(path: str) -> Path:
    """A LoRA folder written by `inpo train` (RUN_DIR/lora), or the run folder holding it."""
    location = Path(path)
    if (location / "lora").is_dir():
        location = location / "lora"
    if not location.exists():
        raise UserError(f"--lora {path} not found")
    return location


def files_sha256(location: Path) -> str:
    """sha256 over the names and contents of a file, or of every file under a folder."""
    files = sorted(p for p in ([location] if location.is_file() else location.rglob("*")) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def load_sampling_pipeline(
    model: str, *, unet: str | None, lora: str | None, dtype: torch.dtype, device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """The family's diffusers pipeline with the denoiser swapped / LoRA loaded, and its identity.

    The identity records the weights themselves: the denoiser's fingerprint (before any LoRA)
    and the sha256 of the LoRA files.
    """
    try:
        family = detect_family(model)
    except ModelError as error:
        raise UserError(str(error)) from error
    lora_location = _lora_location(lora) if lora else None
    parts: dict[str, Any] = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    if unet:
        parts[family.denoiser_folder] = load_unet(model, unet).to(dtype)
    parts.update(family.pipeline_kwargs(model))
    try:
        pipeline = family.diffusers_class().from_pretrained(model, **parts)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the pipeline {model}: {str(error).strip().splitlines()[0]}") from error
    try:
        family.check_pipeline_denoiser(pipeline, unet or model)
    except ModelError as error:
        raise UserError(str(error)) from error
    identity: dict[str, Any] = {
        "model": model, "family": family.name, "unet": unet, "lora": lora,
        "unet_fingerprint": fingerprint_module(denoiser_of(pipeline)), "lora_sha256": None,
    }
    if lora_location is not None:
        try:
            pipeline.load_lora_weights(str(lora_location))
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load LoRA weights from {lora_location}: "
                            f"{str(error).strip().splitlines()[0]}") from error
        identity["lora_sha256"] = files_sha256(lora_location)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, identity


def denoiser_of(pipeline: Any) -> torch.nn.Module:
    """The pipeline's UNet or transformer."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


def describe_model(identity: dict[str, Any] | None) -> str:
    """One line for a manifest's model identity: the pipeline, and the UNet / LoRA swapped in."""
    identity = identity or {}
    return (str(identity.get("model", "?")) + (f", UNet {identity['unet']}" if identity.get("unet") else "")
            + (f", LoRA {identity['lora']}" if identity.get("lora") else ""))


def read_manifest(folder: Path | str) -> list[dict[str, Any]]:
    """The image records of a sample folder, skipping a torn last line (a killed run)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or "file" not in record or "prompt" not in record:
            raise UserError(f"{path}:{number} is not an image record (needs at least file and prompt)")
        records.append(record)
    return records


def write_manifest(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the manifest atomically with `records`."""
    path = folder / MANIFEST
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    temporary.replace(path)


def append_manifest(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    with (folder / MANIFEST).open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        handle.flush()

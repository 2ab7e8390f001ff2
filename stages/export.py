"""`inpo export`: a finished run's weights in the format another tool loads.

diffusers: the LoRA folder as trained (`load_lora_weights`), or for a full run a pipeline folder
(`from_pretrained`); kohya / comfyui: a LoRA as one kohya-layout .safetensors file; single-file:
the whole SD1.x, SD2.x or SDXL model (a LoRA fused in) as one .safetensors in the original checkpoint layout
(`inpo_pipeline.models.single_file`; what A1111, ComfyUI's checkpoint loader and `from_single_file` read).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo_pipeline.errors import UserError
from inpo_pipeline.models.exports import KOHYA_FORMATS, kohya_metadata, kohya_state_dict, read_diffusers_lora
from inpo_pipeline.families import family_named
from inpo_pipeline.models.policy import LORA_FOLDER, export_pipeline

SINGLE_FILE = "single-file"
EXPORT_FORMATS = ("diffusers", *KOHYA_FORMATS, SINGLE_FILE)
KOHYA_FAMILIES = ("sd15", "sdxl")  # UNet families; kohya's layout for SD3/FLUX transformers differs


@dataclass
class ExportOptions:
    run: str
    out: str
    format: str = "diffusers"
    overwrite: bool = False


def run_export(options: ExportOptions) -> dict[str, Any]:
    """Write the export; returns what was written."""
    run_dir = Path(options.run)
    record_file = run_dir / "run.json"
    if not record_file.exists():
        raise UserError(f"{run_dir} holds no run.json: give the --out folder of an `inpo train` run")
    record = json.loads(record_file.read_text())
    if record.get("status") != "finished":
        raise UserError(f"{run_dir} is not finished (status {record.get('status')!r}); resume it with `inpo train --resume`")
    if options.format not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}")
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    settings, rank = record["store"]["settings"], int(record["options"]["lora_rank"])
    family = settings["family"]
    if options.format in KOHYA_FORMATS:
        if rank == 0:
            raise UserError(f"--format {options.format} holds a LoRA, and {run_dir} is a full fine-tune; "
                            "use --format diffusers (a pipeline folder)")
        if family not in KOHYA_FAMILIES:
            raise UserError(f"--format {options.format} is for SD1.x/2.x and SDXL LoRAs; this run's family is "
                            f"{family}: use --format diffusers")
        return _write_kohya(run_dir, out, record, rank, options.format)
    if options.format == SINGLE_FILE:
        return _write_single_file(run_dir, out, record, settings, rank)
    if rank > 0:
        _replace(out, lambda target: shutil.copytree(run_dir / LORA_FOLDER, target))
        return {"format": "diffusers", "path": str(out), "kind": "lora"}
    _replace(out, lambda target: export_pipeline(settings["model"], run_dir, family, rank, settings.get("unet"),
                                                 settings.get("vae"), target=target))
    return {"format": "diffusers", "path": str(out), "kind": f"pipeline ({family_named(family).denoiser_label})"}


def _write_kohya(run_dir: Path, out: Path, record: dict[str, Any], rank: int, name: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a {name} LoRA is one file; give a path ending in .safetensors")
    try:
        weights = kohya_state_dict(read_diffusers_lora(run_dir / LORA_FOLDER))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the LoRA of {run_dir}: {error}") from error
    _replace(out, lambda target: save_file(weights, str(target), metadata=kohya_metadata(record, rank)))
    return {"format": name, "path": str(out), "kind": "lora", "tensors": len(weights)}


def _write_single_file(run_dir: Path, out: Path, record: dict[str, Any], settings: dict[str, Any],
                       rank: int) -> dict[str, Any]:
    import tempfile

    from safetensors.torch import save_file

    from inpo_pipeline.models.single_file import TEXT_LAYOUTS, checkpoint

    family = family_named(settings["family"])
    if family.name not in TEXT_LAYOUTS:
        raise UserError(f"--format {SINGLE_FILE} writes SD1.x, SD2.x and SDXL checkpoints; this run's family is "
                        f"{family.name}: use --format diffusers")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a single-file checkpoint is one file; give a path ending in .safetensors")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as folder:
        pipeline_folder = export_pipeline(settings["model"], run_dir, family.name, rank, settings.get("unet"),
                                          settings.get("vae"), target=Path(folder) / "pipeline")
        pipeline = family.diffusers_class().from_pretrained(str(pipeline_folder),
                                                            **family.pipeline_kwargs(str(pipeline_folder)))
        try:
            weights = checkpoint(family.name, pipeline)
        except ValueError as error:  # a module the original layout has no place for
            raise UserError(f"--format {SINGLE_FILE}: {error}; use --format diffusers") from error
    metadata = {"format": "pt", "inpo_run": json.dumps({"options": _shareable(record["options"]),
                                                        "model": _shareable_value(settings["model"])}, default=str)}
    _replace(out, lambda target: save_file(weights, str(target), metadata=metadata))
    return {"format": SINGLE_FILE, "path": str(out), "kind": "checkpoint (UNet, VAE, text encoders)",
            "tensors": len(weights)}


def _shareable(options: dict[str, Any]) -> dict[str, Any]:
    """A run's options without this machine's paths (a checkpoint is shared)."""
    return {name: _shareable_value(value) for name, value in options.items()}


def _shareable_value(value: Any) -> Any:
    """A local path (absolute, or relative and present here) keeps its last component; anything
    else, a hub id included, is kept as it is."""
    if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)):
        return Path(value).name
    return value


def _replace(out: Path, write: Any) -> None:
    """Write to a sibling and rename it into place: a killed export leaves no half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.exporting")
    _remove(temporary)
    try:
        write(temporary)
        _remove(out)
        os.replace(temporary, out)
    except OSError as error:
        _remove(temporary)
        raise UserError(f"cannot write {out}: {error.strerror or error}") from error


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

"""`inpo rounds`: iterative InPO, each round's trained policy the next round's reference.

Round 1's reference is the base model. Round k (folder OUT/round-k) runs, each step a complete,
resumable unit that a rerun skips or finishes:

  1. data — (a) `same-data`: the one human dataset of --data, every round; or (b) `on-policy`:
     `inpo sample` of round k's reference on --prompts (two or more seeds per prompt), then
     `inpo label` with --scorer: fresh pairs from the model being aligned;
  2. store — `inpo invert` with round k's reference (OUT/round-k/store.zarr);
  3. run — `inpo train` from that store (OUT/round-k/run; its policy starts from the reference);
  4. pipeline — the run's policy as a full pipeline, a LoRA fused in (OUT/round-k/pipeline):
     round k+1's reference.

OUT/chain.json records the chain: the options, and per round which reference, data, store, run
and pipeline it used and produced (paths inside OUT relative to it), with the reference's fingerprint and the run's final metrics.
A rerun with the same options resumes wherever a kill left off; a larger --rounds extends the chain.
A finished chain can be moved and extended; a round interrupted half way resumes only in place
(its store, run and samples record the absolute path of their reference). Round k's inversion
and training seeds are `seed + k − 1`, so rounds do not redraw one another's timesteps; on-policy
sampling uses seeds 0 … K−1 every round (as `inpo sample` does), so each round's pairs start from
the same noise and differ by the policy alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import inpo_pipeline
from cache_schema import CacheStore, now_iso
from inpo_pipeline.errors import UserError
from inpo_pipeline.reporting import Reporter

CHAIN_FILE = "chain.json"
MODES = ("same-data", "on-policy")
STEPS = ("samples", "labels", "store", "run", "pipeline")
# set by the chain for every round; a --invert/--train KEY=VALUE may not override them
CHAIN_INVERT_FIELDS = ("model", "data", "out", "overwrite", "worker", "workers", "seed", "device", "unet", "vae")
CHAIN_TRAIN_FIELDS = ("cache", "out", "resume", "export_pipeline", "seed")
# not part of a chain's identity: a resume may change them
RESUMABLE_FIELDS = ("rounds", "device", "out")  # paths inside the chain are relative: it may move


@dataclass
class RoundsOptions:
    """The options of `inpo rounds`; `invert` and `train` hold InvertOptions / TrainOptions fields."""

    model: str
    out: str
    rounds: int = 2
    data: str | None = None
    prompts: str | None = None
    scorer: str | None = None
    scorer_model: str | None = None
    tie_margin: float = 0.0
    sample_seeds: int = 2
    sample_steps: int = 50
    sample_guidance: float | None = None
    sample_resolution: int | None = None
    seed: int = 0
    invert: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    device: str | None = None

    @property
    def mode(self) -> str:
        return "same-data" if self.data else "on-policy"

    def validate(self) -> None:
        checks = [
            ((self.data is None) != (self.prompts is None),
             "give either --data (every round on the same preference data) or --prompts with --scorer "
             "(each round on fresh pairs sampled from the current policy)"),
            (self.prompts is None or self.scorer is not None, "--prompts needs --scorer to label the sampled pairs"),
            (self.data is None or self.scorer is None, "--scorer labels on-policy samples; with --data it is unused"),
            (self.rounds >= 1, "--rounds must be at least 1"),
            (self.sample_seeds >= 2, "--sample-seeds must be at least 2 (a pair needs two images of one prompt)"),
            (self.sample_steps >= 1, "--sample-steps must be at least 1"),
            (math.isfinite(self.tie_margin) and self.tie_margin >= 0, "--tie-margin must be a finite number >= 0"),
            (0 <= self.seed < 2**62, "--seed must be between 0 and 2**62"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        _check_fields(self.invert, "invert", CHAIN_INVERT_FIELDS)
        _check_fields(self.train, "train", CHAIN_TRAIN_FIELDS)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE_FIELDS}


def _option_classes() -> dict[str, Any]:
    from stages.invert import InvertOptions
    from stages.train import TrainOptions

    return {"invert": InvertOptions, "train": TrainOptions}


def _check_fields(values: dict[str, Any], stage: str, reserved: tuple[str, ...]) -> None:
    names = {f.name for f in dataclasses.fields(_option_classes()[stage])}
    for key in values:
        if key in ("unet", "vae"):
            raise UserError(f"--{stage} {key}=…: a chain's reference is --model and then each round's exported "
                            "pipeline; give --model a pipeline folder that holds that part (e.g. `inpo export` of a run)")
        if key in reserved:
            raise UserError(f"--{stage} {key}=…: the chain sets {key} itself for every round")
        if key not in names:
            raise UserError(f"--{stage} {key}=…: `inpo {stage}` has no option {key.replace('_', '-')}")


def parse_stage_options(pairs: list[str] | None, stage: str) -> dict[str, Any]:
    """`KEY=VALUE` strings (keys as the stage's CLI options, dashes or underscores) → typed values."""
    fields = {f.name: f for f in dataclasses.fields(_option_classes()[stage])}
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, text = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not separator or not key:
            raise UserError(f"--{stage} {pair}: write KEY=VALUE, e.g. --{stage} "
                            + ("inversion-steps=10" if stage == "invert" else "steps=400"))
        if key not in fields:
            raise UserError(f"--{stage} {pair}: `inpo {stage}` has no option {key.replace('_', '-')}")
        values[key] = _typed(text.strip(), str(fields[key].type), f"--{stage} {pair}")
    return values


def _typed(text: str, annotation: str, where: str) -> Any:
    if "None" in annotation and text.lower() in ("none", "null", ""):
        return None
    try:
        if annotation.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a valid {annotation.split(' ')[0]}") from None
    return text


# ------------------------------------------------------------------------------ the chain record
def _read_chain(out: Path) -> dict[str, Any] | None:
    path = out / CHAIN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_chain(out: Path, chain: dict[str, Any]) -> None:
    temporary = out / (CHAIN_FILE + ".tmp")
    temporary.write_text(json.dumps(chain, indent=2, default=str) + "\n")
    os.replace(temporary, out / CHAIN_FILE)


def _start_chain(options: RoundsOptions) -> dict[str, Any]:
    out = Path(options.out)
    chain = _read_chain(out)
    identity = json.loads(json.dumps(options.identity()))
    if chain is None:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and holds no {CHAIN_FILE}; choose another --out for a new chain")
        out.mkdir(parents=True, exist_ok=True)
        chain = {"inpo_version": inpo_pipeline.__version__, "created_at": now_iso(), "mode": options.mode,
                 "options": identity, "rounds": []}
        _write_chain(out, chain)
        return chain
    differences = sorted(k for k in set(identity) | set(chain["options"]) if identity.get(k) != chain["options"].get(k))
    if differences:
        raise UserError(f"{out} holds a chain made with other options ({', '.join(differences)}); "
                        "rerun with the same options to resume it, or choose another --out")
    return chain


# ------------------------------------------------------------------------------ one round
def round_folder(out: Path | str, number: int) -> Path:
    return Path(out) / f"round-{number}"


def _data_of_round(options: RoundsOptions, entry: dict[str, Any], folder: Path, reference: str,
                   save: Any, reporter: Reporter) -> str:
    """The round's preference data: the human data, or the reference's samples labelled by the scorer."""
    if options.mode == "same-data":
        assert options.data is not None
        return options.data
    from stages.label import LabelOptions, read_label_metadata, run_label
    from stages.sample import SampleOptions, run_sample

    assert options.prompts is not None and options.scorer is not None
    samples, data = folder / "samples", folder / "data.parquet"
    if "samples" not in entry["done"]:
        reporter.line(f"round {entry['round']}: sampling {options.sample_seeds} seeds per prompt from {reference}")
        run_sample(SampleOptions(model=reference, prompts=options.prompts, out=str(samples), seeds=options.sample_seeds,
                                 steps=options.sample_steps, guidance=options.sample_guidance,
                                 resolution=options.sample_resolution, device=options.device), reporter)
        entry["samples"] = _inside(Path(options.out), samples)
        save("samples")
    if "labels" not in entry["done"]:
        reporter.line(f"round {entry['round']}: labelling with {options.scorer}")
        summary = run_label(LabelOptions(samples=str(samples), out=str(data), scorer=options.scorer,
                                         scorer_model=options.scorer_model, tie_margin=options.tie_margin,
                                         device=options.device, overwrite=True), reporter)
        entry["labels"] = {k: summary[k] for k in ("pairs", "ties", "first_preferred", "unpaired_images")}
        entry["scorer"] = read_label_metadata(data)["scorer"]
        save("labels")
    return str(data)


def _inside(out: Path, path: Path | str) -> str:
    """A path inside the chain folder, as chain.json records it: relative to the folder."""
    return Path(path).relative_to(out).as_posix()


def _run_status(run: Path) -> str | None:
    record = run / "run.json"
    return json.loads(record.read_text()).get("status") if record.exists() else None


def _run_round(options: RoundsOptions, chain: dict[str, Any], number: int, reporter: Reporter) -> dict[str, Any]:
    from inpo_pipeline.models.policy import export_pipeline
    from stages.invert import InvertOptions, run_invert
    from stages.train import TrainOptions, run_train

    out = Path(options.out)
    folder = round_folder(out, number)
    folder.mkdir(parents=True, exist_ok=True)
    reference = options.model if number == 1 else chain["rounds"][number - 2]["pipeline"]
    reference_path = options.model if number == 1 else str(out / reference)
    if len(chain["rounds"]) < number:
        chain["rounds"].append({"round": number, "reference": reference,
                                "reference_from_run": None if number == 1 else chain["rounds"][number - 2]["run"],
                                "seed": options.seed + number - 1, "done": [], "started_at": now_iso()})
        _write_chain(out, chain)
    entry = chain["rounds"][number - 1]

    def save(step: str) -> None:
        entry["done"].append(step)
        _write_chain(out, chain)

    data = _data_of_round(options, entry, folder, reference_path, save, reporter)
    entry["data"] = data if options.mode == "same-data" else _inside(out, data)
    store, run, pipeline = folder / "store.zarr", folder / "run", folder / "pipeline"
    if "store" not in entry["done"]:
        reporter.line(f"round {number}: inverting {data} with the reference {reference_path}")
        summary = run_invert(InvertOptions(model=reference_path, data=data, out=str(store), seed=entry["seed"],
                                           device=options.device, **options.invert), reporter)
        if not summary["complete"]:
            raise UserError(f"{store} is incomplete after inversion; run the same `inpo rounds` command again")
        opened = CacheStore.open(str(store))
        entry.update(store=_inside(out, store), store_created_at=opened.provenance.get("created_at"),
                     reference_fingerprint=opened.settings.get("unet_fingerprint"), store_rows=summary["rows_valid"])
        save("store")
    if "run" not in entry["done"]:
        if _run_status(run) != "finished":  # a kill after training, before this record, finished it
            reporter.line(f"round {number}: training from {store}")
            run_train(TrainOptions(cache=str(store), out=str(run), seed=entry["seed"], resume=True,
                                   **options.train), reporter)
        entry.update(run=_inside(out, run), final_metrics=json.loads((run / "run.json").read_text()).get("final_metrics"))
        save("run")
    if "pipeline" not in entry["done"]:
        record = json.loads((run / "run.json").read_text())
        settings = record["store"]["settings"]
        temporary = folder / ".pipeline.exporting"
        shutil.rmtree(temporary, ignore_errors=True)
        export_pipeline(settings["model"], run, settings["family"], int(record["options"]["lora_rank"]),
                        settings.get("unet"), settings.get("vae"), target=temporary)
        shutil.rmtree(pipeline, ignore_errors=True)
        os.replace(temporary, pipeline)
        entry.update(pipeline=_inside(out, pipeline), finished_at=now_iso())
        save("pipeline")
    return entry


def run_rounds(options: RoundsOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or resume, or extend) the chain; returns chain.json's content."""
    reporter = reporter or Reporter()
    options.validate()
    started = time.perf_counter()
    chain = _start_chain(options)
    finished = sum(1 for entry in chain["rounds"] if "pipeline" in entry["done"])
    if finished:
        reporter.line(f"{options.out}: {finished} round(s) already finished")
    for number in range(1, options.rounds + 1):
        if number <= len(chain["rounds"]) and "pipeline" in chain["rounds"][number - 1]["done"]:
            continue
        reporter.line(f"— round {number} of {options.rounds} ({options.mode}) —")
        _run_round(options, chain, number, reporter)
    chain["final_pipeline"] = chain["rounds"][options.rounds - 1]["pipeline"]
    _write_chain(Path(options.out), chain)
    return {**chain, "seconds": time.perf_counter() - started}

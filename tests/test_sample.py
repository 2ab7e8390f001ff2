"""`inpo sample` on the tiny pipelines: reproducible images, the manifest, resume, UNet swap, LoRA,
SDXL and the schedulers; and the prompt-set readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from inpo_pipeline.errors import UserError
from inpo_pipeline.worlds.example import CAPTIONS
from inpo_pipeline.models.reference import fingerprint_module, load_unet
from inpo_pipeline.data.prompts import read_prompts
from inpo_pipeline.reporting import Reporter
from inpo_pipeline.evaluation.sampling import MANIFEST, image_name, initial_latents, make_scheduler, read_manifest
from stages.sample import SampleOptions, run_sample
from inpo_pipeline.cli.app import app
from tests.sampling_helpers import perturbed_unet

runner = CliRunner()
FAST = ["--seeds", "2", "--steps", "2", "--resolution", "32", "--batch-size", "4"]
FILES = ["p00000_s0.png", "p00000_s1.png", "p00001_s0.png", "p00001_s1.png"]


def sample(model: Path, prompts: Path, out: Path, *extra: str):
    return runner.invoke(app, ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                                 *FAST, *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red fox in a snowy forest\n\nein Hund im Schnee — 雪の中の犬 🐕\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_sd15, prompt_file) -> Path:
    out = tmp_path_factory.mktemp("samples") / "base"
    result = sample(tiny_sd15, prompt_file, out)
    assert result.exit_code == 0, result.output
    return out


def test_manifest_records_identity_prompt_seed_and_protocol(base_run, tiny_sd15, prompt_file):
    assert sorted(p.name for p in base_run.glob("*.png")) == FILES
    records = read_manifest(base_run)
    assert [r["file"] for r in records] == FILES
    assert [(r["prompt_index"], r["seed"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt"] for r in records[1:3]] == ["a red fox in a snowy forest", "ein Hund im Schnee — 雪の中の犬 🐕"]
    model = records[0]["model"]
    assert model == {"model": str(tiny_sd15), "family": "sd15", "unet": None, "lora": None,
                     "unet_fingerprint": fingerprint_module(load_unet(str(tiny_sd15))), "lora_sha256": None}
    protocol = records[0]["protocol"]
    assert {k: protocol[k] for k in ("seeds", "steps", "guidance", "resolution", "scheduler", "eta", "dtype")} == \
        {"seeds": [0, 1], "steps": 2, "guidance": 7.5, "resolution": 32, "scheduler": "ddim", "eta": 0.0,
         "dtype": "float32"}
    assert protocol["prompts"] == read_prompts(str(prompt_file)).identity()
    assert protocol["prompts"]["count"] == 2
    assert protocol["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert protocol["scheduler_config"]["steps_offset"] == 1
    assert all(r["model"] == model and r["protocol"] == protocol for r in records)
    assert Image.open(base_run / FILES[0]).size == (32, 32)


def test_initial_noise_depends_only_on_the_seed():
    batch, _ = initial_latents([3, 7, 3], (4, 8, 8))
    alone, generators = initial_latents([7], (4, 8, 8))
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[0], batch[2])
    assert torch.equal(batch[0], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))[0])
    assert not torch.equal(batch[0], batch[1])
    # the generator continues (for ancestral samplers) from where the initial noise left it
    assert generators[0].initial_seed() == 7


def test_same_seed_same_bytes_and_batch_independence(base_run, tiny_sd15, prompt_file, tmp_path):
    again = run_sample(SampleOptions(model=str(tiny_sd15), prompts=str(prompt_file), out=str(tmp_path / "again"),
                                     seeds=2, steps=2, resolution=32, batch_size=4), Reporter(enabled=False))
    assert (again["generated"], again["skipped"]) == (4, 0)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (base_run / name).read_bytes()
    run_sample(SampleOptions(model=str(tiny_sd15), prompts=str(prompt_file), out=str(tmp_path / "single"),
                             seeds=2, steps=2, resolution=32, batch_size=1), Reporter(enabled=False))
    for name in FILES:  # the same noise; a batch of one may round a pixel differently
        difference = np.abs(pixels(tmp_path / "single" / name) - pixels(base_run / name))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert np.abs(pixels(base_run / FILES[0]) - pixels(base_run / FILES[1])).mean() > 5  # seeds differ


def test_resume_skips_existing_images(base_run, tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(base_run, out)
    (out / FILES[3]).unlink()  # never drawn
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    # FILES[1] was written but the run died before its manifest line; the last line is torn
    (out / MANIFEST).write_text("\n".join([lines[0], lines[2], lines[3][:50]]), encoding="utf-8")
    kept_mtime = (out / FILES[1]).stat().st_mtime_ns
    result = sample(tiny_sd15, prompt_file, out)
    assert result.exit_code == 0, result.output
    assert "3 present, 1 to generate" in result.output
    assert (out / FILES[1]).stat().st_mtime_ns == kept_mtime
    for name in FILES:
        assert (out / name).read_bytes() == (base_run / name).read_bytes()
    by_file = {r["file"]: r for r in read_manifest(base_run)}
    records = read_manifest(out)
    assert sorted(r["file"] for r in records) == FILES
    assert all(r == by_file[r["file"]] for r in records)
    assert not list(out.glob("*.tmp"))
    again = sample(tiny_sd15, prompt_file, out)
    assert "4 present, 0 to generate" in again.output


def test_resume_refuses_another_protocol(base_run, tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(base_run, out)
    result = sample(tiny_sd15, prompt_file, out, "--steps", "3")
    assert result.exit_code == 2
    assert "error:" in result.output and "another protocol (differs in steps)" in result.output


def test_unet_swap_and_lora(base_run, tiny_sd15, prompt_file, tmp_path):
    from peft import LoraConfig

    from inpo_pipeline.families import FAMILIES
    from inpo_pipeline.models.policy import save_policy

    unet = perturbed_unet(tiny_sd15, tmp_path / "run" / "unet", seed=1)
    generator = torch.Generator().manual_seed(1)
    result = sample(tiny_sd15, prompt_file, tmp_path / "swapped", "--unet", str(tmp_path / "run" / "unet"))
    assert result.exit_code == 0, result.output
    record = read_manifest(tmp_path / "swapped")[0]
    assert record["model"]["unet_fingerprint"] == fingerprint_module(unet)
    assert record["protocol"] == read_manifest(base_run)[0]["protocol"]  # paired with the base images
    assert np.abs(pixels(tmp_path / "swapped" / FILES[0]) - pixels(base_run / FILES[0])).mean() > 1

    lora_unet = load_unet(str(tiny_sd15))
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(FAMILIES["sd15"].lora_targets)))
    with torch.no_grad():
        for name, parameter in lora_unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    save_policy(lora_unet, tmp_path / "lora-run", "sd15", lora_rank=4)
    result = sample(tiny_sd15, prompt_file, tmp_path / "lora", "--lora", str(tmp_path / "lora-run"))
    assert result.exit_code == 0, result.output
    model = read_manifest(tmp_path / "lora")[0]["model"]
    assert model["lora"] == str(tmp_path / "lora-run") and len(model["lora_sha256"]) == 64
    assert model["unet_fingerprint"] == read_manifest(base_run)[0]["model"]["unet_fingerprint"]
    assert np.abs(pixels(tmp_path / "lora" / FILES[0]) - pixels(base_run / FILES[0])).mean() > 1


def test_sdxl_with_dpm_solver(tiny_sdxl, tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text("a bowl of ramen\n")
    result = runner.invoke(app, ["sample", "--model", str(tiny_sdxl), "--prompts", str(prompts), "--out",
                                   str(tmp_path / "xl"), "--steps", "2", "--resolution", "32", "--scheduler", "dpm++"])
    assert result.exit_code == 0, result.output
    (record,) = read_manifest(tmp_path / "xl")
    assert record["model"]["family"] == "sdxl"
    assert (record["protocol"]["guidance"], record["protocol"]["scheduler"]) == (5.0, "dpm++")
    assert record["protocol"]["scheduler_config"]["algorithm_type"] == "dpmsolver++"
    assert Image.open(tmp_path / "xl" / image_name(0, 0)).size == (32, 32)


def test_schedulers_keep_the_models_noise_schedule(tiny_sd15):
    config = json.loads((tiny_sd15 / "scheduler" / "scheduler_config.json").read_text())
    classes = {name: type(make_scheduler(name, config)).__name__ for name in ("ddim", "euler", "euler_a", "dpm++")}
    assert classes == {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                       "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}
    for name in classes:
        scheduler = make_scheduler(name, config)
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    with pytest.raises(UserError):
        make_scheduler("heun", config)


@pytest.mark.parametrize(("extra", "message"), [
    (["--scheduler", "heun"], "--scheduler must be one of ddim, euler, euler_a, dpm++"),
    (["--resolution", "30"], "--resolution 30 is not a multiple of 4"),
    (["--seeds", "0"], "--seeds must be at least 1"),
])
def test_bad_options_are_one_line_errors(tiny_sd15, prompt_file, tmp_path, extra, message):
    result = sample(tiny_sd15, prompt_file, tmp_path / "bad", *extra)
    assert result.exit_code == 2
    assert f"error: {message}" in result.output


# ------------------------------------------------------------------------------ prompt sets
def test_text_and_pickapic_prompts(tmp_path, pickapic):
    text = tmp_path / "a.txt"
    text.write_text("\ufefffirst\n\n  second  \r\nthird\n", encoding="utf-8")
    prompts = read_prompts(str(text))
    assert [(p.index, p.text, p.group) for p in prompts.prompts] == [(0, "first", None), (1, "second", None),
                                                                     (2, "third", None)]
    copy = tmp_path / "copy.txt"
    copy.write_text("first\nsecond\nthird\n")
    assert read_prompts(str(copy)).sha256 == prompts.sha256  # the prompts, not the file, identify the set

    from_parquet = read_prompts(str(pickapic["path"]))
    captions = pq.read_table(pickapic["path"], columns=["caption"]).column("caption").to_pylist()
    expected = list(dict.fromkeys(c.strip() for c in captions if c.strip()))
    assert [p.text for p in from_parquet.prompts] == expected
    assert len(expected) == 7 and set(expected) == {c.strip() for c in CAPTIONS if c.strip()}
    assert from_parquet.kind == "pickapic" and from_parquet.group_key is None
    folder = tmp_path / "pickapic"
    folder.mkdir()
    shutil.copy(pickapic["path"], folder / "test_unique-00000-of-00001.parquet")
    shutil.copy(pickapic["path"], folder / "train-00000-of-00001.parquet")
    assert [p.text for p in read_prompts(str(folder)).prompts] == expected


def test_parti_and_hps_prompts(tmp_path):
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\n"
                     "A sign that says \"hello\"\tWorld Knowledge\tWriting & Symbols\t\n"
                     "\n"
                     "\"a cat, on a mat\"\tAnimals\tBasic\tsome note\n"
                     "an astronaut riding a horse\tPeople\tImagination\t\n", encoding="utf-8")
    prompts = read_prompts(str(parti))
    assert prompts.kind == "parti" and prompts.group_key == "category"
    assert [(p.text, p.group) for p in prompts.prompts] == [
        ('A sign that says "hello"', "World Knowledge"), ("a cat, on a mat", "Animals"),
        ("an astronaut riding a horse", "People")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(UserError, match="no 'Prompt' column"):
        read_prompts(str(bad))

    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    (benchmark / "photo.json").write_text(json.dumps(["a photo of a dog"]))
    (benchmark / "anime.json").write_text(json.dumps(["an anime girl", "a mecha"]))
    styles = read_prompts(str(benchmark))
    assert styles.group_key == "style"
    assert [(p.index, p.text, p.group) for p in styles.prompts] == [
        (0, "an anime girl", "anime"), (1, "a mecha", "anime"), (2, "a photo of a dog", "photo")]
    assert [(p.text, p.group) for p in read_prompts(str(benchmark / "photo.json")).prompts] == [("a photo of a dog", "photo")]
    combined = tmp_path / "all.json"
    combined.write_text(json.dumps({"anime": ["an anime girl", "a mecha"], "photo": ["a photo of a dog"]}))
    assert read_prompts(str(combined)).sha256 == styles.sha256
    (tmp_path / "broken.json").write_text(json.dumps({"anime": [1, 2]}))
    with pytest.raises(UserError, match="not a list of prompt strings"):
        read_prompts(str(tmp_path / "broken.json"))
    with pytest.raises(UserError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))

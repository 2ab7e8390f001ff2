"""`inpo export` (stages/export.py, inpo_pipeline/models/exports.py): each format loaded back and compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from inpo_pipeline.cli.app import app
from tests.test_train import FAST, make_store

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd15, tiny_sdxl, pickapic) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    made = {}
    for name, model in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        store = make_store(model, pickapic["path"], folder / f"{name}.zarr")
        for kind, extra in (("lora", ["--lora-rank", "4"]), ("full", [])):
            if name == "sdxl" and kind == "full":
                continue
            run = folder / f"{name}-{kind}"
            result = runner.invoke(app, ["train", "--cache", str(store), "--out", str(run), *FAST, "--steps", "2",
                                         "--lr", "1e-2", "--warmup", "0", *extra])
            assert result.exit_code == 0, result.output
            made[f"{name}-{kind}"] = run
    made["sd15-model"], made["sdxl-model"] = tiny_sd15, tiny_sdxl
    return made


def _unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim, generator=generator),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=text, **extra).sample


def _pipeline(family: str, model: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    return cls.from_pretrained(str(model), **extra)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_kohya_lora_loads_back_and_gives_the_runs_outputs(runs, tmp_path, family):
    out = tmp_path / "inpo-lora.safetensors"
    result = runner.invoke(app, ["export", str(runs[f"{family}-lora"]), "--out", str(out), "--format", "kohya"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert any(key.endswith(".alpha") for key in keys) and any(key.endswith(".lora_down.weight") for key in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert json.loads(metadata["inpo_run"])["options"]["lora_rank"] == 4

    base = _pipeline(family, runs[f"{family}-model"])
    reference = _unet_output(base.unet)
    trained = _pipeline(family, runs[f"{family}-model"])
    trained.load_lora_weights(str(runs[f"{family}-lora"] / "lora"))
    kohya = _pipeline(family, runs[f"{family}-model"])
    kohya.load_lora_weights(str(out.parent), weight_name=out.name)
    expected, loaded = _unet_output(trained.unet), _unet_output(kohya.unet)
    assert (expected - reference).abs().max().item() > 1e-4  # the LoRA moved the UNet
    assert (loaded - expected).abs().max().item() <= 1e-6 * expected.abs().max().item() + 1e-7

    comfy = tmp_path / "comfy.safetensors"
    assert runner.invoke(app, ["export", str(runs[f"{family}-lora"]), "--out", str(comfy), "--format", "comfyui"]).exit_code == 0
    from safetensors.torch import load_file

    kohya_weights, comfy_weights = load_file(str(out)), load_file(str(comfy))  # ComfyUI reads kohya's layout
    assert kohya_weights.keys() == comfy_weights.keys()
    assert all(torch.equal(kohya_weights[key], comfy_weights[key]) for key in kohya_weights)


def test_diffusers_exports_of_a_lora_and_of_a_full_run(runs, tmp_path):
    lora = tmp_path / "lora"
    assert runner.invoke(app, ["export", str(runs["sd15-lora"]), "--out", str(lora)]).exit_code == 0
    pipe = _pipeline("sd15", runs["sd15-model"])
    pipe.load_lora_weights(str(lora))
    direct = _pipeline("sd15", runs["sd15-model"])
    direct.load_lora_weights(str(runs["sd15-lora"] / "lora"))
    assert torch.equal(_unet_output(pipe.unet), _unet_output(direct.unet))

    folder = tmp_path / "pipeline"
    result = runner.invoke(app, ["export", str(runs["sd15-full"]), "--out", str(folder), "--format", "diffusers"])
    assert result.exit_code == 0, result.output
    from diffusers import UNet2DConditionModel

    exported = _pipeline("sd15", folder)
    trained_unet = UNet2DConditionModel.from_pretrained(str(runs["sd15-full"] / "unet"))
    base = _pipeline("sd15", runs["sd15-model"])
    assert torch.equal(_unet_output(exported.unet), _unet_output(trained_unet))
    assert not torch.equal(_unet_output(exported.unet), _unet_output(base.unet))


def test_export_errors_are_one_line_and_write_nothing(runs, tmp_path):
    cases = [
        ([str(runs["sd15-full"]), "--format", "kohya", "--out", str(tmp_path / "a.safetensors")], "full fine-tune"),
        ([str(runs["sd15-lora"]), "--format", "kohya", "--out", str(tmp_path / "a.bin")], ".safetensors"),
        ([str(runs["sd15-lora"]), "--format", "ckpt", "--out", str(tmp_path / "a")], "--format must be one of"),
        ([str(tmp_path), "--out", str(tmp_path / "a")], "no run.json"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, ["export", *arguments])
        assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    existing = tmp_path / "taken.safetensors"
    existing.write_text("x")
    result = runner.invoke(app, ["export", str(runs["sd15-lora"]), "--format", "kohya", "--out", str(existing)])
    assert result.exit_code == 2 and "--overwrite" in result.output and existing.read_text() == "x"
    running = tmp_path / "running"
    running.mkdir()
    record = json.loads((runs["sd15-lora"] / "run.json").read_text())
    (running / "run.json").write_text(json.dumps({**record, "status": "running"}))
    result = runner.invoke(app, ["export", str(running), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not finished" in result.output


@pytest.fixture(scope="module")
def single_file_runs(tmp_path_factory, runs, pickapic) -> dict[str, Path]:
    """Runs of the layouts beyond SD1.5's: an SD2-type model (OpenCLIP text encoder) and an SDXL
    whose second encoder is wider than its first, as SDXL's bigG is (a loader tells them apart by
    width), each trained full and with a LoRA."""
    from inpo_pipeline.worlds.example import build_tiny_sd15, build_tiny_sdxl

    folder = tmp_path_factory.mktemp("single-file")
    made = {"sd15-model": runs["sd15-model"], "sd15-full": runs["sd15-full"], "sd15-lora": runs["sd15-lora"]}
    models = {"sd2": build_tiny_sd15(folder / "tiny-sd2", open_clip=True),
              "sdxl": build_tiny_sdxl(folder / "tiny-sdxl-wide", second_text_width=48)}
    for name, model in models.items():
        store = make_store(model, pickapic["path"], folder / f"{name}.zarr")
        made[f"{name}-model"] = model
        for kind, extra in (("lora", ["--lora-rank", "4"]), ("full", [])):
            run = folder / f"{name}-{kind}"
            result = runner.invoke(app, ["train", "--cache", str(store), "--out", str(run), *FAST, "--steps", "2",
                                         "--lr", "1e-2", "--warmup", "0", *extra])
            assert result.exit_code == 0, result.output
            made[f"{name}-{kind}"] = run
    return made


# keys only the family's original layout has (the loader picks its converters by them)
LAYOUT_KEYS = {
    "sd15": ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
    "sd2": ["cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.transformer.resblocks.4.attn.in_proj_weight"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
             "conditioner.embedders.1.model.transformer.resblocks.4.mlp.c_fc.weight",
             "model.diffusion_model.label_emb.0.0.weight"],
}


@pytest.mark.parametrize("model", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_single_file_checkpoint_loads_back_with_from_single_file(single_file_runs, tmp_path, model, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    runs = single_file_runs
    family = "sdxl" if model == "sdxl" else "sd15"
    out = tmp_path / f"{kind}.safetensors"
    result = runner.invoke(app, ["export", str(runs[f"{model}-{kind}"]), "--format", "single-file", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())
        shared = json.loads(handle.metadata()["inpo_run"])
    assert shared["options"]["lora_rank"] == (4 if kind == "lora" else 0)
    # no path of this machine in a file meant to be shared
    assert str(tmp_path.parent.parent) not in json.dumps(shared) and shared["model"] == runs[f"{model}-model"].name
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert set(LAYOUT_KEYS[model]) <= keys
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    loaded = cls.from_single_file(str(out), config=str(runs[f"{model}-model"]), local_files_only=True, **extra)
    folder = tmp_path / f"{kind}-pipeline"
    assert runner.invoke(app, ["export", str(runs[f"{model}-{kind}"]), "--format", "diffusers", "--out", str(folder)]).exit_code == 0
    if kind == "full":
        reference = _pipeline(family, folder)
    else:  # the LoRA export is the adapter alone; the checkpoint holds it fused into the base
        reference = _pipeline(family, runs[f"{model}-model"])
        reference.load_lora_weights(str(folder))
    # every weight of the models comes back bit for bit (a LoRA: fused, so to float32 rounding)
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    for name in names:
        theirs, ours = getattr(reference, name), getattr(loaded, name)
        if kind == "lora" and name == "unet":
            torch.testing.assert_close(_unet_output(ours), _unet_output(theirs), rtol=1e-5, atol=1e-6)
            continue
        expected, actual = theirs.state_dict(), ours.state_dict()
        assert set(expected) == set(actual), name
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    base = _pipeline(family, runs[f"{model}-model"])
    assert not torch.equal(_unet_output(loaded.unet), _unet_output(base.unet))


def test_single_file_refuses_other_families_and_other_suffixes(runs, tmp_path):
    flow_run = tmp_path / "flux-run"
    flow_run.mkdir()
    record = json.loads((runs["sdxl-lora"] / "run.json").read_text())
    record["store"]["settings"]["family"] = "flux"
    (flow_run / "run.json").write_text(json.dumps(record))
    flow = runner.invoke(app, ["export", str(flow_run), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")])
    assert flow.exit_code == 2 and "writes SD1.x, SD2.x and SDXL checkpoints" in flow.output and "flux" in flow.output
    suffix = runner.invoke(app, ["export", str(runs["sd15-full"]), "--format", "single-file", "--out", str(tmp_path / "x.ckpt")])
    assert suffix.exit_code == 2 and "ending in .safetensors" in suffix.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["flux-run"]
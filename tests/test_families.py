"""Every model family end to end on tiny models saved and loaded through the real code path:
SD3 and FLUX.1 (flow matching, DESIGN §1.8) and a v-prediction UNet (SD 2.x) beside the ε-models.
Detection, the store (σ per row, τ_v, reference errors), step-0 log 2 for every objective,
LoRA and full training whose output loads in the family's pipeline, `inpo sample`, and the
store of other weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.method import flow
from inpo_pipeline.cli.app import app
from inpo_pipeline.worlds.example import build_tiny_sd3
from inpo_pipeline.families import ModelError, detect_family
from inpo_pipeline.models.reference import load_reference, load_unet
from inpo_pipeline.method.objectives import OBJECTIVES, default_beta
from inpo_pipeline.models.policy import preference_metrics
from inpo_pipeline.method.processes import process_from_settings

runner = CliRunner()
INVERT = ["--resolution", "32", "--rows-per-shard", "8", "--shards-per-window", "2", "--batch-size", "16",
          "--dtype", "float32"]
FAST = ["--batch-size", "4", "--grad-accum", "1", "--warmup", "0", "--num-workers", "0"]
FAMILY_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sd15": "StableDiffusionPipeline"}


def invert(model: Path, data: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["invert", "--model", str(model), "--data", str(data), "--out", str(out),
                                 *INVERT, *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def models(tiny_sd3, tiny_flux, tiny_sd2v) -> dict[str, Path]:
    return {"sd3": tiny_sd3, "flux": tiny_flux, "sd2v": tiny_sd2v}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, models, pickapic) -> dict[str, Path]:
    """Default-recipe stores (authors; on flow models its exact-Euler variant) in float32."""
    root = tmp_path_factory.mktemp("families")
    return {name: invert(model, pickapic["path"], root / f"{name}.zarr") for name, model in models.items()}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red fox\na bowl of ramen\n")
    return path


def test_families_are_detected_from_model_index(models, tiny_sd15, tiny_sdxl, tmp_path):
    assert {name: detect_family(str(path)).name for name, path in models.items()} == \
        {"sd3": "sd3", "flux": "flux", "sd2v": "sd15"}
    assert detect_family(str(tiny_sdxl)).name == "sdxl"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "transformer": ["x", "y"]}))
    with pytest.raises(ModelError, match="not a pipeline inpo supports"):
        detect_family(str(tmp_path))


def test_flow_store_records_sigma_process_and_guidance(stores):
    for name in ("sd3", "flux"):
        store = CacheStore.open(stores[name])
        settings = store.settings
        assert settings["process"]["kind"] == "flow" and settings["process"]["sigma_sampling"] == "logit-normal"
        assert settings["timestep_mode"] == "exact" and settings["eta"] == 0.0  # the flow variant of the recipe
        batch = store.read_rows(store.valid_rows())
        assert batch.sigma is not None and batch.sigma.dtype == np.float32
        assert (batch.sigma >= flow.SIGMA_MIN).all() and (batch.sigma <= 1).all() and len(np.unique(batch.sigma)) > 5
        np.testing.assert_array_equal(batch.timestep, np.rint(batch.sigma.astype(np.float64) * 1000))
        assert store.summary()["raw_bytes_per_prompt"] == 4 * (store.layout.text_shape[0] * store.layout.text_shape[1]
                                                               + store.layout.pooled_dim)
    assert CacheStore.open(stores["flux"]).settings["guidance_embedding"] == 3.5
    assert "guidance_embedding" not in CacheStore.open(stores["sd3"]).settings
    assert CacheStore.open(stores["sd2v"]).settings["process"] == {"kind": "diffusion", "prediction": "v_prediction"}
    info = runner.invoke(app, ["cache", "info", str(stores["sd3"])])
    assert info.exit_code == 0 and "variant" in info.output and "/prompt raw" in info.output
    assert "flow velocity" in info.output
    assert "one chunk per shard; one prompt per object" in " ".join(info.output.replace("│", " ").split())


def test_flow_rows_hold_the_velocity_target_of_their_latents(stores):
    """τ_v = (x_σ − x0)/σ of the stored x_σ and x0 (DESIGN §1.8), to float32 rounding × 1/σ."""
    store = CacheStore.open(stores["sd3"])
    rows = store.valid_rows()
    batch = store.read_rows(rows, inputs="all")
    sigma = batch.sigma.astype(np.float64).reshape(-1, 1, 1, 1)
    for latent, clean, target in ((batch.latent_chosen, batch.clean_chosen, batch.target_chosen),
                                  (batch.latent_rejected, batch.clean_rejected, batch.target_rejected)):
        expected = (latent.astype(np.float64) - clean) / sigma
        np.testing.assert_allclose(target, expected, atol=float(4e-7 / sigma.min()) * np.abs(latent).max())


def test_flow_store_latents_are_the_euler_walk_of_the_reference(models, pickapic, tmp_path):
    """One row recomputed by hand: x0 → x_σ by m = ⌈nσ⌉ unconditional Euler steps (recipe inpo, w_inv 0)."""
    path = invert(models["sd3"], pickapic["path"], tmp_path / "inpo.zarr", "--recipe", "inpo", "--objectives", "all")
    store = CacheStore.open(path)
    reference = load_reference(str(models["sd3"]), with_vae=False)
    text, pooled = reference.text.encode([""], torch.device("cpu"))
    row = int(store.valid_rows()[0])
    batch = store.read_rows(np.array([row]), inputs="all")
    latent = torch.from_numpy(batch.clean_chosen).float()
    for step in flow.exact_walk(float(batch.sigma[0]), store.settings["inversion_steps"]):
        velocity = reference.denoise(latent, torch.tensor([step.label], dtype=torch.float32), text, pooled)
        latent = flow.euler_step(latent, velocity, torch.tensor([step.sigma_from], dtype=torch.float64),
                                 torch.tensor([step.sigma_to], dtype=torch.float64))
    np.testing.assert_allclose(batch.latent_chosen, latent.numpy(), atol=2e-5)


@pytest.mark.parametrize("name", ["sd3", "flux", "sd2v"])
@pytest.mark.parametrize("objective", ["inpo", "diffusion-dpo", "sft"])
def test_step_zero_is_log_2_and_margin_0_for_every_family(name, objective, stores):
    store = CacheStore.open(stores[name])
    reference = load_unet(store.settings["model"])
    beta = default_beta(OBJECTIVES[objective], store.settings["family"])
    result = preference_metrics(reference, store, store.valid_rows(), beta=beta, objective=objective)
    if OBJECTIVES[objective].pairwise:
        assert result["loss"] == pytest.approx(math.log(2), abs=2e-5)
    assert result["max_abs_margin"] < 1e-3


def test_flow_beta_defaults_are_the_flow_convention(stores):
    assert default_beta(OBJECTIVES["inpo"], "sd3") == default_beta(OBJECTIVES["inpo"], "flux")
    assert default_beta(OBJECTIVES["inpo"], "sd3") != default_beta(OBJECTIVES["inpo"], "sd15")


def _train(store: Path, run: Path, *extra: str):
    result = runner.invoke(app, ["train", "--cache", str(store), "--out", str(run), *FAST, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((run / "run.json").read_text())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_training_loads_with_the_family_pipeline_and_samples(name, stores, models, tmp_path, prompts_file):
    import diffusers

    run = tmp_path / "lora"
    record = _train(stores[name], run, "--steps", "2", "--lora-rank", "4", "--lr", "1e-2")
    assert record["options"]["beta"] == default_beta(OBJECTIVES["inpo"], name)
    assert "flow velocity" in record["beta_convention"]
    assert record["options"]["gradient_checkpointing"] is True
    pipeline_class = getattr(diffusers, FAMILY_PIPELINES[name])
    pipe = pipeline_class.from_pretrained(models[name])
    base = {key: value.clone() for key, value in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(run / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    changed = [key for key, value in pipe.transformer.state_dict().items()
               if key in base and not torch.equal(value, base[key])]
    assert changed and all("attn" in key for key in changed)

    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "--model", str(models[name]), "--prompts", str(prompts_file), "--out",
                                 str(out), "--lora", str(run), "--steps", "2", "--resolution", "32", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and manifest[0]["protocol"]["scheduler"] == "flow-euler"
    assert manifest[0]["model"]["lora_sha256"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_full_training_exports_a_pipeline_that_loads(name, stores, models, tmp_path):
    import diffusers

    run = tmp_path / "full"
    _train(stores[name], run, "--steps", "2", "--lr", "1e-3", "--export-pipeline")
    assert (run / "transformer" / "config.json").exists()
    pipeline_class = getattr(diffusers, FAMILY_PIPELINES[name])
    exported = pipeline_class.from_pretrained(run / "pipeline")
    base = pipeline_class.from_pretrained(models[name])
    assert any(not torch.equal(a, b) for a, b in zip(exported.transformer.parameters(), base.transformer.parameters()))
    image = exported("a red fox", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_v_prediction_trains_and_the_loss_moves(stores, tmp_path):
    run = tmp_path / "v"
    _train(stores["sd2v"], run, "--steps", "3", "--lr", "1e-3")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(lines[-1]["loss"] - math.log(2)) > 1e-4


def test_a_flow_store_from_other_weights_is_refused(pickapic, tmp_path):
    model = build_tiny_sd3(tmp_path / "model", seed=0)
    store = invert(model, pickapic["path"], tmp_path / "store.zarr", "--objectives", "inpo")
    shutil.rmtree(model / "transformer")
    build_tiny_sd3(tmp_path / "other", seed=1)
    shutil.copytree(tmp_path / "other" / "transformer", model / "transformer")
    result = runner.invoke(app, ["train", "--cache", str(store), "--out", str(tmp_path / "run"), *FAST, "--steps", "1"])
    assert result.exit_code != 0
    assert "transformer" in result.output and "other weights" in result.output


def test_flow_options_are_checked_in_one_line(models, pickapic, tmp_path):
    for extra, message in ((["--eta", "0.1"], "--eta"), (["--timestep-mode", "authors"], "--timestep-mode"),
                           (["--sigma-sampling", "beta"], "--sigma-sampling")):
        result = runner.invoke(app, ["invert", "--model", str(models["sd3"]), "--data", str(pickapic["path"]),
                                     "--out", str(tmp_path / "x.zarr"), *INVERT, *extra])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "x.zarr").exists()


def test_flow_sigma_options_on_a_diffusion_model_are_refused(models, pickapic, tmp_path):
    result = runner.invoke(app, ["invert", "--model", str(models["sd2v"]), "--data", str(pickapic["path"]),
                                 "--out", str(tmp_path / "x.zarr"), *INVERT, "--sigma-sampling", "uniform"])
    assert result.exit_code == 2 and "draws t uniformly" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x.zarr").exists()


def test_a_flow_scheduler_option_inpo_does_not_reproduce_is_one_line(models, pickapic, tmp_path):
    model = tmp_path / "karras-sd3"
    shutil.copytree(models["sd3"], model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_karras_sigmas": True}))
    result = runner.invoke(app, ["invert", "--model", str(model), "--data", str(pickapic["path"]),
                                 "--out", str(tmp_path / "x.zarr"), *INVERT])
    assert result.exit_code == 2 and "use_karras_sigmas=True" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()


def test_process_from_settings_of_an_old_epsilon_store(stores):
    """Stores made before flow support hold no "process": they are ε-model stores."""
    settings = dict(CacheStore.open(stores["sd2v"]).settings)
    settings.pop("process")
    assert process_from_settings(settings).prediction == "v_prediction"  # from the scheduler config
    settings["scheduler"] = {**settings["scheduler"], "prediction_type": "epsilon"}
    assert process_from_settings(settings).prediction == "epsilon"


@pytest.mark.parametrize("name", ["sd3", "flux", "sd2v"])
def test_verify_recomputes_rows_of_every_family_exactly(name, stores):
    result = runner.invoke(app, ["cache", "verify", str(stores[name]), "--recompute", "2"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("recomputed"))
    differences = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    # float32 stores: the recomputation batches rows differently, so matmul rounding may differ
    assert max(differences) < 1e-5, line
    assert result.output.rstrip().endswith(f"OK {stores[name]}")


def test_sd3_without_t5_encodes_as_the_pipeline_and_trains(pickapic, tmp_path, prompts_file):
    """SD3's documented memory option: a pipeline saved without text_encoder_3 conditions on the
    CLIP embeddings and zeros for T5, exactly as StableDiffusion3Pipeline.encode_prompt does."""
    from diffusers import StableDiffusion3Pipeline

    model = build_tiny_sd3(tmp_path / "no-t5")
    index = json.loads((model / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (model / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(model / "text_encoder_3")
    shutil.rmtree(model / "tokenizer_3")
    reference = load_reference(str(model), with_vae=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None)
    expected, _, expected_pooled, _ = pipe.encode_prompt(["a red fox"], None, None, do_classifier_free_guidance=False)
    text, pooled = reference.text.encode(["a red fox"], torch.device("cpu"))
    assert torch.equal(text, expected) and torch.equal(pooled, expected_pooled)

    store = invert(model, pickapic["path"], tmp_path / "store.zarr", "--objectives", "inpo")
    opened = CacheStore.open(store)
    result = preference_metrics(load_unet(str(model)), opened, opened.valid_rows(), beta=100.0)
    assert result["loss"] == pytest.approx(math.log(2), abs=2e-5)
    sampled = runner.invoke(app, ["sample", "--model", str(model), "--prompts", str(prompts_file), "--out",
                                  str(tmp_path / "samples"), "--steps", "2", "--resolution", "32"])
    assert sampled.exit_code == 0, sampled.output

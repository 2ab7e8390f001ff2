"""`--recipe authors` against an independent implementation of the released training loop.

`released_loop` below is written from DESIGN §1.5 alone (the authors' `train.py` at a9cfc4d with
diffusers 0.20's `DDIMInverseScheduler`): nothing from `inpo_pipeline.method.ddim` or
`inpo_pipeline.method.inversion`; ā comes from diffusers' own `DDIMScheduler`. Both sides draw the same
seeded z (the project's seed functions in `inpo_pipeline.method.plan` are the convention being shared),
so with η = 0.1 the comparison is still exact. The tiny models get a VAE scaling factor that puts
their latents at rms ≈ 1, the scale of SD's real latents, so that τ's sensitivity to the walk
is realistic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import CacheStore, RowPlan
from inpo_pipeline.cli.app import app
from inpo_pipeline.data.sources import open_source, prepare_image
from inpo_pipeline.worlds.example import build_tiny_sd15, build_tiny_sdxl, write_pickapic_parquet
from inpo_pipeline.method.plan import latent_sample_seed, noise_seed

runner = CliRunner()
RESOLUTION = 32
TIMESTEPS = (0, 1, 2, 50, 101, 102, 150, 500, 801, 802, 901, 902, 999)
TOLERANCE = 1e-5


# ------------------------------------------------------------------ the independent implementation
def released_grid(config: dict) -> tuple[list[int], int]:
    """DDIMInverseScheduler.set_timesteps(10) of diffusers 0.20 for a leading-spacing config."""
    stride = config["num_train_timesteps"] // 10
    grid = [j * stride + config["steps_offset"] for j in range(10)]
    rolled = grid[-1:] + grid[:-1]
    rolled[0] = rolled[1] - stride
    return rolled, stride


def released_loop(unet, scheduler_config: dict, x0: torch.Tensor, t: int, text: torch.Tensor,
                  added: dict | None, eta: float, z_at) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x_t and τ of one image as the released loop makes them (DESIGN §1.5); also the UNet calls."""
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler.from_config(scheduler_config).alphas_cumprod.double()
    initial = 1.0 if scheduler_config["set_alpha_to_one"] else alphas[0].item()
    departures, stride = released_grid(scheduler_config)
    x = x0.clone()
    calls = 0
    for step, d in enumerate(d for d in departures if d < t):
        eps = unet(x, torch.tensor([d]), encoder_hidden_states=text, added_cond_kwargs=added).sample
        calls += 1
        a_d = alphas[d].item() if d >= 0 else initial
        a_next = alphas[d + stride].item()
        x0_hat = (x - math.sqrt(1 - a_d) * eps) / math.sqrt(a_d)
        x = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps
        variance = (1 - a_d) / (1 - a_next) * (1 - a_next / a_d)  # DDIMScheduler._get_variance(d + s, d)
        x = x + eta * math.sqrt(variance) * z_at(step)
    a_t = alphas[t].item()
    # float64 here, because x_t − √ā_t·x0 cancels most of float32's digits at small t
    tau = ((x.double() - math.sqrt(a_t) * x0.double()) / math.sqrt(1 - a_t)).float()
    return x, tau, calls


def released_reference_error(unet, x_t, tau, t, text, added) -> float:
    prediction = unet(x_t, torch.tensor([t]), encoder_hidden_states=text, added_cond_kwargs=added).sample
    return (prediction.double() - tau.double()).pow(2).mean().item()


class Released:
    """The authors' per-image pipeline around `released_loop`: flip, posterior sample, conditioning."""

    def __init__(self, model: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
        self.scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        self.sdxl = (model / "text_encoder_2").exists()
        self.tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")]
        self.encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()]
        if self.sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
            self.encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2").eval())

    def conditioning(self, caption: str) -> tuple[torch.Tensor, dict | None]:
        """SD1.5: last hidden state. SDXL: penultimate states of both encoders, pooled of the 2nd,
        and the constant time ids (R, R, 0, 0, R, R)."""
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2] if self.sdxl else output.last_hidden_state)
            pooled = getattr(output, "text_embeds", None)
        if not self.sdxl:
            return states[0], None
        time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def clean_latent(self, image_bytes: bytes, flipped: bool, seed: int, source_row: int, draw: int,
                     image: int) -> torch.Tensor:
        pixels = torch.from_numpy(prepare_image(image_bytes, RESOLUTION).pixels)[None]
        if flipped:
            pixels = pixels.flip(-1)
        distribution = self.vae.encode(pixels).latent_dist
        z = torch.randn(distribution.mean.shape[1:], generator=torch.Generator().manual_seed(
            latent_sample_seed(seed, source_row, draw, image)))[None]
        return (distribution.mean + distribution.std * z) * self.vae.config.scaling_factor

    @torch.no_grad()
    def row(self, record, caption: str, t: int, flips, seed: int, draw: int, eta: float) -> dict:
        """x_t, τ, e_ref [caption, empty] of both images of one row; `caption` is "" when dropped."""
        text, added = self.conditioning(caption)
        empty_text, empty_added = self.conditioning("")
        out: dict = {"calls": 0}
        for image, (name, data) in enumerate((("chosen", record.chosen), ("rejected", record.rejected))):
            x0 = self.clean_latent(data, bool(flips[image]), seed, record.source_row, draw, image)

            def z_at(step: int, image: int = image) -> torch.Tensor:
                generator = torch.Generator().manual_seed(noise_seed(seed, record.source_row, draw, image, step))
                return torch.randn(x0.shape[1:], generator=generator)[None]

            x_t, tau, calls = released_loop(self.unet, self.scheduler, x0, t, text, added, eta, z_at)
            out[f"latent_{name}"], out[f"target_{name}"] = x_t[0].numpy(), tau[0].numpy()
            out[f"reference_error_{name}"] = [
                released_reference_error(self.unet, x_t, tau, t, text, added),
                released_reference_error(self.unet, x_t, tau, t, empty_text, empty_added),
            ]
            out["calls"] += calls
        return out


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ fixtures
def _real_scale(model: Path) -> Path:
    """Set the VAE scaling factor so that the model's latents have rms ≈ 1, like SD's real ones."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    source = open_source(str(write_pickapic_parquet(model.parent / "scale.parquet", num_pairs=8, ties=0, broken=0)["path"]))
    pixels = [prepare_image(r.chosen, RESOLUTION).pixels for r in source.read(list(range(8)))]
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(np.stack(pixels))).latent_dist
        # rms of a posterior sample: the random tiny VAE's std is not small as a trained one's is
        rms = (posterior.mean.pow(2) + posterior.var).mean().sqrt().item()
    config_path = model / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 1.0 / rms
    config_path.write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def real_scale_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-scale")
    return {"sd15": _real_scale(build_tiny_sd15(root / "sd15")), "sdxl": _real_scale(build_tiny_sdxl(root / "sdxl"))}


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> dict:
    return write_pickapic_parquet(tmp_path_factory.mktemp("authors-data") / "pairs.parquet", num_pairs=13,
                                  seed=5, ties=0, broken=0)


# ------------------------------------------------------------------ the shard, row by row
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("eta, batch_size, tolerance", [(0.0, 1, 1e-6), (0.1, 1, 1e-6), (0.1, 5, TOLERANCE)])
def test_authors_mode_matches_the_released_loop(family, eta, batch_size, tolerance, real_scale_models, clean_data):
    """Stored x_t, τ and e_ref of `--recipe authors` rows equal the released loop's (float32).

    One image per UNet call, as the released loop runs here, x_t and τ come out bit-identical
    (measured: 0.0; e_ref ≤ 1.5e-7). In batches of 5, the UNet's batched kernels move x_t by
    ≤ 2e-6 and τ by ≤ 1e-5 relative (τ is small at low t, where x_t − √ā·x0 cancels).
    """
    from cache_schema import round_to_storage
    from inpo_pipeline.method.inversion import InversionConfig, invert_shard
    from inpo_pipeline.models.reference import load_reference

    model = real_scale_models[family]
    reference = load_reference(str(model))
    source = open_source(str(clean_data["path"]))
    records = {r.source_row: r for r in source.read(list(range(13)))}
    count = len(TIMESTEPS)
    captions = [""] + [records[row].caption for row in range(count)]
    # rows 3 and 8 were drawn for prompt dropout: inverted, referenced and trained with ""
    prompt_index = np.array([0 if row in (3, 8) else row + 1 for row in range(count)], dtype=np.int32)
    flips = np.array([[row % 2, (row // 2) % 2] for row in range(count)], dtype=np.uint8)
    plan = RowPlan(timestep=np.array(TIMESTEPS, dtype=np.int32), prompt_index=prompt_index,
                   source_row=np.arange(count, dtype=np.int64), draw=np.zeros(count, dtype=np.int16),
                   caption_index=np.arange(1, count + 1, dtype=np.int32), flip=flips)
    released = Released(model)
    # the store holds one embedding per prompt; give the shard the released side's own ones, so
    # that only the walk itself is compared (batched text encoding differs in the last bits)
    with torch.no_grad():
        conditioned = [released.conditioning(caption) for caption in captions]
    text = torch.cat([c[0] for c in conditioned]).numpy()
    pooled = torch.cat([c[1]["text_embeds"] for c in conditioned]).numpy() if family == "sdxl" else None

    def lookup(indices):
        return text[indices], None if pooled is None else pooled[indices]

    seed = 11
    config = InversionConfig(resolution=RESOLUTION, storage_dtype="float32", mode="authors", guidance=1.0,
                             eta=eta, seed=seed, batch_size=batch_size, time_ids="constant", vae_latent="sample")
    result, work = invert_shard(reference, plan, records, lookup, config, torch.device("cpu"))
    assert np.array_equal(result.latent_chosen, round_to_storage(result.latent_chosen, "float32"))

    worst: dict[str, float] = {}
    calls = 0
    for row, t in enumerate(TIMESTEPS):
        expected = released.row(records[row], captions[prompt_index[row]], t, flips[row], seed, 0, eta)
        calls += expected["calls"]
        for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected"):
            error = relative(getattr(result, name)[row], expected[name])
            worst[name] = max(worst.get(name, 0.0), error)
            assert error <= tolerance, (family, eta, t, name, error)
        for name in ("reference_error_chosen", "reference_error_rejected"):
            for column in (0, 1):
                error = relative(getattr(result, name)[row, column], np.array(expected[name][column]))
                worst[name] = max(worst.get(name, 0.0), error)
                assert error <= tolerance, (family, eta, t, name, column, error)
        if family == "sdxl":
            assert result.time_ids_chosen[row].tolist() == [RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]
    print(f"{family} eta={eta} batch {batch_size}: worst relative errors {worst}")
    # the same number of UNet calls: 2 images × |{d < t}| per row
    assert result.inversion_steps.tolist() == [1, 1, 2, 2, 2, 3, 3, 6, 9, 10, 10, 10, 10]
    assert work.row_evaluations == calls + 4 * count
    # the walk really moved: x_t is far from x0 at high t
    assert relative(result.latent_chosen[-1], result.target_chosen[-1]) < 10


def test_released_loop_makes_6_38_unet_calls_per_image():
    departures, _ = released_grid({"num_train_timesteps": 1000, "steps_offset": 1})
    calls = sum(sum(1 for d in departures if d < t) for t in range(1000))
    assert calls / 1000 == pytest.approx(6.382, abs=1e-12)


# ------------------------------------------------------------------ the CLI, the store, the trainer
SMALL = ["--resolution", "32", "--rows-per-shard", "4", "--shards-per-window", "2", "--batch-size", "6"]


def invert(model: Path, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["invert", "--model", str(model), "--data", str(data), "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def authors_store(tmp_path_factory, real_scale_models, pickapic) -> Path:
    out = tmp_path_factory.mktemp("authors-store") / "sd15-authors.zarr"
    result = invert(real_scale_models["sd15"], pickapic["path"], out, "--recipe", "authors", "--dtype", "float32",
                    "--timesteps-per-pair", "2", "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


def test_recipe_authors_records_every_setting(authors_store):
    settings = CacheStore.open(authors_store).settings
    assert {k: settings[k] for k in ("recipe", "timestep_mode", "inversion_steps", "inversion_guidance", "eta",
                                     "inversion_prompt_dropout", "time_ids", "vae_latent", "flip")} == {
        "recipe": "authors", "timestep_mode": "authors", "inversion_steps": 10, "inversion_guidance": 1.0,
        "eta": 0.1, "inversion_prompt_dropout": 0.2, "time_ids": "constant", "vae_latent": "sample", "flip": 0.5}
    info = runner.invoke(app, ["cache", "info", str(authors_store)])
    assert info.exit_code == 0, info.output
    text = " ".join(info.output.split())
    assert "recipe authors" in text and "the released loop" in text and "x0 sample" in text


def test_store_rows_match_the_released_loop(authors_store, real_scale_models, pickapic):
    """End to end: rows of a real `inpo invert --recipe authors` store, recomputed independently."""
    store = CacheStore.open(authors_store)
    rows = store.valid_rows()
    plan = store.read_plan(rows)
    stored = store.read_rows(rows)
    settings = store.settings
    # dropout and flips were drawn and recorded; dropped rows carry the empty prompt
    assert (plan.prompt_index == 0).any() and (plan.prompt_index != 0).any()
    assert plan.flip.any() and not plan.flip.all()
    assert np.array_equal(plan.prompt_index[plan.prompt_index != 0], plan.caption_index[plan.prompt_index != 0])
    records = {r.source_row: r for r in open_source(str(pickapic["path"])).read(np.unique(plan.source_row))}
    texts = store.prompt_texts()
    released = Released(real_scale_models["sd15"])
    checked = [i for i in range(len(rows)) if plan.prompt_index[i] == 0][:2] + \
              [i for i in range(len(rows)) if plan.prompt_index[i] != 0][:3]
    for i in checked:
        expected = released.row(records[int(plan.source_row[i])], texts[plan.prompt_index[i]], int(plan.timestep[i]),
                                plan.flip[i], settings["seed"], int(plan.draw[i]), settings["eta"])
        for name in ("latent_chosen", "target_rejected"):
            assert relative(getattr(stored, name)[i], expected[name]) <= TOLERANCE, (i, name)
        assert relative(stored.reference_error_chosen[i], np.array(expected["reference_error_chosen"])) <= TOLERANCE


def test_explicit_options_override_the_recipe(real_scale_models, pickapic, tmp_path):
    out = tmp_path / "override.zarr"
    result = invert(real_scale_models["sd15"], pickapic["path"], out, "--recipe", "authors", "--eta", "0",
                    "--flip", "0", "--max-pairs", "6")
    assert result.exit_code == 0, result.output
    settings = CacheStore.open(out).settings
    assert settings["recipe"] == "authors" and settings["eta"] == 0.0 and settings["flip"] == 0.0
    assert settings["timestep_mode"] == "authors" and settings["vae_latent"] == "sample"
    assert not CacheStore.open(out).read_plan(slice(None)).flip.any()
    info = runner.invoke(app, ["cache", "info", str(out)])
    assert "with overrides" in " ".join(info.output.split())


def test_default_recipe_is_the_authors_and_inpo_is_the_variant(tiny_sd15, pickapic, tmp_path):
    out = tmp_path / "default.zarr"
    result = invert(tiny_sd15, pickapic["path"], out, "--max-pairs", "4")
    assert result.exit_code == 0, result.output
    assert CacheStore.open(out).settings["recipe"] == "authors"
    variant = tmp_path / "inpo.zarr"
    result = invert(tiny_sd15, pickapic["path"], variant, "--max-pairs", "4", "--recipe", "inpo")
    assert result.exit_code == 0, result.output
    settings = CacheStore.open(variant).settings
    assert (settings["recipe"], settings["timestep_mode"], settings["inversion_guidance"], settings["eta"],
            settings["vae_latent"], settings["flip"], settings["inversion_prompt_dropout"], settings["time_ids"]) == \
        ("inpo", "exact", 0.0, 0.0, "mean", 0.0, 0.0, "original")


@pytest.mark.parametrize("options, message", [
    (["--timestep-mode", "grid"], "grid was removed"),
    (["--recipe", "paper"], "--recipe must be one of"),
    (["--flip", "1.5"], "--flip must be between 0 and 1"),
    (["--inversion-prompt-dropout", "-0.1"], "--inversion-prompt-dropout must be between 0 and 1"),
    (["--time-ids", "random"], "--time-ids must be one of"),
    (["--vae-latent", "mode"], "--vae-latent must be one of"),
    (["--eta", "nan"], "--eta must be >= 0"),
])
def test_bad_recipe_options_are_one_line(tiny_sd15, pickapic, tmp_path, options, message):
    result = invert(tiny_sd15, pickapic["path"], tmp_path / "bad.zarr", *options)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad.zarr").exists()


def _train(cache: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--cache", str(cache), "--out", str(out), "--steps", "1", "--batch-size", "4",
                               "--grad-accum", "1", "--num-workers", "0", "--warmup", "1", *extra])


def test_trainer_defaults_on_an_authors_store(authors_store, tmp_path):
    """No extra dropout at training time (it happened before inversion); step 0 is log 2."""
    result = _train(authors_store, tmp_path / "run")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["options"]["prompt_dropout"] == 0.0 and record["options"]["mixed_precision"] == "no"
    assert record["store"]["settings"]["recipe"] == "authors"
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # asking for train-time dropout on a conditionally inverted store is allowed, and said
    result = _train(authors_store, tmp_path / "run-dropout", "--prompt-dropout", "0.2")
    assert result.exit_code == 0, result.output
    assert "inverted with their caption" in " ".join(result.output.split())


def test_trainer_default_dropout_on_an_unconditional_store(tiny_sd15, pickapic, tmp_path):
    out = tmp_path / "inpo.zarr"
    assert invert(tiny_sd15, pickapic["path"], out, "--max-pairs", "8", "--recipe", "inpo").exit_code == 0
    result = _train(out, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["options"]["prompt_dropout"] == 0.2


def _as_v1_grid_store(store: Path, target: Path) -> Path:
    """What an earlier inpo wrote: schema v1 (no caption_index/flip arrays), `grid` mode settings."""
    import shutil

    shutil.copytree(store, target)
    for name in ("caption_index", "flip", "clean_chosen", "clean_rejected", "forward_error_chosen",
                 "forward_error_rejected"):
        shutil.rmtree(target / "rows" / name)
    meta = json.loads((target / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    meta["attributes"]["layout"].pop("forward_arrays")
    settings = meta["attributes"]["settings"]
    for key in ("recipe", "inversion_prompt_dropout", "time_ids", "vae_latent", "flip", "objectives"):
        settings.pop(key, None)
    settings["timestep_mode"] = "grid"
    (target / "zarr.json").write_text(json.dumps(meta))
    return target


def test_a_v1_grid_store_is_readable_and_never_passes_for_the_authors(tiny_sd15, pickapic, tmp_path):
    made = tmp_path / "made.zarr"
    assert invert(tiny_sd15, pickapic["path"], made, "--max-pairs", "8").exit_code == 0
    old = _as_v1_grid_store(made, tmp_path / "v1.zarr")
    store = CacheStore.open(old)
    assert store.schema_version == 1
    plan = store.read_plan(slice(None))
    assert np.array_equal(plan.caption_index, plan.prompt_index) and not plan.flip.any()
    info = runner.invoke(app, ["cache", "info", str(old)])
    assert info.exit_code == 0, info.output
    text = " ".join(info.output.split())
    assert "inpo.cache v1" in text and "NOT the authors' algorithm" in text and "retired" in text
    verify = runner.invoke(app, ["cache", "verify", str(old)])
    assert verify.exit_code == 0, verify.output
    result = _train(old, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "does not reproduce the authors" in " ".join(result.output.split())
    # a store older than the baselines serves InPO only, and says how to get the others
    baseline = _train(old, tmp_path / "dpo", "--objective", "diffusion-dpo")
    assert baseline.exit_code == 2
    assert "--objectives all" in baseline.output and "Traceback" not in baseline.output, baseline.output
    # and it cannot be resumed by `inpo invert` into something that looks current
    again = invert(tiny_sd15, pickapic["path"], old, "--max-pairs", "8")
    assert again.exit_code == 2 and "schema v1" in again.output


def test_verify_recomputes_authors_rows(authors_store):
    """`cache verify --recompute` redoes rows with their recorded flips, samples, noise and drops."""
    assert CacheStore.open(authors_store).check_integrity() == []
    result = runner.invoke(app, ["cache", "verify", str(authors_store), "--recompute", "4"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output

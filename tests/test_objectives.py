"""The baselines from one store (DESIGN §1.7): Diffusion-DPO and SFT read x0 and the cached
forward-noised reference errors; their step 0, their equivalence with an online computation,
and the stores that cannot serve them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.data.batches import BatchSchedule, read_micro_batch
from inpo_pipeline.cli.app import app
from inpo_pipeline.data.sources import open_source
from inpo_pipeline.method.loss import diffusion_dpo_loss
from inpo_pipeline.models.reference import load_unet
from inpo_pipeline.method.objectives import OBJECTIVES
from inpo_pipeline.method.plan import forward_noise_seed
from inpo_pipeline.models.policy import policy_errors, preference_metrics
from tests.test_authors_recipe import Released

runner = CliRunner()
RESOLUTION = 32
INVERT = ["--resolution", str(RESOLUTION), "--rows-per-shard", "8", "--shards-per-window", "2",
          "--batch-size", "16", "--timesteps-per-pair", "2"]
FAST = ["--batch-size", "4", "--grad-accum", "2", "--warmup", "0", "--num-workers", "0"]


def invert(model: Path, data: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["invert", "--model", str(model), "--data", str(data), "--out", str(out),
                                 *INVERT, *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_sd15, tiny_sdxl, pickapic) -> dict[str, Path]:
    """Default (authors) stores in float32, so x0 is stored exactly as the VAE gave it."""
    root = tmp_path_factory.mktemp("objectives")
    return {family: invert(model, pickapic["path"], root / f"{family}.zarr", "--dtype", "float32")
            for family, model in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl))}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_diffusion_dpo_step_zero_is_log_2_on_every_row(family, empty_prompt, stores):
    """As for InPO (DESIGN §2): with policy = reference, the loss is log 2 and the margin 0.

    To float rounding: e ≈ 1 against ε, so one float32 ulp of e (1.2e-7) is 3e-4 in the argument
    at β/2 = 2500 (measured: max |margin| 6e-4 to 9e-4, |loss − log 2| ≤ 1.6e-5)."""
    store = CacheStore.open(stores[family])
    reference = load_unet(store.settings["model"])
    result = preference_metrics(reference, store, store.valid_rows(), beta=5000.0, empty_prompt=empty_prompt,
                                objective="diffusion-dpo")
    assert result["loss"] == pytest.approx(math.log(2), abs=5e-5)
    assert result["max_abs_margin"] < 2e-3


def test_sft_first_loss_is_the_references_error_on_the_winners(stores, tmp_path):
    run = tmp_path / "sft"
    result = runner.invoke(app, ["train", "--cache", str(stores["sd15"]), "--out", str(run), *FAST,
                                 "--objective", "sft", "--steps", "1", "--prompt-dropout", "0.5"])
    assert result.exit_code == 0, result.output
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["objective"] == "sft"
    assert first["policy_error_rejected"] is None

    store = CacheStore.open(stores["sd15"])
    schedule = BatchSchedule(store.valid_rows(), 4, 1, 0, 0, 0.5, block_rows=store.layout.rows_per_shard)
    expected = []
    for micro in range(2):
        rows, dropped, _ = schedule.micro_batch(micro)
        errors = store.read_rows(rows, inputs="forward").forward_error_chosen
        expected.append(errors[np.arange(len(rows)), dropped.astype(int)])
    expected = np.concatenate(expected)
    assert dropped.any() or schedule.micro_batch(0)[1].any()  # both prompt columns are exercised
    assert first["loss"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert abs(first["margin"]) < 1e-5
    record = json.loads((run / "run.json").read_text())
    assert record["options"]["objective"] == "sft"


def test_diffusion_dpo_trains_with_its_beta(stores, tmp_path):
    run = tmp_path / "dpo"
    result = runner.invoke(app, ["train", "--cache", str(stores["sd15"]), "--out", str(run), *FAST,
                                 "--objective", "diffusion-dpo", "--steps", "3", "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=5e-5)  # fp32 rounding × β/2, as in the step-0 test
    assert {line["objective"] for line in lines} == {"diffusion-dpo"}
    assert json.loads((run / "run.json").read_text())["options"]["beta"] == 5000.0
    assert "objective diffusion-dpo" in result.output


class OnlineDiffusionDPO(Released):
    """Diffusion-DPO computed the online way, from the source images (DESIGN §1.7): VAE encode
    (the store's flips and posterior samples), the text encoders, ε and t, a reference forward.
    Written with diffusers and transformers only (the independent pipeline of the authors-recipe
    test), not with the project's inversion code."""

    def __init__(self, model: Path) -> None:
        from diffusers import DDPMScheduler

        super().__init__(model)
        self.alphas = DDPMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod

    def loss(self, policy: torch.nn.Module, store: CacheStore, rows: np.ndarray, data: Path,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss and, per row, (e_θ^w, e_θ^l, e_ref^w, e_ref^l)."""
        settings = store.settings
        source = open_source(str(data))
        plan = store.read_plan(rows)
        records = {r.source_row: r for r in source.read(sorted(set(plan.source_row.tolist())))}
        losses, per_row = [], []
        for index in range(len(rows)):
            record = records[int(plan.source_row[index])]
            caption = store.prompt_texts(np.array([plan.prompt_index[index]]))[0]
            with torch.no_grad():
                text, added = self.conditioning(caption)
            t = int(plan.timestep[index])
            shape = tuple(store.layout.latent_shape)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(
                forward_noise_seed(settings["seed"], record.source_row, int(plan.draw[index]))))[None]
            errors = {}
            for image, (name, data) in enumerate((("chosen", record.chosen), ("rejected", record.rejected))):
                with torch.no_grad():
                    x0 = self.clean_latent(data, bool(plan.flip[index, image]), settings["seed"],
                                           record.source_row, int(plan.draw[index]), image)
                alpha = self.alphas[t].double()
                x_t = (alpha.sqrt().float() * x0 + (1 - alpha).sqrt().float() * noise)
                step = torch.tensor([t])
                with torch.no_grad():
                    reference = self.unet(x_t, step, text, added_cond_kwargs=added).sample
                prediction = policy(x_t, step, text, added_cond_kwargs=added).sample
                errors[name] = ((prediction - noise) ** 2).mean(), ((reference - noise) ** 2).mean()
            result = diffusion_dpo_loss(errors["chosen"][0][None], errors["rejected"][0][None],
                                        errors["chosen"][1][None], errors["rejected"][1][None], beta)
            losses.append(result.loss)
            per_row.append(torch.stack([errors["chosen"][0], errors["rejected"][0],
                                        errors["chosen"][1], errors["rejected"][1]]).detach())
        return torch.cat(losses).mean(), torch.stack(per_row)


def _perturbed(model: str) -> torch.nn.Module:
    policy = load_unet(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 2e-3)
    return policy.requires_grad_(True)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_diffusion_dpo_equals_the_online_computation(family, stores, tiny_sd15, tiny_sdxl, pickapic):
    """Loss and gradient from the store equal VAE encode + fresh forward of the reference."""
    store = CacheStore.open(stores[family])
    rows = store.valid_rows()[:4]
    beta = 5000.0

    cached_policy = _perturbed(store.settings["model"])
    batch = read_micro_batch(store, rows, np.zeros(len(rows), dtype=bool), "diffusion-dpo")
    chosen, rejected = policy_errors(cached_policy, batch, torch.device("cpu"))
    cached = OBJECTIVES["diffusion-dpo"].loss(chosen, rejected, batch["reference_error_chosen"],
                                              batch["reference_error_rejected"], beta).loss.mean()
    cached.backward()

    online_policy = _perturbed(store.settings["model"])
    online, online_errors = OnlineDiffusionDPO(tiny_sd15 if family == "sd15" else tiny_sdxl).loss(
        online_policy, store, rows, pickapic["path"], beta)
    online.backward()

    cached_errors = torch.stack([chosen.detach(), rejected.detach(), batch["reference_error_chosen"],
                                 batch["reference_error_rejected"]], dim=1)
    # every error the loss is made of agrees to float32 rounding (e ≈ 1, 1 ulp = 1.2e-7) ...
    assert float((cached_errors - online_errors).abs().max()) < 2e-6
    assert abs(cached.item() - math.log(2)) > 1e-3  # the perturbation moved the loss
    # ... and the loss multiplies their differences by β/2 = 2500, so it agrees to ≈ 2500 × 2e-6 × 4
    assert cached.item() == pytest.approx(online.item(), rel=1e-3)
    cached_grad = torch.cat([p.grad.flatten() for p in cached_policy.parameters()])
    online_grad = torch.cat([p.grad.flatten() for p in online_policy.parameters()])
    assert float((cached_grad - online_grad).norm() / online_grad.norm()) < 1e-3


def test_inpo_only_store_refuses_the_baselines_in_one_line(tiny_sd15, pickapic, tmp_path, stores):
    small = invert(tiny_sd15, pickapic["path"], tmp_path / "inpo-only.zarr", "--objectives", "inpo",
                   "--dtype", "float32")
    for objective in ("diffusion-dpo", "sft"):
        result = runner.invoke(app, ["train", "--cache", str(small), "--out", str(tmp_path / objective), *FAST,
                                     "--objective", objective, "--steps", "1"])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "--objectives all" in lines[0] and objective in lines[0]
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())
    info = runner.invoke(app, ["cache", "info", str(small)])
    assert "re-invert with --objectives all" in info.output
    # the InPO-only store is smaller by the baseline arrays: x0 of both images and 2×2 errors
    full, only = CacheStore.open(stores["sd15"]), CacheStore.open(small)
    c, h, w = only.layout.latent_shape
    assert full.raw_bytes_per_row() - only.raw_bytes_per_row() == 2 * c * h * w * 4 + 2 * 2 * 4
    info = runner.invoke(app, ["cache", "info", str(stores["sd15"])])
    assert "inpo, diffusion-dpo, sft" in info.output


def test_unknown_objective_is_one_line(stores, tmp_path):
    result = runner.invoke(app, ["train", "--cache", str(stores["sd15"]), "--out", str(tmp_path / "x"),
                                 "--objective", "kto"])
    assert result.exit_code == 2
    assert "--objective must be one of inpo, diffusion-dpo, sft" in result.output

"""The shard computation on tiny real models: round trip, stored-value consistency, settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_schema import RowPlan, round_to_storage
from inpo_pipeline.method import ddim
from inpo_pipeline.data.sources import PairRecord
from inpo_pipeline.worlds.example import write_pickapic_parquet
from inpo_pipeline.data.sources import open_source
from inpo_pipeline.method.inversion import InversionConfig, invert_shard
from inpo_pipeline.models.reference import SDXL, load_reference, unet_noise

RESOLUTION = 32


def _walk(reference, latent, positions, text, pooled=None, time_ids=None):
    """DDIM along `positions` with the tiny UNet; the UNet is called at the step's upper end."""
    alphas = reference.alphas_cumprod
    for here, there in zip(positions[:-1], positions[1:]):
        upper = max(here, there)
        lower_latent = latent
        noise = unet_noise(reference.unet, lower_latent, torch.tensor([upper]), text, pooled, time_ids).float()
        latent = ddim.inversion_step(latent, noise, ddim.alpha_bar_at(alphas, torch.tensor([here])),
                                     ddim.alpha_bar_at(alphas, torch.tensor([there])))
    return latent


def test_invert_then_sample_returns_x0(tiny_sd15):
    """Inversion with ε(x_s, s') then DDIM sampling with ε(x_s', s') back down recovers x0.

    The only error is the inversion approximation ε(x_s') ≈ ε(x_s), so it falls linearly with
    the step length. Measured on the tiny model, x0 ~ N(0, 1), relative L2 error:
        t:          50       200      500      800      999
        10 steps  8.1e-3   1.9e-2   7.2e-2   5.2e-1   2.8
        50 steps  3.2e-3   5.8e-3   1.7e-2   1.4e-1   1.3
        200 steps 1.1e-3   1.8e-3   4.6e-3   3.7e-2   0.62
    (near t = 999, 1/sqrt(ā_t) ≈ 15 amplifies every error: DDIM inversion's known weak end).
    """
    reference = load_reference(str(tiny_sd15))
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16)
    text, _ = reference.text.encode([""], torch.device("cpu"))
    errors = {}
    with torch.no_grad():
        for steps in (50, 200):
            positions = ddim.exact_trajectory(500, steps)
            x_t = _walk(reference, x0, positions, text)
            back = _walk(reference, x_t, positions[::-1], text)
            errors[steps] = ((back - x0).norm() / x0.norm()).item()
            assert (x_t - x0).norm() / x0.norm() > 0.5  # the walk really went somewhere
    print(f"round trip to t=500, tiny model: relative error {errors}")
    assert errors[50] < 3e-2
    assert errors[200] < errors[50] / 2.5  # first order in the step length


def _shard_inputs(reference, source, prompt_lookup_text, rows=6, timesteps=(0, 37, 499, 500, 998, 999)):
    scanned = [row for row in source.scan() if not row.is_tie][:rows]
    plan = RowPlan(
        timestep=np.array(timesteps[:rows], dtype=np.int32),
        prompt_index=np.arange(1, rows + 1, dtype=np.int32),
        source_row=np.array([row.source_row for row in scanned], dtype=np.int64),
        draw=np.zeros(rows, dtype=np.int16),
    )
    records = {r.source_row: r for r in source.read(plan.source_row)}
    captions = [""] + [records[int(s)].caption for s in plan.source_row]
    text, pooled = reference.text.encode(captions, torch.device("cpu"))

    def lookup(indices):
        return (round_to_storage(text.numpy(), "float16")[indices],
                None if pooled is None else round_to_storage(pooled.numpy(), "float16")[indices])

    return plan, records, lookup


@pytest.fixture(scope="module")
def clean_pairs(tmp_path_factory):
    """Pairs without ties or broken images."""
    path = tmp_path_factory.mktemp("clean") / "clean.parquet"
    write_pickapic_parquet(path, num_pairs=12, seed=3, ties=0, broken=0)
    return open_source(str(path))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_reference_errors_match_stored_values(family, tiny_sd15, tiny_sdxl, clean_pairs):
    """e_ref is exactly mean‖ε_ref(x_t, t, c) − τ‖² on the *stored* (rounded) x_t, τ and embeddings."""
    reference = load_reference(str(tiny_sd15 if family == "sd15" else tiny_sdxl))
    plan, records, lookup = _shard_inputs(reference, clean_pairs, None)
    config = InversionConfig(resolution=RESOLUTION, storage_dtype="float16", batch_size=5)
    result, work = invert_shard(reference, plan, records, lookup, config, torch.device("cpu"))
    assert result.valid.all()
    assert result.latent_chosen.dtype == np.float32
    assert np.array_equal(result.latent_chosen, round_to_storage(result.latent_chosen, "float16"))
    text, pooled = lookup(np.concatenate([[0], plan.prompt_index]))
    for row in range(len(plan.timestep)):
        for image, (latents, targets, errors) in enumerate([
            (result.latent_chosen, result.target_chosen, result.reference_error_chosen),
            (result.latent_rejected, result.target_rejected, result.reference_error_rejected),
        ]):
            for prompt, embedding_row in ((0, row + 1), (1, 0)):
                kwargs = {}
                if reference.family == SDXL:
                    ids = (result.time_ids_chosen if image == 0 else result.time_ids_rejected)[row : row + 1]
                    kwargs = dict(pooled_embedding=torch.from_numpy(pooled[embedding_row : embedding_row + 1]),
                                  time_ids=torch.from_numpy(ids))
                with torch.no_grad():
                    noise = unet_noise(reference.unet, torch.from_numpy(latents[row : row + 1]),
                                       torch.tensor([int(plan.timestep[row])]),
                                       torch.from_numpy(text[embedding_row : embedding_row + 1]), **kwargs)
                expected = ddim.per_sample_mse(noise, torch.from_numpy(targets[row : row + 1])).item()
                assert errors[row, prompt] == pytest.approx(expected, rel=1e-5), (row, image, prompt)
    # exact mode: max(1, ceil(10 (t+1)/1000)) steps per image
    assert result.inversion_steps.tolist() == [1, 1, 5, 6, 10, 10]
    calls_per_row = 2 * np.asarray(result.inversion_steps) + 4
    assert work.row_evaluations == int(calls_per_row.sum())


def test_target_is_consistent_with_latent(tiny_sd15, clean_pairs):
    """τ = (x_t − sqrt(ā_t)·x0)/sqrt(1−ā_t): solving for x0 returns the VAE latent of the image."""
    reference = load_reference(str(tiny_sd15))
    plan, records, lookup = _shard_inputs(reference, clean_pairs, None)
    config = InversionConfig(resolution=RESOLUTION, storage_dtype="float32", batch_size=4)
    result, _ = invert_shard(reference, plan, records, lookup, config, torch.device("cpu"))
    from inpo_pipeline.data.sources import prepare_image

    pixels = torch.from_numpy(np.stack([prepare_image(records[int(s)].chosen, RESOLUTION).pixels for s in plan.source_row]))
    x0 = reference.encode_images(pixels)
    alpha = ddim.alpha_bar_at(reference.alphas_cumprod, torch.from_numpy(plan.timestep)).reshape(-1, 1, 1, 1)
    recovered = (torch.from_numpy(result.latent_chosen).double() - (1 - alpha).sqrt() * torch.from_numpy(result.target_chosen).double()) / alpha.sqrt()
    assert (recovered - x0.double()).abs().max().item() < 1e-4


def test_result_does_not_depend_on_other_shards_or_batch_of_rows(tiny_sd15, clean_pairs):
    """The same rows give bit-identical results whatever else was computed before them."""
    reference = load_reference(str(tiny_sd15))
    plan, records, lookup = _shard_inputs(reference, clean_pairs, None)
    config = InversionConfig(resolution=RESOLUTION, batch_size=4)
    first, _ = invert_shard(reference, plan, records, lookup, config, torch.device("cpu"))
    other = RowPlan(plan.timestep[::-1].copy(), plan.prompt_index, plan.source_row, plan.draw)
    invert_shard(reference, other, records, lookup, config, torch.device("cpu"))
    again, _ = invert_shard(reference, plan, records, lookup, config, torch.device("cpu"))
    for name in ("latent_chosen", "target_rejected", "reference_error_chosen"):
        assert np.array_equal(getattr(first, name), getattr(again, name))


def test_settings_change_the_rows(tiny_sd15, clean_pairs):
    """Guidance, the authors' mode, eta, the VAE sample and flips each change x_t; eta and samples are seeded."""
    reference = load_reference(str(tiny_sd15))
    plan, records, lookup = _shard_inputs(reference, clean_pairs, None)
    cpu = torch.device("cpu")

    def run(plan=plan, **kwargs):
        return invert_shard(reference, plan, records, lookup, InversionConfig(resolution=RESOLUTION, **kwargs), cpu)

    base, base_work = run()
    conditional, _ = run(guidance=1.0)
    cfg, cfg_work = run(guidance=3.0)
    authors, _ = run(mode="authors")
    noisy, _ = run(eta=0.1, seed=1)
    noisy_again, _ = run(eta=0.1, seed=1)
    noisy_other, _ = run(eta=0.1, seed=2)
    sampled, _ = run(vae_latent="sample", seed=1)
    sampled_again, _ = run(vae_latent="sample", seed=1)
    flipped_plan = RowPlan(plan.timestep, plan.prompt_index, plan.source_row, plan.draw,
                           flip=np.tile(np.array([[1, 0]], dtype=np.uint8), (len(plan.timestep), 1)))
    flipped, _ = run(plan=flipped_plan)
    for other in (conditional, cfg, authors, noisy, sampled):
        assert not np.array_equal(base.latent_chosen, other.latent_chosen)
    assert np.array_equal(noisy.latent_chosen, noisy_again.latent_chosen)
    assert np.array_equal(sampled.latent_chosen, sampled_again.latent_chosen)
    assert not np.array_equal(noisy.latent_chosen, noisy_other.latent_chosen)
    # a flip of the chosen image only changes the chosen image's rows
    assert not np.array_equal(base.latent_chosen, flipped.latent_chosen)
    assert np.array_equal(base.latent_rejected, flipped.latent_rejected)
    # the authors' departures [-99, 1, 101, ..., 801] strictly below t = (0, 37, 499, 500, 998, 999)
    assert authors.inversion_steps.tolist() == [1, 2, 6, 6, 10, 10]
    inversion_evals = base_work.row_evaluations - 4 * 6
    assert cfg_work.row_evaluations - 4 * 6 == 2 * inversion_evals


def test_broken_pair_is_dropped_as_a_pair(tiny_sd15, clean_pairs):
    reference = load_reference(str(tiny_sd15))
    plan, records, lookup = _shard_inputs(reference, clean_pairs, None)
    broken = int(plan.source_row[2])
    records = dict(records)
    records[broken] = PairRecord(broken, records[broken].caption, records[broken].chosen, b"garbage")
    result, _ = invert_shard(reference, plan, records, lookup, InversionConfig(resolution=RESOLUTION), torch.device("cpu"))
    assert result.valid.tolist() == [1, 1, 0, 1, 1, 1]
    assert not result.latent_chosen[2].any() and not result.reference_error_rejected[2].any()
    assert result.latent_chosen[3].any()

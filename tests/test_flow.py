"""Flow-matching math (DESIGN §1.8) and the flow process: σ sampling and shifts against diffusers'
own scheduler, the Euler walk, the velocity target, and the inversion/sampling round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from inpo_pipeline.method import flow
from inpo_pipeline.models.reference import load_reference
from inpo_pipeline.method.processes import FlowProcess, ProcessError

SD3_SCHEDULER = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
FLUX_SCHEDULER = dict(FlowMatchEulerDiscreteScheduler(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096).config)


def test_static_shift_matches_the_schedulers_training_sigmas():
    """SD3's training σ for u = t/1000 is the scheduler's own (once-shifted) sigmas table."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    uniform = np.arange(1000, 0, -1) / 1000
    ours = flow.shifted(uniform, SD3_SCHEDULER, image_tokens=0)
    np.testing.assert_allclose(ours, scheduler.sigmas.double().numpy(), rtol=1e-6)


def test_dynamic_shift_and_sampler_grid_match_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flow.dynamic_shift_mu(1024, FLUX_SCHEDULER) == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    scheduler.set_timesteps(6, sigmas=np.linspace(1, 1 / 6, 6), mu=flow.dynamic_shift_mu(4096, FLUX_SCHEDULER))
    np.testing.assert_allclose(flow.sampler_sigmas(6, FLUX_SCHEDULER, 4096), scheduler.sigmas.numpy(), rtol=1e-6)
    sd3 = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    sd3.set_timesteps(5)
    np.testing.assert_allclose(flow.sampler_sigmas(5, SD3_SCHEDULER, 0), sd3.sigmas.numpy(), rtol=1e-6)


def test_logit_normal_sampling_has_the_right_distribution():
    uniform = (np.arange(20000) + 0.5) / 20000
    sigma = flow.sigmas_from_uniform(uniform, "logit-normal", 0.0, 1.0)
    logits = np.log(sigma / (1 - sigma))
    assert logits.mean() == pytest.approx(0.0, abs=1e-6)
    assert logits.std() == pytest.approx(1.0, abs=2e-3)
    np.testing.assert_array_equal(flow.sigmas_from_uniform(uniform, "uniform", 0.0, 1.0), uniform)


def test_training_sigmas_stay_in_range_and_float32():
    uniform = np.array([0.0, 1e-9, 0.5, 1 - 1e-12, 1.0])
    sigma = flow.training_sigmas(uniform, "logit-normal", 0.0, 1.0, SD3_SCHEDULER, 0)
    assert sigma.dtype == np.float32
    assert sigma.min() >= flow.SIGMA_MIN and sigma.max() <= 1.0
    assert sigma[2] == pytest.approx(0.75)  # logit-normal median 0.5, shifted by 3: 1.5 / 2


@pytest.mark.parametrize("sigma", [0.002, 0.3, 0.97])
def test_exact_walk_ends_at_sigma_with_steps_no_longer_than_one_over_n(sigma):
    steps = flow.exact_walk(sigma, 10)
    assert steps[0].sigma_from == 0.0 and steps[-1].sigma_to == pytest.approx(sigma, abs=0)
    assert len(steps) == max(1, math.ceil(10 * sigma))
    assert all(step.label == 1000 * step.sigma_from for step in steps)
    assert max(step.sigma_to - step.sigma_from for step in steps) <= 0.1 + 1e-12


def test_shifted_grid_walk_evaluates_where_the_sampler_does():
    sampler = flow.sampler_sigmas(10, SD3_SCHEDULER, 0)
    steps = flow.shifted_grid_walk(0.9, 10, SD3_SCHEDULER, 0)
    assert [s.sigma_from for s in steps] == sorted(float(s) for s in sampler if s < 0.9)
    assert steps[-1].sigma_to == 0.9


@pytest.mark.parametrize("mode", ["exact", "shifted-grid"])
def test_constant_velocity_round_trip_is_exact(mode):
    """With v ≡ ε − x0 the Euler walk lands on (1−σ)·x0 + σ·ε, τ_v recovers ε − x0, and Euler
    sampling back down the same levels returns x0 (to float64 rounding)."""
    process = FlowProcess(SD3_SCHEDULER, image_tokens=64)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64), \
        torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    sigma = np.array([0.05, 0.5, 0.99])
    velocity = noise - clean
    walks = [process.walk(0, float(s), mode, 7) for s in sigma]
    latent = clean.clone()
    for depth in range(max(len(walk) for walk in walks)):
        for row, walk in enumerate(walks):
            if depth < len(walk):
                latent[row : row + 1] = process.advance(latent[row : row + 1], velocity[row : row + 1], [walk[depth]])
    expected = flow.forward_noised(clean, noise, torch.from_numpy(sigma))
    assert (latent - expected).abs().max().item() < 1e-12
    target = process.target(latent, clean, np.zeros(3), sigma)
    assert (target - velocity).abs().max().item() < 1e-12
    for row, walk in enumerate(walks):
        for step in reversed(walk):
            latent[row : row + 1] = flow.euler_step(latent[row : row + 1], velocity[row : row + 1],
                                                    torch.tensor([step.sigma_to], dtype=torch.float64),
                                                    torch.tensor([step.sigma_from], dtype=torch.float64))
    assert (latent - clean).abs().max().item() < 1e-12


def test_flow_process_refuses_the_authors_ddpm_noise_and_ddim_modes():
    process = FlowProcess(SD3_SCHEDULER, image_tokens=64)
    with pytest.raises(ProcessError, match="--eta"):
        process.jump_noise_std([])
    with pytest.raises(ProcessError, match="not a flow walk"):
        process.walk(0, 0.5, "authors", 10)


@pytest.mark.parametrize("option", [{"use_karras_sigmas": True}, {"shift_terminal": 0.02}, {"invert_sigmas": True},
                                    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
                                    {"stochastic_sampling": True}])
def test_scheduler_options_whose_grid_inpo_does_not_reproduce_are_refused(option):
    config = {**SD3_SCHEDULER, **option}
    name = next(k for k in option if k != "use_dynamic_shifting")
    with pytest.raises(ProcessError, match=f"sets {name}="):
        FlowProcess(config, image_tokens=64)
    assert flow.unsupported_scheduler_options(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)) == []


def _round_trip_error(reference, clean, text, pooled, sigma: float, num_steps: int) -> float:
    """Invert x0 to σ with n Euler steps of the model, then sample back down the same levels."""
    walk = flow.exact_walk(sigma, num_steps)
    latent = clean.clone()
    for step in walk:
        velocity = reference.denoise(latent, torch.tensor([step.label]), text, pooled)
        latent = flow.euler_step(latent, velocity, torch.tensor([step.sigma_from]), torch.tensor([step.sigma_to]))
    for step in reversed(walk):
        velocity = reference.denoise(latent, torch.tensor([1000.0 * step.sigma_to]), text, pooled)
        latent = flow.euler_step(latent, velocity, torch.tensor([step.sigma_to]), torch.tensor([step.sigma_from]))
    return ((latent - clean).norm() / clean.norm()).item()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_model_round_trip_is_first_order_and_bounded(family, tiny_sd3, tiny_flux):
    """Inversion evaluates v at the lower end of each step, sampling at the upper end: the round
    trip's error is first order in the step (halving the step halves it) and small."""
    reference = load_reference(str({"sd3": tiny_sd3, "flux": tiny_flux}[family]), with_vae=False)
    clean = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    text, pooled = reference.text.encode(["a red fox in a snowy forest"], torch.device("cpu"))
    errors = {n: _round_trip_error(reference, clean, text, pooled, 0.8, n) for n in (4, 8, 16)}
    assert errors[4] < 0.25
    assert 1.6 < errors[4] / errors[8] < 2.5 and 1.6 < errors[8] / errors[16] < 2.5, errors

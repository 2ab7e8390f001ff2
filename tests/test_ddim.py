"""Numerical tests of the pure DDIM-InPO math in ``inpo_pipeline.method.ddim`` (DESIGN §1)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from inpo_pipeline.method import ddim
from inpo_pipeline.method.ddim import (
    CLEAN,
    alpha_bar_at,
    exact_trajectory,
    authors_departures,
    authors_steps,
    exact_steps,
    inversion_steps,
    jump_noise_std,
    guided_noise,
    inversion_step,
    per_sample_mse,
    predicted_clean,
    single_step_target,
)

T = 1000


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    """SD1.5's scheduler ā_t (scaled_linear 0.00085..0.012), in float64."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    values = scheduler.alphas_cumprod.to(torch.float64)
    assert values.shape == (T,)
    return values


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- alpha_bar_at


def test_alpha_bar_at_clean_is_one_and_lookup_elsewhere(alphas_cumprod):
    positions = torch.tensor([CLEAN, 0, 1, 17, 500, 998, 999])
    values = alpha_bar_at(alphas_cumprod, positions)
    assert values.dtype == torch.float64
    assert values.shape == positions.shape
    assert values[0].item() == 1.0
    for i in range(1, len(positions)):
        assert values[i].item() == alphas_cumprod[positions[i]].item()


def test_alpha_bar_at_all_timesteps(alphas_cumprod):
    positions = torch.arange(-1, T)
    values = alpha_bar_at(alphas_cumprod, positions)
    assert values[0].item() == 1.0
    assert torch.equal(values[1:], alphas_cumprod)
    # the schedule itself: strictly decreasing, inside (0, 1)
    assert bool((values[1:] < values[:-1]).all())
    assert 0.0 < alphas_cumprod[-1].item() < alphas_cumprod[0].item() < 1.0


def test_alpha_bar_at_int32_positions(alphas_cumprod):
    positions = torch.tensor([-1, 3], dtype=torch.int32)
    values = alpha_bar_at(alphas_cumprod, positions)
    assert values.tolist() == [1.0, alphas_cumprod[3].item()]


# --------------------------------------------------------------------------- hand computations


def _pick(tensor: torch.Tensor, index: tuple[int, ...]) -> float:
    return float(tensor[index].item())


# (batch index, element index) pairs checked by hand
_ELEMENTS = [(0, 0, 0, 0), (0, 2, 1, 3), (1, 3, 2, 1), (2, 1, 3, 2)]


def test_inversion_step_matches_hand_computation(alphas_cumprod):
    g = _generator(1)
    latent = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    # one row starts at the clean image (ā = 1), one is a mid step, one goes downwards (sampling)
    pos_from = torch.tensor([CLEAN, 99, 700])
    pos_to = torch.tensor([99, 199, 350])
    a_from = alpha_bar_at(alphas_cumprod, pos_from)
    a_to = alpha_bar_at(alphas_cumprod, pos_to)

    out = inversion_step(latent, noise, a_from, a_to)
    assert out.shape == latent.shape and out.dtype == torch.float64

    for index in _ELEMENTS:
        b = index[0]
        x, e = _pick(latent, index), _pick(noise, index)
        af, at = float(a_from[b]), float(a_to[b])
        x0_hat = (x - math.sqrt(1 - af) * e) / math.sqrt(af)
        expected = math.sqrt(at) * x0_hat + math.sqrt(1 - at) * e
        assert abs(_pick(out, index) - expected) <= 1e-12, index

    # from the clean image (ā = 1), the step is exactly the forward noising formula
    a99 = float(alphas_cumprod[99])
    expected_row0 = math.sqrt(a99) * latent[0] + math.sqrt(1 - a99) * noise[0]
    assert torch.allclose(out[0], expected_row0, rtol=0, atol=1e-12)


def test_inversion_step_scalar_alpha_broadcasts(alphas_cumprod):
    g = _generator(2)
    latent = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    a_from, a_to = alphas_cumprod[10], alphas_cumprod[300]
    out = inversion_step(latent, noise, a_from, a_to)
    per_row = inversion_step(latent, noise, a_from.repeat(2), a_to.repeat(2))
    assert torch.equal(out, per_row)


def test_single_step_target_matches_hand_computation(alphas_cumprod):
    g = _generator(3)
    latent_t = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    latent_0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    a_t = alphas_cumprod[torch.tensor([0, 421, 999])]

    out = single_step_target(latent_t, latent_0, a_t)
    assert out.shape == latent_t.shape and out.dtype == torch.float64
    for index in _ELEMENTS:
        b = index[0]
        xt, x0, a = _pick(latent_t, index), _pick(latent_0, index), float(a_t[b])
        expected = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
        assert abs(_pick(out, index) - expected) <= 1e-12 * max(1.0, abs(expected)), index


def test_predicted_clean_matches_hand_computation(alphas_cumprod):
    g = _generator(4)
    latent_t = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    a_t = alphas_cumprod[torch.tensor([0, 421, 999])]

    out = predicted_clean(latent_t, noise, a_t)
    assert out.shape == latent_t.shape and out.dtype == torch.float64
    for index in _ELEMENTS:
        b = index[0]
        xt, e, a = _pick(latent_t, index), _pick(noise, index), float(a_t[b])
        expected = (xt - math.sqrt(1 - a) * e) / math.sqrt(a)
        # at t = 999, 1/sqrt(ā) ≈ 14.6: compare relative to the size of the result
        assert abs(_pick(out, index) - expected) <= 1e-12 * max(1.0, abs(expected)), index


def test_predicted_clean_inverts_forward_noising(alphas_cumprod):
    g = _generator(5)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    e = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    a = alphas_cumprod[torch.tensor([250, 750])]
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * e
    assert torch.allclose(predicted_clean(x_t, e, a), x0, rtol=0, atol=1e-12)
    assert torch.allclose(single_step_target(x_t, x0, a), e, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- exact trajectory


@pytest.mark.parametrize("n", [1, 5, 10, 50])
def test_exact_trajectory_properties(n):
    max_step = T // n  # T/n is an integer for these n
    assert max_step * n == T
    for t in range(T):
        path = exact_trajectory(t, n, T)
        assert path[0] == CLEAN
        assert path[-1] == t
        steps = len(path) - 1
        assert steps == max(1, math.ceil(n * (t + 1) / T)), (t, n)
        # integer form of the same count, free of float division
        assert steps == max(1, -(-n * (t + 1) // T)), (t, n)
        for a, b in zip(path, path[1:]):
            assert b > a, (t, n, path)
            assert b - a <= max_step, (t, n, path)
        assert all(isinstance(p, int) for p in path)


def test_exact_trajectory_mean_steps_n10_is_5_5():
    total = sum(len(exact_trajectory(t, 10, T)) - 1 for t in range(T))
    assert Fraction(total, T) == Fraction(11, 2)


def test_exact_trajectory_examples():
    assert exact_trajectory(0, 10) == [-1, 0]
    assert exact_trajectory(99, 10) == [-1, 99]
    # distance 101 in two steps of 50.5: either rounding of the midpoint is fine
    assert exact_trajectory(100, 10) in ([-1, 49, 100], [-1, 50, 100])
    assert exact_trajectory(199, 10) == [-1, 99, 199]
    assert exact_trajectory(200, 10) == [-1, 66, 133, 200]
    assert exact_trajectory(999, 10) == [-1 + 100 * i for i in range(11)]
    assert exact_trajectory(999, 1) == [-1, 999]
    assert exact_trajectory(0, 50) == [-1, 0]


@pytest.mark.parametrize("bad", [-1, T, T + 5])
def test_exact_trajectory_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        exact_trajectory(bad, 10, T)
    with pytest.raises(ValueError):
        authors_steps(bad, 10, torch.linspace(0.999, 0.005, T, dtype=torch.float64), SD_SCHEDULER)


# --------------------------------------------------------------------------- the authors' walk
SD_SCHEDULER = {"steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False}


def test_authors_departures_sd_leading_offset1():
    """diffusers 0.20's rolled grid for SD's scheduler: [-99, 1, 101, ..., 801], stride 100 (DESIGN §1.5)."""
    departures, stride = authors_departures(10, T, steps_offset=1, timestep_spacing="leading")
    assert stride == 100
    assert departures == [-99] + [100 * j + 1 for j in range(9)]


def test_authors_departures_other_grids():
    assert authors_departures(10, T, steps_offset=0)[0] == [-100] + [100 * j for j in range(9)]
    # trailing: grid 99, 199, ..., 999 rolled: [-1, 99, ..., 899]
    assert authors_departures(10, T, timestep_spacing="trailing")[0] == [-1] + [100 * j + 99 for j in range(9)]
    assert authors_departures(4, T, steps_offset=1)[0] == [-249, 1, 251, 501]
    with pytest.raises(ValueError, match="leading or trailing"):
        authors_departures(10, T, timestep_spacing="linspace")


def test_authors_steps_labels_and_alphas(alphas_cumprod):
    """Departure labels, ā_{-99} = ā_0 without set_alpha_to_one (1 with it), destination ā_{d+100}."""
    a = alphas_cumprod.tolist()
    steps = authors_steps(102, 10, alphas_cumprod, SD_SCHEDULER)
    assert [s.label for s in steps] == [-99, 1, 101]
    assert [s.alpha_bar_from for s in steps] == [a[0], a[1], a[101]]
    assert [s.alpha_bar_to for s in steps] == [a[1], a[101], a[201]]
    assert authors_steps(0, 10, alphas_cumprod, SD_SCHEDULER)[0].alpha_bar_from == a[0]
    with_one = authors_steps(0, 10, alphas_cumprod, {**SD_SCHEDULER, "set_alpha_to_one": True})
    assert with_one[0].alpha_bar_from == 1.0


@pytest.mark.parametrize("t, count, level", [
    (0, 1, 1), (1, 1, 1), (2, 2, 101), (50, 2, 101), (101, 2, 101), (102, 3, 201), (150, 3, 201),
    (500, 6, 501), (801, 9, 801), (802, 10, 901), (901, 10, 901), (902, 10, 901), (999, 10, 901),
])
def test_authors_steps_count_and_final_level(alphas_cumprod, t, count, level):
    """At least one step; the walk ends at d_last + 100 (≥ t for t ≤ 901, 901 above)."""
    steps = authors_steps(t, 10, alphas_cumprod, SD_SCHEDULER)
    assert len(steps) == count
    assert steps[-1].alpha_bar_to == alphas_cumprod[level].item()


def test_authors_mean_unet_calls_is_6_382(alphas_cumprod):
    """Mean UNet calls per image over t ~ U{0..999}: 2·1 + 100·(2+…+9) + 198·10 = 6382 per 1000."""
    calls = sum(len(authors_steps(t, 10, alphas_cumprod, SD_SCHEDULER)) for t in range(T))
    assert Fraction(calls, T) == Fraction(6382, 1000)


def test_exact_steps_follow_the_trajectory(alphas_cumprod):
    steps = exact_steps(200, 10, alphas_cumprod)
    assert [s.label for s in steps] == exact_trajectory(200, 10)[1:]
    assert steps[0].alpha_bar_from == 1.0
    assert steps[-1].alpha_bar_to == alphas_cumprod[200].item()
    assert all(a.alpha_bar_to == b.alpha_bar_from for a, b in zip(steps, steps[1:]))


def test_jump_noise_std_is_the_ddpm_posterior_std(alphas_cumprod):
    """σ² = (1−ā_d)/(1−ā_{d+s})·(1 − ā_{d+s}/ā_d), diffusers' DDIMScheduler._get_variance(d+s, d)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    for d in (1, 101, 401, 801):
        expected = scheduler._get_variance(d + 100, d).double().sqrt().item()
        got = jump_noise_std(alphas_cumprod[d : d + 1], alphas_cumprod[d + 100 : d + 101]).item()
        assert got == pytest.approx(expected, rel=1e-5)
    # from the clean image there is nothing to add
    assert jump_noise_std(torch.tensor([1.0]), alphas_cumprod[5:6]).item() == 0.0


def test_inversion_steps_dispatch_and_retired_grid(alphas_cumprod):
    assert inversion_steps(250, "exact", 10, alphas_cumprod, SD_SCHEDULER) == exact_steps(250, 10, alphas_cumprod)
    assert inversion_steps(250, "authors", 10, alphas_cumprod, SD_SCHEDULER) == \
        authors_steps(250, 10, alphas_cumprod, SD_SCHEDULER)
    assert set(ddim.TIMESTEP_MODES) == {"exact", "authors"}
    with pytest.raises(ValueError, match="grid was removed"):
        inversion_steps(250, "grid", 10, alphas_cumprod, SD_SCHEDULER)
    with pytest.raises(ValueError, match="unknown timestep mode"):
        inversion_steps(250, "linear", 10, alphas_cumprod, SD_SCHEDULER)


# --------------------------------------------------------------------------- guided noise


def test_guided_noise():
    g = _generator(6)
    uncond = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    assert torch.equal(guided_noise(uncond, cond, 0.0), uncond)
    assert torch.equal(guided_noise(uncond, cond, 1.0), cond)
    # w = 0 and w = 1 need only one of the two predictions
    assert torch.equal(guided_noise(uncond, None, 0.0), uncond)
    assert torch.equal(guided_noise(None, cond, 1.0), cond)

    out = guided_noise(uncond, cond, 2.5)
    assert torch.allclose(out, uncond + 2.5 * (cond - uncond), rtol=0, atol=1e-12)
    for index in [(0, 0, 0, 0), (1, 3, 2, 1)]:
        u, c = _pick(uncond, index), _pick(cond, index)
        assert abs(_pick(out, index) - (u + 2.5 * (c - u))) <= 1e-12
        assert abs(_pick(out, index) - (2.5 * c - 1.5 * u)) <= 1e-12


# --------------------------------------------------------------------------- round trip


def _walk(x: torch.Tensor, e: torch.Tensor, alphas: torch.Tensor, path: list[int]) -> torch.Tensor:
    """Run inversion_step along consecutive positions of `path` with a constant ε = e."""
    batch = x.shape[0]
    for s, s_next in zip(path, path[1:]):
        a_from = alpha_bar_at(alphas, torch.full((batch,), s))
        a_to = alpha_bar_at(alphas, torch.full((batch,), s_next))
        x = inversion_step(x, e, a_from, a_to)
    return x


_ROUND_TRIP_T = [0, 1, 99, 100, 250, 500, 777, 998, 999]


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"]
)
def test_round_trip_constant_eps(alphas_cumprod, n, dtype, tol):
    alphas = alphas_cumprod.to(dtype)
    g = _generator(7)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    e = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    for t in _ROUND_TRIP_T:
        path = exact_trajectory(t, n, T)
        x_t = _walk(x0, e, alphas, path)
        back = _walk(x_t, e, alphas, path[::-1])
        assert (back - x0).abs().max().item() <= tol, (t, n)


@pytest.mark.parametrize("n", [10, 50])
def test_constant_eps_latent_is_forward_noising_and_target_is_eps(alphas_cumprod, n):
    alphas = alphas_cumprod.to(torch.float32)
    g = _generator(8)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 4, 8, 8, generator=g)
    for t in _ROUND_TRIP_T:
        x_t = _walk(x0, e, alphas, exact_trajectory(t, n, T))
        a_t = alpha_bar_at(alphas, torch.full((2,), t))
        a = float(alphas_cumprod[t])
        expected = math.sqrt(a) * x0.double() + math.sqrt(1 - a) * e.double()
        assert (x_t.double() - expected).abs().max().item() <= 1e-6, (t, n)
        tau = single_step_target(x_t, x0, a_t)
        assert tau.dtype == torch.float32
        # τ divides by sqrt(1-ā_t) (≈ 0.029 at t = 0), so the float32 rounding of x_t itself
        # (~1e-7) is amplified up to ~34x: even an exactly rounded x_t gives |τ-e| ≈ 4e-6 at
        # t = 0. The 1e-6 bound therefore holds in latent units, |τ-e|·sqrt(1-ā_t) ≤ 1e-6, and
        # plainly for large t; float64 is held to 1e-12 in test_constant_eps_float64_exact.
        err = (tau - e).abs().max().item()
        assert err * math.sqrt(1 - a) <= 1e-6, (t, n, err)
        if t >= 500:  # |x_t| ~ 3 here: a few float32 ulps of x_t, divided by sqrt(1-ā) ≥ 0.78
            assert err <= 2e-6, (t, n, err)
        else:
            assert err <= 1e-5, (t, n, err)
        # and the single-step view recovers x0
        assert (predicted_clean(x_t, e, a_t) - x0).abs().max().item() <= 1e-5, (t, n)


def test_constant_eps_float64_exact(alphas_cumprod):
    g = _generator(9)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in _ROUND_TRIP_T:
        x_t = _walk(x0, e, alphas_cumprod, exact_trajectory(t, 10, T))
        a_t = alpha_bar_at(alphas_cumprod, torch.full((3,), t))
        assert (single_step_target(x_t, x0, a_t) - e).abs().max().item() <= 1e-12, t


# --------------------------------------------------------------------------- per-sample MSE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_per_sample_mse_values(dtype):
    g = _generator(10)
    prediction = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64).to(dtype)
    out = per_sample_mse(prediction, target)
    assert out.shape == (3,)
    assert out.dtype in (torch.float32, torch.float64)
    for b in range(3):
        diffs = (prediction[b].double() - target[b].double()).flatten().tolist()
        expected = math.fsum(d * d for d in diffs) / len(diffs)
        # per_sample_mse calls .float(), so float64 inputs are reduced in float32 too
        # (its docstring says "float32 or wider"): hold both to float32 accuracy.
        assert abs(out[b].item() - expected) <= 1e-6 * expected, (b, dtype)


def test_per_sample_mse_simple_numbers():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    out = per_sample_mse(prediction, target)
    assert out.dtype == torch.float32
    assert out.tolist() == [7.5, 1.0]  # (1+4+9+16)/4, 4/4


def test_per_sample_mse_float16_computed_in_float32():
    g = _generator(11)
    prediction = (torch.randn(4, 4, 8, 8, generator=g) * 30).half()
    target = (torch.randn(4, 4, 8, 8, generator=g) * 30).half()
    out = per_sample_mse(prediction, target)
    assert out.shape == (4,)
    assert out.dtype == torch.float32
    expected = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=0)
    # squares of ~±100 differences overflow nothing and are not rounded to float16 precision
    fp16_path = (prediction - target).pow(2).flatten(1).mean(dim=1)
    assert fp16_path.dtype == torch.float16
    assert not torch.allclose(out.double(), fp16_path.double(), rtol=1e-6, atol=0)

"""The InPO loss against a float64 hand computation (DESIGN §1.4)."""

from __future__ import annotations

import math

import pytest
import torch

from inpo_pipeline.method.loss import inpo_loss


def hand_loss(policy_w: float, policy_l: float, reference_w: float, reference_l: float, beta: float) -> float:
    argument = -(beta / 2) * ((policy_w - reference_w) - (policy_l - reference_l))
    return -math.log(1 / (1 + math.exp(-argument)))


@pytest.mark.parametrize("beta", [1.0, 2000.0, 5000.0])
def test_matches_hand_computation(beta):
    values = [(0.50, 0.40, 0.5003, 0.4001), (0.10, 0.12, 0.1000, 0.1199), (0.7, 0.7, 0.7001, 0.6999)]
    columns = [torch.tensor(column, dtype=torch.float64) for column in zip(*values)]
    result = inpo_loss(*columns, beta=beta)
    for index, row in enumerate(values):
        assert result.loss[index].item() == pytest.approx(hand_loss(*row, beta), rel=1e-12, abs=1e-15)
        expected_argument = -(beta / 2) * ((row[0] - row[2]) - (row[1] - row[3]))
        assert result.argument[index].item() == pytest.approx(expected_argument, rel=1e-12, abs=1e-12)


def test_policy_equal_to_reference_gives_log_2():
    errors = torch.tensor([0.3, 0.25, 0.9])
    result = inpo_loss(errors, errors + 0.01, errors, errors + 0.01, beta=2000.0)
    assert torch.allclose(result.loss, torch.full((3,), math.log(2)), atol=1e-7)
    assert result.margin.item() == pytest.approx(0.0, abs=1e-3)


def test_sign_closer_to_chosen_target_lowers_the_loss():
    """A policy closer to τ^w than the reference (and not closer to τ^l) is preferred."""
    reference_w, reference_l = torch.tensor([0.40, 0.30]), torch.tensor([0.35, 0.50])
    policy_w, policy_l = reference_w - 0.001, reference_l.clone()
    result = inpo_loss(policy_w, policy_l, reference_w, reference_l, beta=2000.0)
    assert (result.argument > 0).all() and (result.loss < math.log(2)).all()
    assert result.implicit_accuracy.item() == 1.0
    assert result.argument[0].item() == pytest.approx(1.0, rel=1e-4)  # (β/2)·0.001
    worse = inpo_loss(reference_w + 0.001, policy_l, reference_w, reference_l, beta=2000.0)
    assert (worse.loss > math.log(2)).all() and worse.implicit_accuracy.item() == 0.0


def test_large_arguments_stay_finite_and_exact():
    result = inpo_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.zeros(2), torch.zeros(2), beta=5000.0)
    assert torch.isfinite(result.loss).all()
    assert result.loss[0].item() == pytest.approx(2500.0)  # −log σ(−2500) = 2500 + log(1 + e^−2500)
    assert result.loss[1].item() == pytest.approx(0.0, abs=1e-30)


def test_half_precision_errors_are_combined_in_float32():
    reference = torch.tensor([0.5001], dtype=torch.float16)
    result = inpo_loss(torch.tensor([0.5], dtype=torch.float16), torch.tensor([0.5], dtype=torch.float16),
                       reference, torch.tensor([0.5], dtype=torch.float16), beta=5000.0)
    assert result.loss.dtype == torch.float32
    expected = hand_loss(0.5, 0.5, float(reference.item()), 0.5, 5000.0)
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- winner-preserving safeguard
def test_winner_preserving_scale_matches_the_closed_form():
    from inpo_pipeline.method.loss import winner_preserving_scale

    chosen = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    aligned = torch.tensor([[3.0, 5.0], [1.0, -2.0]])  # ⟨l, w⟩ = 3 + 10 + 0.5 + 2 = 15.5, ‖w‖² = 6.25
    assert winner_preserving_scale(chosen, aligned, 0.9).item() == pytest.approx(0.1 * 6.25 / 15.5, rel=1e-6)
    assert winner_preserving_scale(chosen, aligned, 0.0).item() == pytest.approx(6.25 / 15.5, rel=1e-6)
    # a loser gradient that does not point along the winner's leaves the loss untouched
    assert winner_preserving_scale(chosen, -aligned, 0.9).item() == 1.0
    assert winner_preserving_scale(chosen, torch.tensor([[2.0, -1.0], [0.0, 0.0]]), 0.9).item() == 1.0
    # never above 1, even when the loser's gradient is tiny
    assert winner_preserving_scale(chosen, aligned * 1e-6, 0.0).item() == 1.0
    with pytest.raises(ValueError):
        winner_preserving_scale(chosen, aligned, 1.5)


def test_winner_preserving_step_does_not_raise_the_winners_error_to_first_order():
    """A step −(∇A − λ∇B) changes A by −(‖∇A‖² − λ⟨∇A, ∇B⟩) ≤ −μ‖∇A‖² (Fu et al. 2025), with the
    output-space gradients ∇ = 2·residual/numel standing in for the parameter gradients."""
    from inpo_pipeline.method.loss import winner_preserving_scale

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        residual_w = torch.randn(4, 3, 8, 8, generator=generator)
        residual_l = 0.7 * residual_w + torch.randn(4, 3, 8, 8, generator=generator) * (trial / 10)
        grad_a, grad_b = 2 * residual_w / residual_w.numel(), 2 * residual_l / residual_l.numel()
        for mu in (0.0, 0.5, 0.9):
            scale = winner_preserving_scale(residual_w, residual_l, mu).double()
            change = -(grad_a.double().pow(2).sum() - scale * (grad_a.double() * grad_b.double()).sum())
            assert change <= -mu * grad_a.double().pow(2).sum() * (1 - 1e-6)


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    from inpo_pipeline.method.loss import scale_gradient

    x = torch.tensor([2.0, 3.0], requires_grad=True)
    y = scale_gradient(x ** 2, torch.tensor(0.25))
    assert torch.equal(y.detach(), torch.tensor([4.0, 9.0]))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([1.0, 1.5]))

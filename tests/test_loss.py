"""The InPO loss against a float64 hand computation (DESIGN §1.4)."""

from __future__ import annotations

import math

import pytest
import torch

from inpo_pipeline.loss import inpo_loss


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

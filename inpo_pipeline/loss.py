"""The InPO loss (DESIGN §1.4): Diffusion-DPO's shape with the noise replaced by τ_t."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    """Per-pair quantities of one mini-batch; `loss` is what is minimised (its mean)."""

    loss: torch.Tensor  # (B,) −log σ(argument)
    argument: torch.Tensor  # (B,) −(β/2)·[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]
    policy_error_chosen: torch.Tensor
    policy_error_rejected: torch.Tensor

    @property
    def implicit_accuracy(self) -> torch.Tensor:
        """Share of pairs whose argument of σ is > 0 (DESIGN §1.4)."""
        return (self.argument > 0).float().mean()

    @property
    def margin(self) -> torch.Tensor:
        """Mean argument of σ: 0 when the policy equals the reference."""
        return self.argument.mean()


def inpo_loss(
    policy_error_chosen: torch.Tensor,
    policy_error_rejected: torch.Tensor,
    reference_error_chosen: torch.Tensor,
    reference_error_rejected: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """L = −log σ( −(β/2) · [(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)] ), per pair (DESIGN §1.4).

    The errors are per-sample means of ‖ε − τ‖² over C×H×W (``ddim.per_sample_mse``). Computed in
    float32 at least: with β = 5000 a bf16 rounding of e would move the argument by whole units.
    """
    dtype = torch.promote_types(policy_error_chosen.dtype, torch.float32)
    chosen_gap = policy_error_chosen.to(dtype) - reference_error_chosen.to(dtype)
    rejected_gap = policy_error_rejected.to(dtype) - reference_error_rejected.to(dtype)
    argument = -(beta / 2) * (chosen_gap - rejected_gap)
    # −log σ(x) = softplus(−x), stable for large |x|
    loss = -F.logsigmoid(argument)
    return PreferenceLoss(loss, argument, policy_error_chosen, policy_error_rejected)

"""The training losses (DESIGN §1.4, §1.7): InPO, Diffusion-DPO and SFT, per pair.

Every loss returns a `PreferenceLoss`, so the trainer and its metrics treat them alike. The
errors are per-sample means over C×H×W (``ddim.per_sample_mse``) of the policy's and the
reference's noise prediction against each objective's target (τ_t for InPO, ε for the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    """Per-pair quantities of one mini-batch; `loss` is what is minimised (its mean)."""

    loss: torch.Tensor  # (B,)
    # (B,) pairwise: −(β/2)·[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]; SFT: e_ref^w − e_θ^w
    argument: torch.Tensor
    policy_error_chosen: torch.Tensor
    policy_error_rejected: torch.Tensor | None  # None where the objective never sees the loser
    reference_error_chosen: torch.Tensor | None = None
    reference_error_rejected: torch.Tensor | None = None

    @property
    def winner_error_excess(self) -> torch.Tensor | None:
        """(B,) e_θ^w − e_ref^w: > 0 where the policy fits the winner worse than the reference did."""
        if self.reference_error_chosen is None:
            return None
        return self.policy_error_chosen.detach().float() - self.reference_error_chosen.float()

    @property
    def loser_error_excess(self) -> torch.Tensor | None:
        """(B,) e_θ^l − e_ref^l (None where the loser is not forwarded)."""
        if self.policy_error_rejected is None or self.reference_error_rejected is None:
            return None
        return self.policy_error_rejected.detach().float() - self.reference_error_rejected.float()

    @property
    def implicit_accuracy(self) -> torch.Tensor:
        """Share of pairs whose argument is > 0 (DESIGN §1.4)."""
        return (self.argument > 0).float().mean()

    @property
    def margin(self) -> torch.Tensor:
        """Mean argument: 0 when the policy equals the reference."""
        return self.argument.mean()


def _pairwise_logistic(
    policy_error_chosen: torch.Tensor,
    policy_error_rejected: torch.Tensor,
    reference_error_chosen: torch.Tensor,
    reference_error_rejected: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    # float32 at least: with β = 5000 a bf16 rounding of e would move the argument by whole units
    dtype = torch.promote_types(policy_error_chosen.dtype, torch.float32)
    chosen_gap = policy_error_chosen.to(dtype) - reference_error_chosen.to(dtype)
    rejected_gap = policy_error_rejected.to(dtype) - reference_error_rejected.to(dtype)
    argument = -(beta / 2) * (chosen_gap - rejected_gap)
    # −log σ(x) = softplus(−x), stable for large |x|
    loss = -F.logsigmoid(argument)
    return PreferenceLoss(loss, argument, policy_error_chosen, policy_error_rejected,
                          reference_error_chosen, reference_error_rejected)


def inpo_loss(
    policy_error_chosen: torch.Tensor,
    policy_error_rejected: torch.Tensor | None,
    reference_error_chosen: torch.Tensor,
    reference_error_rejected: torch.Tensor | None,
    beta: float,
) -> PreferenceLoss:
    """L = −log σ( −(β/2) · [(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)] ), e against τ_t (DESIGN §1.4)."""
    assert policy_error_rejected is not None and reference_error_rejected is not None
    return _pairwise_logistic(policy_error_chosen, policy_error_rejected, reference_error_chosen,
                              reference_error_rejected, beta)


def diffusion_dpo_loss(
    policy_error_chosen: torch.Tensor,
    policy_error_rejected: torch.Tensor | None,
    reference_error_chosen: torch.Tensor,
    reference_error_rejected: torch.Tensor | None,
    beta: float,
) -> PreferenceLoss:
    """Diffusion-DPO (DESIGN §1.7): §1.4's loss with e = mean‖ε_θ(x_t, t, c) − ε‖² at
    x_t = sqrt(ā_t)·x0 + sqrt(1−ā_t)·ε, the same t and ε for winner and loser."""
    assert policy_error_rejected is not None and reference_error_rejected is not None
    return _pairwise_logistic(policy_error_chosen, policy_error_rejected, reference_error_chosen,
                              reference_error_rejected, beta)


def sft_loss(
    policy_error_chosen: torch.Tensor,
    policy_error_rejected: torch.Tensor | None,
    reference_error_chosen: torch.Tensor,
    reference_error_rejected: torch.Tensor | None,
    beta: float,
) -> PreferenceLoss:
    """SFT (DESIGN §1.7): L = mean‖ε_θ(x_t^w, t, c) − ε‖² on the winners alone; β is unused.

    The argument is e_ref^w − e_θ^w, the policy's improvement over the reference on the
    winner: 0 at step 0, and "implicit accuracy" is the share of winners it fits better.
    """
    dtype = torch.promote_types(policy_error_chosen.dtype, torch.float32)
    loss = policy_error_chosen.to(dtype)
    argument = reference_error_chosen.to(dtype) - loss
    return PreferenceLoss(loss, argument, policy_error_chosen, None, reference_error_chosen, None)


def winner_preserving_scale(residual_chosen: torch.Tensor, residual_rejected: torch.Tensor, mu: float) -> torch.Tensor:
    """λ ∈ [0, 1] for the loser's gradient, the winner-preserving safeguard of Diffusion-SDPO (Fu et
    al. 2025, arXiv 2511.03317; DESIGN §1.7's family of losses).

    With A = mean e^w and B = mean e^l over the micro-batch and g_A = ∂A/∂ε_θ^w, g_B = ∂B/∂ε_θ^l
    (output space: g = 2·residual / numel, residual = ε_θ − target), a step along −g_A + λ·g_B
    does not raise the winners' error to first order while ⟨−g_A + λ g_B, g_A⟩ ≤ −μ‖g_A‖², i.e.
        λ ≤ (1 − μ)·‖g_A‖² / ⟨g_B, g_A⟩    when ⟨g_B, g_A⟩ > 0,   λ = 1 otherwise,
    clipped to [0, 1]. The 2/numel factors cancel, so the residuals are used directly.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError("mu must be in [0, 1]")
    chosen = residual_chosen.detach().double().flatten()
    rejected = residual_rejected.detach().double().flatten()
    alignment = torch.dot(rejected, chosen)  # ⟨g_B, g_A⟩ up to (2/numel)²
    cap = (1.0 - mu) * torch.dot(chosen, chosen) / alignment.clamp_min(torch.finfo(torch.float64).tiny)
    scale = torch.where(alignment > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)
    return scale.float()


def scale_gradient(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same values, with their gradient multiplied by `scale` (the forward value is unchanged,
    so the loss, the margin and every logged number stay what they were)."""
    return values.detach() + scale.to(values.dtype) * (values - values.detach())

"""The objectives `inpo train` can optimise from one store, and what each reads (DESIGN §1.4, §1.7).

An objective is one entry of `OBJECTIVES`: its loss (in `loss.py`), which cached inputs it
reads, whether the policy sees the rejected image, and whether it uses β (whose default is the
family's: `Family.default_beta`, since the error scale differs between ε- and flow models). Adding a
DPO-family loss is a function in `loss.py` and one entry here; the trainer, the loader, the
metrics and the CLI take it from this list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inpo_pipeline.errors import UserError
from inpo_pipeline.method.loss import PreferenceLoss, diffusion_dpo_loss, inpo_loss, sft_loss

INVERSION_INPUTS = "inversion"  # x_t, τ_t, e_ref of the inverted latents
FORWARD_INPUTS = "forward"  # x0, a regenerated ε, e_ref of the forward-noised latents


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[..., PreferenceLoss]
    inputs: str
    pairwise: bool  # False: only the winners are forwarded (half the policy's work)
    uses_beta: bool  # False: β is not used (SFT)
    description: str


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("inpo", inpo_loss, INVERSION_INPUTS, True, True,
                  "InPO: inverted x_t and its single-step target (DESIGN §1.4; Euler inversion and τ_v on flow models, §1.8)"),
        Objective("diffusion-dpo", diffusion_dpo_loss, FORWARD_INPUTS, True, True,
                  "Diffusion-DPO: forward-noised x_t and ε (Flow-DPO on flow models; DESIGN §1.7, §1.8)"),
        Objective("sft", sft_loss, FORWARD_INPUTS, False, False, "SFT: MSE to the forward target (ε, v or velocity) on the winners (DESIGN §1.7)"),
    )
}
DEFAULT_OBJECTIVE = "inpo"
# what `inpo invert --objectives` can prepare a store for
STORE_OBJECTIVE_SETS = {"all": list(OBJECTIVES), "inpo": ["inpo"]}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def served_objectives(settings: Mapping[str, Any]) -> list[str]:
    """The objectives a store can train (stores of schema v1 predate the baselines: InPO only)."""
    return list(settings.get("objectives", ["inpo"]))


def stores_forward_inputs(settings: Mapping[str, Any]) -> bool:
    """Whether stage one writes (or a store holds) the inputs of the forward-noised objectives."""
    return any(OBJECTIVES[name].inputs == FORWARD_INPUTS for name in served_objectives(settings))


def check_served(objective: Objective, settings: Mapping[str, Any], cache: str) -> None:
    """One line naming the fix when the store cannot train `objective`."""
    served = served_objectives(settings)
    if objective.name not in served:
        raise UserError(
            f"{cache} serves only {', '.join(served)} (inverted with `--objectives inpo` or by an earlier inpo); "
            f"for --objective {objective.name} re-invert it with `inpo invert --objectives all` "
            "(the same options otherwise, a new --out)"
        )


def default_beta(objective: Objective, family: str) -> float:
    """The family's default β for the objective (`Family.default_beta`); 0 where β is unused (SFT)."""
    from inpo_pipeline.families import family_named

    if not objective.uses_beta:
        return 0.0
    beta = family_named(family).default_beta(objective.name)
    if beta is None:
        raise UserError(f"no default β for --objective {objective.name} on {family} models; give --beta")
    return beta


def beta_convention(settings: Mapping[str, Any]) -> str:
    """What β multiplies on a store, recorded with every run: β's scale depends on the space the
    errors are measured in (DESIGN §1.8), so a β is only comparable between runs of one convention."""
    process = settings.get("process") or {"kind": "diffusion", "prediction": "epsilon"}
    space = {"epsilon": "ε", "v_prediction": "v", "flow": "flow velocity"}.get(process.get("prediction"),
                                                                             str(process.get("prediction")))
    return (f"loss −log σ(−(β/2)·[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]), e = mean over latent elements of the "
            f"squared error in {space} space ({settings.get('family')} {process.get('kind')} store)")

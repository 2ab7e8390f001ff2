"""The objectives `inpo train` can optimise from one store, and what each reads (DESIGN §1.4, §1.7).

An objective is one entry of `OBJECTIVES`: its loss (in `loss.py`), which cached inputs it
reads, whether the policy sees the rejected image, and its default β per family. Adding a
DPO-family loss is a function in `loss.py` and one entry here; the trainer, the loader, the
metrics and the CLI take it from this list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inpo_pipeline.errors import UserError
from inpo_pipeline.loss import PreferenceLoss, diffusion_dpo_loss, inpo_loss, sft_loss
from inpo_pipeline.models import SD15, SDXL

INVERSION_INPUTS = "inversion"  # x_t, τ_t, e_ref of the inverted latents
FORWARD_INPUTS = "forward"  # x0, a regenerated ε, e_ref of the forward-noised latents


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[..., PreferenceLoss]
    inputs: str
    pairwise: bool  # False: only the winners are forwarded (half the policy's work)
    default_beta: Mapping[str, float] | None  # per family; None: β is not used
    description: str


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        # β: the authors' runs (DESIGN §1.4)
        Objective("inpo", inpo_loss, INVERSION_INPUTS, True, {SD15: 2000.0, SDXL: 5000.0},
                  "InPO: DDIM-inverted x_t and τ_t (DESIGN §1.4)"),
        # β = 5000 for both families in Diffusion-DPO's released runs (DESIGN §1.7)
        Objective("diffusion-dpo", diffusion_dpo_loss, FORWARD_INPUTS, True, {SD15: 5000.0, SDXL: 5000.0},
                  "Diffusion-DPO: forward-noised x_t and ε (DESIGN §1.7)"),
        Objective("sft", sft_loss, FORWARD_INPUTS, False, None, "SFT: ε-MSE on the winners (DESIGN §1.7)"),
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
    """β of the objective's original runs for this family; 0 where β is unused (SFT)."""
    return 0.0 if objective.default_beta is None else objective.default_beta[family]

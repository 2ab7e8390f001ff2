"""Recipes: named sets of stage-one settings, and the stage-two defaults that go with them.

`--recipe authors` is the released code's algorithm (DESIGN §1.5) in every setting that changes
what a row holds; `--recipe inpo` is the project's own variant (the walk ends exactly at t,
unconditional inversion, no noise, deterministic x0). An option given explicitly on the command
line always wins over its recipe's value; the store records the recipe and every resolved value.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "authors": {
        "timestep_mode": "authors",
        "inversion_steps": 10,
        "inversion_guidance": 1.0,
        "eta": 0.1,
        "inversion_prompt_dropout": 0.2,
        "time_ids": "constant",
        "vae_latent": "sample",
        "flip": 0.5,
    },
    "inpo": {
        "timestep_mode": "exact",
        "inversion_steps": 10,
        "inversion_guidance": 0.0,
        "eta": 0.0,
        "inversion_prompt_dropout": 0.0,
        "time_ids": "original",
        "vae_latent": "mean",
        "flip": 0.0,
    },
}
DEFAULT_RECIPE = "authors"

FLOW_RECIPE_CHANGES: dict[str, Any] = {"timestep_mode": "exact", "eta": 0.0}
"""What a recipe becomes on a flow model (DESIGN §1.8): the authors' loop is a DDIM loop with DDPM
noise and has no flow counterpart, so every recipe walks the Euler ODE exactly to σ, without
noise; the recipe's other values (guidance, prompt dropout, x0, flip) carry over unchanged. A
flow store made with `--recipe authors` is therefore a variant of the authors' method."""

TRAIN_PROMPT_DROPOUT = 0.2
"""The authors' share of empty prompts; applied at training time only where it is sound (below)."""


def recipe_values(name: str, process_kind: str = "diffusion") -> dict[str, Any]:
    """The recipe's values for a model whose process is `process_kind` ("diffusion" or "flow")."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    values = dict(RECIPES[name])
    if process_kind == "flow":
        values.update(FLOW_RECIPE_CHANGES)
    return values


def is_flow(settings: dict[str, Any]) -> bool:
    return (settings.get("process") or {}).get("kind") == "flow"


def train_prompt_dropout_default(settings: dict[str, Any]) -> float:
    """The trainer's default share of rows switched to "" at training time, for a store.

    Switching a row's prompt at training time is only sound when its x_t does not depend on the
    prompt, i.e. for unconditional inversion (w_inv = 0): then 0.2, the authors' share. A store
    inverted with its captions (w_inv ≠ 0) defaults to 0, since its dropout, if any, was applied
    before inversion (`--inversion-prompt-dropout`) and those rows already train on "".
    """
    return TRAIN_PROMPT_DROPOUT if float(settings.get("inversion_guidance", 0.0)) == 0.0 else 0.0


def store_warnings(settings: dict[str, Any]) -> list[str]:
    """What a user must be told before training on (or citing) this store."""
    warnings = []
    if settings.get("timestep_mode") == "grid":
        warnings.append(
            "this store was made by the retired `grid` timestep mode, which does not reproduce the authors' "
            "inversion (DESIGN §1.5: one stride too low, destination labels, ā = 1 start); its results are "
            "a variant's, not the authors'. Re-invert with --recipe authors for the authors' algorithm"
        )
    if settings.get("timestep_mode") == "exact" and not is_flow(settings):
        warnings.append(
            "this store's targets come from the `exact` walk (the `inpo` recipe's variant), which trained the "
            "shapes world's brightness *against* its labels while the authors' walk followed "
            "them (docs/proof.md, \"Preferences of every kind\"); prefer --recipe authors (the default) for "
            "preferences about whole-image properties"
        )
    return warnings


def describe_inversion(settings: dict[str, Any]) -> str:
    """One line: the recipe and every setting that changes what a row holds."""
    mode = settings.get("timestep_mode")
    if is_flow(settings):
        process = settings["process"]
        label = (f"flow {mode} Euler walk (variant: the authors' loop is DDIM-only), "
                 f"σ {process.get('sigma_sampling')} after shift {process.get('shift')}")
        return (
            f"recipe {settings.get('recipe')}; {label}, n={settings['inversion_steps']}, "
            f"w_inv={settings['inversion_guidance']}, prompt dropout before inversion "
            f"{settings.get('inversion_prompt_dropout', 0.0)}, x0 {settings.get('vae_latent', 'mean')}, "
            f"flip {settings.get('flip', 0.0)}, K={settings['timesteps_per_pair']}, seed={settings['seed']}"
        )
    label = {"grid": "grid (retired variant, NOT the authors' algorithm)", "exact": "exact (variant)",
             "authors": "authors (the released loop)"}.get(mode, str(mode))
    recipe = settings.get("recipe") or "none (schema v1)"
    matches = [name for name, values in RECIPES.items()
               if all(settings.get(key) == value for key, value in values.items())]
    if settings.get("recipe") and settings.get("recipe") not in matches:
        recipe += " with overrides"
    return (
        f"recipe {recipe}; mode {label}, n={settings['inversion_steps']}, w_inv={settings['inversion_guidance']}, "
        f"eta={settings['eta']}, prompt dropout before inversion {settings.get('inversion_prompt_dropout', 0.0)}, "
        f"x0 {settings.get('vae_latent', 'mean')}, flip {settings.get('flip', 0.0)}, "
        f"time ids {settings.get('time_ids', 'original')}, K={settings['timesteps_per_pair']}, seed={settings['seed']}"
    )

"""`inpo demo` and `inpo world build|data|eval`: the shapes world in which alignment is measured.

Registered on the main app by `inpo_pipeline.cli.app` (``register(app)``); parsing and printing only,
the work is in `stages.demo` and `inpo_pipeline.worlds.shapes`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from inpo_pipeline.method.recipes import DEFAULT_RECIPE
from inpo_pipeline.reporting import Reporter

SAMPLE_STEPS_HELP = "DDIM sampling steps (same for base and aligned)."
GUIDANCE_HELP = "Classifier-free guidance scale, same for base and aligned (default: 3.0 in the SD1.5 world, 4.0 in the flow world)."


def register(app: typer.Typer) -> None:
    """Add `demo` and the `world` group to the `inpo` app."""
    from inpo_pipeline.cli.app import _user_errors

    world_app = typer.Typer(help="The shapes world: build its model, make preference data, evaluate runs.",
                            no_args_is_help=True)
    app.add_typer(world_app, name="world")

    @app.command()
    @_user_errors
    def demo(
        out: Annotated[str, typer.Option(help="Folder for data, stores, runs, grid.png, rewards.png, results.json.")] = "demo-output",
        world: Annotated[str | None, typer.Option(help="World: shapes (the committed SD1.5-type world, default), shapes-flow (the SD3-type flow world), or a world folder.")] = None,
        rebuild_world: Annotated[bool, typer.Option(help="Train the world model from scratch first.")] = False,
        pairs_per_prompt: Annotated[int, typer.Option(help="Preference pairs per training prompt (12 prompts).")] = 50,
        eval_seeds: Annotated[int, typer.Option(help="Seeds per held-out prompt (6 prompts) for the evaluation.")] = 40,
        controls: Annotated[bool, typer.Option(help="Also train on shuffled and on reversed labels.")] = True,
        rewards: Annotated[str, typer.Option(help="Rewards that label the data, comma-separated: colour, size, height, position, "
                                                  "brightness, contrast (docs/proof.md).")] = "colour,brightness",
        labels: Annotated[str, typer.Option(help="Labellings, comma-separated: reward (true), shuffled, reversed.")] = "reward,shuffled,reversed",
        beta: Annotated[float | None, typer.Option(help="β of the InPO loss (default: the world family's: 2000 in the SD1.5 world, 100 in the flow world; docs/proof.md).")] = None,
        lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-5,
        steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
        batch_size: Annotated[int, typer.Option(help="Pairs per optimizer step.")] = 16,
        warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 10,
        recipe: Annotated[str, typer.Option(help="Stage-one recipe: authors or inpo (see `inpo invert`).")] = DEFAULT_RECIPE,
        timesteps_per_pair: Annotated[int, typer.Option(help="Rows (timestep draws) per pair.")] = 2,
        sample_steps: Annotated[int, typer.Option(help=SAMPLE_STEPS_HELP)] = 20,
        guidance: Annotated[float | None, typer.Option(help=GUIDANCE_HELP)] = None,
        seed: Annotated[int, typer.Option(help="Seed of the data, the inversion and the training.")] = 0,
    ) -> None:
        """The whole story on a small world with a known reward: data, invert, train, sample, score."""
        from stages.demo import DemoOptions, run_demo

        run_demo(DemoOptions(
            out=out, world=world, rebuild_world=rebuild_world, pairs_per_prompt=pairs_per_prompt,
            eval_seeds=eval_seeds, controls=controls, rewards=rewards, labels=labels, beta=beta, lr=lr, steps=steps, batch_size=batch_size,
            warmup=warmup, recipe=recipe, timesteps_per_pair=timesteps_per_pair,
            sample_steps=sample_steps, guidance=guidance, seed=seed,
        ), Reporter())

    @world_app.command("build")
    @_user_errors
    def world_build(
        out: Annotated[Path, typer.Option(help="Where to write the pipeline folder.")],
        seed: Annotated[int, typer.Option(help="Seed of data, initialisation and training.")] = 0,
    ) -> None:
        """Train the world model from scratch (deterministic; the committed one is worlds/shapes)."""
        from inpo_pipeline.worlds.shapes import WorldConfig, build_world

        reporter = Reporter()
        record = build_world(out, WorldConfig(seed=seed), reporter.progress)
        reporter.table("inpo world build", [("model", out), *record["timings"].items()])

    @world_app.command("data")
    @_user_errors
    def world_data(
        out: Annotated[Path, typer.Option(help="Folder: LABELING.parquet per labeling, preference-samples.npz.")],
        model: Annotated[str | None, typer.Option(help="World: shapes (default), shapes-flow, or a world folder.")] = None,
        pairs_per_prompt: Annotated[int, typer.Option(help="Pairs per training prompt (12 prompts).")] = 50,
        labeling: Annotated[list[str], typer.Option(help="reward, shuffled or reversed (repeatable).")] = ["reward"],  # noqa: B006
        sample_steps: Annotated[int, typer.Option(help=SAMPLE_STEPS_HELP)] = 20,
        guidance: Annotated[float | None, typer.Option(help=GUIDANCE_HELP)] = None,
        seed: Annotated[int, typer.Option(help="Seed of the sample seeds and of the shuffled labels.")] = 0,
    ) -> None:
        """The base model's own sample pairs, labelled by the world's reward, as Pick-a-Pic parquet."""
        from inpo_pipeline.errors import UserError
        from inpo_pipeline.worlds.shapes import LABELINGS, SamplerSettings
        from stages.demo import ensure_world, sample_pool, world_kind, write_dataset

        unknown = [name for name in labeling if name not in LABELINGS]
        if unknown:
            raise UserError(f"--labeling must be one of {LABELINGS}, not {unknown}")
        reporter = Reporter()
        folder = ensure_world(model, False, reporter)
        out.mkdir(parents=True, exist_ok=True)
        settings = SamplerSettings(sample_steps, guidance if guidance is not None else world_kind(folder).default_guidance)
        pool = sample_pool(folder, pairs_per_prompt, settings, seed, reporter,
                           cache=out / "preference-samples.npz")
        for name in labeling:
            written = write_dataset(pool, out / f"{name}.parquet", name, seed)
            reporter.table(f"inpo world data: {name}", list(written.items()))

    @world_app.command("eval")
    @_user_errors
    def world_eval(
        run: Annotated[list[str], typer.Option(help="NAME=RUN_DIR or NAME=RUN_DIR@STEP (a checkpoint); repeatable.")],
        model: Annotated[str | None, typer.Option(help="World: shapes (default), shapes-flow, or a world folder.")] = None,
        eval_seeds: Annotated[int, typer.Option(help="Seeds per held-out prompt (6 prompts).")] = 40,
        sample_steps: Annotated[int, typer.Option(help=SAMPLE_STEPS_HELP)] = 20,
        guidance: Annotated[float | None, typer.Option(help=GUIDANCE_HELP)] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers here.")] = None,
        grid: Annotated[Path | None, typer.Option(help="Write a base|aligned PNG grid of the first run here.")] = None,
        plot: Annotated[Path | None, typer.Option(help="Write the reward plot here.")] = None,
    ) -> None:
        """Sample base and trained UNets on held-out prompts with the same seeds; reward, win rate, CIs."""
        from inpo_pipeline.errors import UserError
        from inpo_pipeline.worlds.shapes import SamplerSettings
        from stages.demo import (
            ensure_world, evaluate, print_comparisons, run_unet, world_kind, write_grid, write_reward_plot,
        )

        unets = {}
        for spec in run:
            name, separator, where = spec.partition("=")
            if not separator or not name:
                raise UserError(f"--run must be NAME=RUN_DIR or NAME=RUN_DIR@STEP, not {spec!r}")
            path, _, step = where.partition("@")
            if not any((Path(path) / folder / "config.json").exists() for folder in ("unet", "transformer")):
                raise UserError(f"{path} is not a finished `inpo train` run (no unet/ or transformer/config.json)")
            unets[name] = run_unet(path, int(step) if step else None)
        reporter = Reporter()
        folder = ensure_world(model, False, reporter)
        settings = SamplerSettings(sample_steps, guidance if guidance is not None else world_kind(folder).default_guidance)
        evaluation = evaluate(folder, unets, eval_seeds, settings, reporter)
        comparisons = evaluation.comparisons()
        print_comparisons(reporter, comparisons, f"{evaluation.base.size} held-out samples")
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({name: c.as_dict() for name, c in comparisons.items()}, indent=2))
        if grid:
            write_grid(grid, evaluation, next(iter(unets)))
        if plot:
            write_reward_plot(plot, evaluation)

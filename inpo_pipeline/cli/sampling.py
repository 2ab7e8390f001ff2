"""`inpo sample`, `inpo eval` and `inpo label`: parse, call a stage, print. `register(app)` adds them to the CLI."""

from __future__ import annotations

from typing import Annotated

import typer

from inpo_pipeline.reporting import Reporter


def register(app: typer.Typer) -> None:
    """Add the `sample`, `eval` and `label` commands to `app`."""
    from inpo_pipeline.cli.app import _user_errors

    @app.command()
    @_user_errors
    def sample(
        model: Annotated[str, typer.Option(help="Diffusers pipeline folder or hub id (SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1).")],
        prompts: Annotated[str, typer.Option(help="Prompt set: text file (one per line), Pick-a-Pic parquet "
                                                  "(file/folder/glob), Parti-Prompts TSV, or HPSv2 benchmark JSON.")],
        out: Annotated[str, typer.Option(help="Folder for the images and manifest.jsonl (resumed if present).")],
        unet: Annotated[str | None, typer.Option(help="Another UNet/transformer: RUN_DIR/unet (or RUN_DIR/transformer) of `inpo train`, or a pipeline folder.")] = None,
        lora: Annotated[str | None, typer.Option(help="LoRA weights: RUN_DIR/lora of `inpo train` (applied on top of --unet if both).")] = None,
        seeds: Annotated[int, typer.Option(help="Images per prompt, with seeds 0..N-1.")] = 1,
        steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
        guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance (default: 7.5 SD1.5, 5.0 SDXL, 7.0 SD3; FLUX: the guidance embedding, 3.5).")] = None,
        resolution: Annotated[int | None, typer.Option(help="Image side in pixels (default: the model's native size).")] = None,
        scheduler: Annotated[str | None, typer.Option(help="ddim (default), euler, euler_a or dpm++ (DPMSolverMultistep); flow models: flow-euler (default).")] = None,
        batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 4,
        dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32).")] = None,
        device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")] = None,
    ) -> None:
        """Generate images for a prompt set under one pinned protocol (resumable)."""
        from inpo_pipeline.evaluation.sampling import describe_model
        from stages.sample import SampleOptions, run_sample

        options = SampleOptions(model=model, prompts=prompts, out=out, unet=unet, lora=lora, seeds=seeds,
                                steps=steps, guidance=guidance, resolution=resolution, scheduler=scheduler,
                                batch_size=batch_size, dtype=dtype, device=device)
        reporter = Reporter()
        summary = run_sample(options, reporter)
        protocol = summary["protocol"]
        reporter.table("inpo sample", [
            ("folder", summary["out"]),
            ("images", f"{summary['images']} ({summary['prompts']} prompts × {summary['seeds']} seeds): "
                       f"{summary['generated']} generated, {summary['skipped']} already present"),
            ("model", describe_model(summary["model"])),
            ("protocol", f"{protocol['scheduler']} × {protocol['steps']} steps, guidance {protocol['guidance']}, "
                         f"{protocol['resolution']} px, {protocol['dtype']}"),
            ("wall time", f"{summary['seconds']:.1f} s on {summary['device']}"),
        ])

    @app.command("eval")
    @_user_errors
    def evaluate(
        dir_a: Annotated[str, typer.Argument(help="Sample folder A (e.g. the base model's).")],
        scorer: Annotated[list[str], typer.Option(help="pickscore, clip, aesthetic, hps or imagereward; repeatable.")],
        out: Annotated[str, typer.Option(help="Report path: writes REPORT.json, REPORT.md and REPORT.png.")],
        dir_b: Annotated[str | None, typer.Argument(help="Sample folder B (e.g. the aligned model's), paired with A.")] = None,
        scorer_model: Annotated[list[str] | None, typer.Option(help="[NAME=]PATH: the scorer's weights (model folder or hub id; "
                                                                    "the head/checkpoint file for aesthetic and hps).")] = None,
        processor: Annotated[list[str] | None, typer.Option(help="[NAME=]PATH: the CLIP processor (default: the scorer's published one).")] = None,
        backbone: Annotated[list[str] | None, typer.Option(help="[NAME=]PATH: CLIP under the aesthetic head / CLIP config for hps.")] = None,
        batch_size: Annotated[int, typer.Option(help="Images per scorer call.")] = 16,
        device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")] = None,
    ) -> None:
        """Score sample folders with preference models; with two folders, B's win rate over A."""
        from stages.evaluate import EvalOptions, assign_to_scorers, report_paths, run_eval

        scorers = list(scorer)
        options = EvalOptions(
            dir_a=dir_a, dir_b=dir_b, out=out, scorers=scorers,
            scorer_models=assign_to_scorers(scorer_model, scorers, "--scorer-model"),
            processors=assign_to_scorers(processor, scorers, "--processor"),
            backbones=assign_to_scorers(backbone, scorers, "--backbone"),
            batch_size=batch_size, device=device,
        )
        reporter = Reporter()
        report = run_eval(options, reporter)
        rows: list[tuple[str, str]] = []
        for name, section in report["scorers"].items():
            if not section["available"]:
                rows.append((name, f"unavailable: {section['reason']}"))
                continue
            text = f"A mean {section['A']['mean']:.4f}, median {section['A']['median']:.4f}"
            if "B" in section:
                rate = section["win_rate"]
                interval = ("one prompt: no interval" if rate["low"] is None else
                            f"{rate['low']:.1%}, {rate['high']:.1%}; p = {rate['p_value']:.3g}")
                text += (f"; B mean {section['B']['mean']:.4f}, median {section['B']['median']:.4f}; B wins "
                         f"{rate['rate']:.1%} [{interval}] of {rate['n']} pairs, {rate['prompts']} prompts")
            rows.append((name, text))
        paths = report_paths(out)
        rows.append(("report", f"{paths['json']}, {paths['md']}" + (f", {paths['png']}" if "plot" in report else "")))
        reporter.table("inpo eval", rows)
        if not any(section["available"] for section in report["scorers"].values()):
            raise typer.Exit(1)

    @app.command()
    @_user_errors
    def label(
        samples: Annotated[str, typer.Argument(help="Sample folder of `inpo sample --seeds K` (K >= 2): each prompt's images are paired by seed.")],
        scorer: Annotated[str, typer.Option(help="pickscore, clip, aesthetic, hps, imagereward, or shapes (the shapes world's reward).")],
        out: Annotated[str, typer.Option(help="The dataset: a Pick-a-Pic v2 layout .parquet for `inpo invert --data`.")],
        scorer_model: Annotated[str | None, typer.Option(help="The scorer's weights (as in `inpo eval`); for shapes, which reward (default colour).")] = None,
        processor: Annotated[str | None, typer.Option(help="The CLIP processor (default: the scorer's published one).")] = None,
        backbone: Annotated[str | None, typer.Option(help="CLIP under the aesthetic head / CLIP config for hps.")] = None,
        tie_margin: Annotated[float, typer.Option(help="A score gap of at most this is a tie (label 0.5; stage one drops ties).")] = 0.0,
        batch_size: Annotated[int, typer.Option(help="Pairs per scorer call.")] = 16,
        device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    ) -> None:
        """Label a sample folder's image pairs with a scorer: a preference dataset (AI feedback)."""
        from inpo_pipeline.evaluation.sampling import describe_model
        from stages.label import LabelOptions, run_label

        options = LabelOptions(samples=samples, out=out, scorer=scorer, scorer_model=scorer_model, processor=processor,
                               backbone=backbone, tie_margin=tie_margin, batch_size=batch_size, device=device,
                               overwrite=overwrite)
        reporter = Reporter()
        summary = run_label(options, reporter)
        decided = summary["pairs"] - summary["ties"]
        reporter.table("inpo label", [
            ("dataset", summary["out"]),
            ("pairs", f"{summary['pairs']}: {summary['ties']} ties (margin {summary['tie_margin']:g}), image 0 preferred in "
                      f"{summary['first_preferred']} of {decided}; {summary['unpaired_images']} images without a partner"),
            ("scorer", ", ".join(f"{k} {v}" for k, v in summary["scorer"].items() if v)),
            ("source", f"{summary['source']['folder']} ({describe_model(summary['source']['model'])})"),
            ("wall time", f"{summary['seconds']:.1f} s"),
        ])

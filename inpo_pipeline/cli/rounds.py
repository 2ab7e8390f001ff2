"""`inpo rounds`: parse, call `stages.rounds`, print. `register(app)` adds it to the CLI."""

from __future__ import annotations

from typing import Annotated

import typer

from inpo_pipeline.reporting import Reporter


def register(app: typer.Typer) -> None:
    """Add the `rounds` command to `app`."""
    from inpo_pipeline.cli.app import _user_errors

    @app.command()
    @_user_errors
    def rounds(
        model: Annotated[str, typer.Option(help="Base pipeline (folder or hub id): round 1's reference.")],
        out: Annotated[str, typer.Option(help="Chain folder: round-K/{samples,data.parquet,store.zarr,run,pipeline} and chain.json (resumed if present).")],
        rounds: Annotated[int, typer.Option(help="Number of rounds (a larger number extends a finished chain).")] = 2,
        data: Annotated[str | None, typer.Option(help="(a) Same data: the preference dataset every round inverts (as `inpo invert --data`).")] = None,
        prompts: Annotated[str | None, typer.Option(help="(b) On-policy: the prompt set sampled from each round's reference (as `inpo sample --prompts`).")] = None,
        scorer: Annotated[str | None, typer.Option(help="(b) The scorer that labels the sampled pairs (as `inpo label --scorer`).")] = None,
        scorer_model: Annotated[str | None, typer.Option(help="(b) The scorer's weights; for shapes, which reward.")] = None,
        tie_margin: Annotated[float, typer.Option(help="(b) A score gap of at most this is a tie (dropped).")] = 0.0,
        sample_seeds: Annotated[int, typer.Option(help="(b) Images per prompt (paired by seed: 2 → one pair per prompt).")] = 2,
        sample_steps: Annotated[int, typer.Option(help="(b) Sampling steps.")] = 50,
        sample_guidance: Annotated[float | None, typer.Option(help="(b) Sampling guidance (default: the family's).")] = None,
        sample_resolution: Annotated[int | None, typer.Option(help="(b) Sampling resolution (default: the model's native).")] = None,
        seed: Annotated[int, typer.Option(help="Round k inverts and trains with seed + k − 1.")] = 0,
        invert: Annotated[list[str] | None, typer.Option(help="KEY=VALUE of `inpo invert` for every round, repeatable (e.g. inversion-steps=10).")] = None,
        train: Annotated[list[str] | None, typer.Option(help="KEY=VALUE of `inpo train` for every round, repeatable (e.g. steps=400, lora-rank=16).")] = None,
        device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")] = None,
    ) -> None:
        """Iterative InPO: round k+1 re-inverts with round k's trained policy as its reference."""
        from stages.rounds import RoundsOptions, parse_stage_options, run_rounds

        options = RoundsOptions(
            model=model, out=out, rounds=rounds, data=data, prompts=prompts, scorer=scorer, scorer_model=scorer_model,
            tie_margin=tie_margin, sample_seeds=sample_seeds, sample_steps=sample_steps,
            sample_guidance=sample_guidance, sample_resolution=sample_resolution, seed=seed,
            invert=parse_stage_options(invert, "invert"), train=parse_stage_options(train, "train"), device=device,
        )
        reporter = Reporter()
        chain = run_rounds(options, reporter)
        rows = []
        for entry in chain["rounds"][:rounds]:
            final = entry.get("final_metrics") or {}
            metrics = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "implicit_accuracy") if k in final)
            rows.append((f"round {entry['round']}", f"reference {entry['reference']} → {entry['pipeline']}"
                         + (f" ({metrics})" if metrics else "")))
        rows.append(("chain", f"{out}/chain.json ({chain['mode']}, {chain['seconds']:.0f} s)"))
        reporter.table("inpo rounds", rows)

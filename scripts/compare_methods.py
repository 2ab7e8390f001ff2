"""Methods side by side in the shapes world, from the same stores, with training seeds and controls.

    OMP_NUM_THREADS=2 python scripts/compare_methods.py --out methods-output \\
        --method authors:inpo --method inpo:inpo --method authors:diffusion-dpo --method authors:sft

A method is RECIPE:OBJECTIVE: the stage-one recipe (`inpo invert --recipe`) and the stage-two
objective (`inpo train --objective`). For each reward (`--reward`, a name of `world.REWARDS`) and
each labelling (`--labels`: true, shuffled, reversed), one store per recipe is made from the same
base samples (`run_invert`, the real stage one; every objective of that recipe trains from it), then
`--seeds` trainings per method (`run_train`, the real stage two, with the settings of
docs/proof.md: lr 3e-5, 100 steps × 16 pairs, warm-up 10; β is each objective's default for the
family unless `--beta OBJECTIVE=VALUE`), then one evaluation of every run on the held-out
prompts × seeds, scored by the same reward. Δ reward and win rate against the base are pooled
over the training runs with a cluster bootstrap (runs, and prompts with their seeds, resampled;
`inpo_pipeline.evaluation.stats.compare_paired`); `--head-to-head A B` adds A − B on the same
held-out seeds (seed i of A paired with seed i of B). Writes results.json, results.md and
results.png under --out; runs and stores that exist are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inpo_pipeline.worlds import shapes as world  # noqa: E402
from inpo_pipeline.method.objectives import OBJECTIVES  # noqa: E402
from inpo_pipeline.method.recipes import RECIPES  # noqa: E402
from inpo_pipeline.reporting import Reporter  # noqa: E402
from inpo_pipeline.evaluation.stats import compare_paired  # noqa: E402
from stages.demo import ensure_world, evaluate, rescored, run_unet, sample_pool, write_dataset  # noqa: E402
from stages.invert import InvertOptions, run_invert  # noqa: E402
from stages.train import TrainOptions, run_train  # noqa: E402


def parse_method(text: str) -> tuple[str, str]:
    """RECIPE[+SETTING=VALUE...]:OBJECTIVE, e.g. inpo+timestep_mode=authors:inpo (one recipe setting changed)."""
    recipe, _, objective = text.partition(":")
    base, *overrides = recipe.split("+")
    if base not in RECIPES or objective not in OBJECTIVES or any(
            o.partition("=")[0] not in RECIPES[base] for o in overrides):
        raise SystemExit(f"error: --method {text!r} must be RECIPE[+SETTING=VALUE...]:OBJECTIVE with RECIPE in "
                         f"{list(RECIPES)}, SETTING in {list(RECIPES['authors'])} and OBJECTIVE in {list(OBJECTIVES)}")
    return recipe, objective


def recipe_options(recipe: str) -> dict:
    """InvertOptions fields of a RECIPE[+SETTING=VALUE...] string."""
    base, *overrides = recipe.split("+")
    options: dict = {"recipe": base}
    for override in overrides:
        key, _, value = override.partition("=")
        default = RECIPES[base][key]
        options[key] = type(default)(value) if not isinstance(default, str) else value
    return options


def method_name(method: tuple[str, str]) -> str:
    return f"{method[0]}:{method[1]}"


def summarise(differences: np.ndarray) -> dict:
    """differences: (runs, prompts, seeds) paired differences."""
    runs, prompts, seeds = differences.shape
    result = compare_paired(differences.reshape(runs, prompts * seeds), np.repeat(np.arange(prompts), seeds))
    delta, rate = result.mean_difference, result.win_rate
    return {
        "runs": runs, "samples_per_run": prompts * seeds,
        "delta_reward": delta.estimate, "delta_interval": (delta.low, delta.high), "delta_p_value": delta.p_value,
        "win_rate": rate.estimate, "win_interval": (rate.low, rate.high), "win_p_value": rate.p_value,
        "delta_per_seed": [float(d.mean()) for d in differences],
        "win_rate_per_seed": [float(np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)).mean()) for d in differences],
    }


def draw_plot(path: Path, rows: list[dict], labelings: list[str]) -> None:
    """Δ reward with its 95% interval per method (one panel per reward × labelling), a zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in rows if "vs" not in row))
    rewards = list(dict.fromkeys(row["reward"] for row in rows))
    figure, axes = plt.subplots(len(rewards), len(labelings), squeeze=False,
                                figsize=(3.4 * len(labelings) + 1.5, 0.35 * len(methods) * len(rewards) + 1.2 * len(rewards)))
    for r_index, reward_name in enumerate(rewards):
        for l_index, labeling in enumerate(labelings):
            axis = axes[r_index, l_index]
            for m_index, method in enumerate(methods):
                match = [row for row in rows if row["reward"] == reward_name and row["labels"] == labeling
                         and row["method"] == method and "vs" not in row]
                if not match:
                    continue
                row = match[0]
                low, high = row["delta_interval"]
                colour = "tab:blue" if low > 0 else "tab:red" if high < 0 else "grey"
                axis.errorbar([row["delta_reward"]], [m_index], xerr=[[row["delta_reward"] - low], [high - row["delta_reward"]]],
                              fmt="o", color=colour, capsize=3)
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_yticks(range(len(methods)), methods if l_index == 0 else [""] * len(methods), fontsize=7)
            axis.invert_yaxis()
            axis.set_title(f"{reward_name} reward, {labeling} labels", fontsize=8)
            axis.set_xlabel("Δ reward vs base [95% CI]", fontsize=7)
            axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("methods-output"))
    parser.add_argument("--method", action="append", default=None, help="RECIPE:OBJECTIVE (repeat)")
    parser.add_argument("--reward", action="append", default=None, choices=list(world.REWARDS))
    parser.add_argument("--labels", default="reward,shuffled", help="comma-separated: reward, shuffled, reversed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method and labelling")
    parser.add_argument("--eval-seeds", type=int, default=40, help="seeds per held-out prompt (6 prompts)")
    parser.add_argument("--pairs-per-prompt", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--beta", action="append", default=[], help="OBJECTIVE=VALUE (default: the objective's)")
    parser.add_argument("--winner-preserving", type=float, default=None,
                        help="μ of `inpo train --winner-preserving` for every pairwise run (use another --out)")
    parser.add_argument("--head-to-head", nargs=2, action="append", default=[], metavar=("A", "B"))
    arguments = parser.parse_args()
    methods = [parse_method(m) for m in (arguments.method or ["authors:inpo"])]
    rewards = arguments.reward or ["colour"]
    labelings = arguments.labels.split(",")
    unknown = [label for label in labelings if label not in world.LABELINGS]
    if unknown:
        raise SystemExit(f"error: --labels {unknown} not in {list(world.LABELINGS)}")
    betas = {key: float(value) for key, _, value in (b.partition("=") for b in arguments.beta)}
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    reporter = Reporter()
    model = ensure_world(None, False, reporter)
    sampler = world.SamplerSettings(20, 3.0)
    pool = sample_pool(model, arguments.pairs_per_prompt, sampler, 0, reporter, cache=out / "preference-samples.npz")
    recipes = list(dict.fromkeys(recipe for recipe, _ in methods))
    stage_one: dict[str, dict] = {}
    runs: dict[tuple[str, str, str, int], Path] = {}
    for reward_name in rewards:
        scored = rescored(pool, reward_name)
        for labeling in labelings:
            data = out / f"{reward_name}-{labeling}.parquet"
            description = write_dataset(scored, data, labeling, 0)
            for recipe in recipes:
                key = f"{reward_name}-{labeling}-{recipe}"
                store = out / f"{key}.zarr"
                started = time.perf_counter()
                objectives = "all" if any(o != "inpo" for r, o in methods if r == recipe) else "inpo"
                summary = run_invert(InvertOptions(
                    model=str(model), data=str(data), out=str(store), **recipe_options(recipe), timesteps_per_pair=2,
                    batch_size=64, rows_per_shard=128, shards_per_window=4, seed=0, device="cpu",
                    objectives=objectives,
                ), reporter)
                stage_one[key] = {
                    "seconds": time.perf_counter() - started, "pairs": summary["rows_valid"],
                    "unet_evaluations_per_row": summary["unet_row_evaluations"] / summary["rows_valid"],
                    "agreement_with_reward": description["agreement_with_reward"],
                    "mean_reward_gap": description["mean_reward_gap"],
                }
                for method in methods:
                    if method[0] != recipe:
                        continue
                    for seed in range(arguments.seeds):
                        run = out / "runs" / f"{key}-{method[1]}-seed{seed}"
                        if not (run / "unet" / "config.json").exists():
                            shutil.rmtree(run, ignore_errors=True)
                            run_train(TrainOptions(
                                cache=str(store), out=str(run), objective=method[1], beta=betas.get(method[1]),
                                lr=arguments.lr, steps=arguments.steps, batch_size=16, grad_accum=1, warmup=10,
                                seed=seed, num_workers=0, checkpoint_every=arguments.steps, keep_checkpoints=1,
                                winner_preserving=arguments.winner_preserving if OBJECTIVES[method[1]].pairwise else None,
                            ), reporter)
                        runs[(reward_name, labeling, method_name(method), seed)] = run

    unets = {"/".join(map(str, key)): run_unet(path) for key, path in runs.items()}
    evaluation = evaluate(model, unets, arguments.eval_seeds, sampler, reporter)
    prompts = len(world.HELD_OUT_PROMPTS)
    shape = (prompts, arguments.eval_seeds)
    rows = []
    for reward_name in rewards:
        score = world.REWARDS[reward_name]
        base = score(evaluation.base_images, evaluation.prompts)
        scores = {name: score(images, evaluation.prompts) for name, images in evaluation.aligned_images.items()}

        def per_run(labeling: str, method: str) -> np.ndarray:
            return np.stack([scores[f"{reward_name}/{labeling}/{method}/{seed}"].reshape(shape)
                             for seed in range(arguments.seeds)])

        for labeling in labelings:
            for method in map(method_name, methods):
                rows.append({"reward": reward_name, "labels": labeling, "method": method,
                             **summarise(per_run(labeling, method) - base.reshape(shape)[None])})
            for first, second in arguments.head_to_head:
                rows.append({"reward": reward_name, "labels": labeling, "method": f"{first} − {second}", "vs": second,
                             **summarise(per_run(labeling, first) - per_run(labeling, second))})
        rows_base = float(base.mean())
        stage_one[f"{reward_name}-base-mean-reward"] = {"value": rows_base}
    record = {"stage_one": stage_one, "results": rows, "methods": list(map(method_name, methods)),
              "settings": {"steps": arguments.steps, "lr": arguments.lr, "batch_size": 16, "warmup": 10,
                           "betas": {o: betas.get(o) for o in OBJECTIVES}, "eval_seeds": arguments.eval_seeds,
                           "pairs_per_prompt": arguments.pairs_per_prompt},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    lines = ["| reward | labels | method | Δ reward [95% CI] | win rate [95% CI] | per seed (Δ / win) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        seeds = ", ".join(f"{d:+.4f} / {w:.1%}" for d, w in zip(row["delta_per_seed"], row["win_rate_per_seed"]))
        lines.append(
            f"| {row['reward']} | {row['labels']} | {row['method']} | {row['delta_reward']:+.4f} "
            f"[{row['delta_interval'][0]:+.4f}, {row['delta_interval'][1]:+.4f}] | {row['win_rate']:.1%} "
            f"[{row['win_interval'][0]:.1%}, {row['win_interval'][1]:.1%}] | {seeds} |"
        )
    lines += ["", "| store | stage-one seconds | pairs | UNet evaluations per row | labels agree with reward |",
              "| --- | --- | --- | --- | --- |"]
    for name, facts in stage_one.items():
        if "seconds" in facts:
            lines.append(f"| {name} | {facts['seconds']:.1f} | {facts['pairs']} | "
                         f"{facts['unet_evaluations_per_row']:.2f} | {facts['agreement_with_reward']:.0%} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    draw_plot(out / "results.png", rows, labelings)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

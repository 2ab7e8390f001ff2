"""`--recipe authors` against `--recipe inpo` in the shapes world, with training seeds and controls.

    OMP_NUM_THREADS=2 python scripts/compare_recipes.py --out recipes-output [--seeds 3] [--eval-seeds 40]

For each recipe and each labelling (true, shuffled): one store (`run_invert`, the real stage
one), `--seeds` trainings (`run_train`, the real stage two, the store's own training defaults
except the settings of docs/proof.md: β 2000, lr 3e-5, 100 steps × 16 pairs, warm-up 10), then
one evaluation of every run on the held-out prompts × seeds. Δ reward and win rate are pooled
over the training runs with a clustered bootstrap interval (runs, prompts, seeds resampled;
`inpo_pipeline.winrate.clustered_bootstrap`), so the intervals hold the seed-to-seed spread.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inpo_pipeline import world  # noqa: E402
from inpo_pipeline.reporting import Reporter  # noqa: E402
from inpo_pipeline.winrate import clustered_bootstrap  # noqa: E402
from stages.demo import ensure_world, evaluate, run_unet, sample_pool, write_dataset  # noqa: E402
from stages.invert import InvertOptions, run_invert  # noqa: E402
from stages.train import TrainOptions, run_train  # noqa: E402

RECIPES = ("inpo", "authors")
LABELINGS = ("reward", "shuffled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("recipes-output"))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per recipe and labelling")
    parser.add_argument("--eval-seeds", type=int, default=40, help="seeds per held-out prompt (6 prompts)")
    parser.add_argument("--pairs-per-prompt", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    arguments = parser.parse_args()
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    reporter = Reporter()
    model = ensure_world(None, False, reporter)
    sampler = world.SamplerSettings(20, 3.0)
    pool = sample_pool(model, arguments.pairs_per_prompt, sampler, 0, reporter, cache=out / "preference-samples.npz")
    stage_one: dict[str, dict] = {}
    runs: dict[tuple[str, str, int], Path] = {}
    for labeling in LABELINGS:
        data = out / f"{labeling}.parquet"
        write_dataset(pool, data, labeling, 0)
        for recipe in RECIPES:
            store = out / f"{recipe}-{labeling}.zarr"
            started = time.perf_counter()
            summary = run_invert(InvertOptions(
                model=str(model), data=str(data), out=str(store), recipe=recipe, timesteps_per_pair=2,
                batch_size=64, rows_per_shard=128, shards_per_window=4, seed=0, overwrite=True, device="cpu",
            ), reporter)
            stage_one[f"{recipe}-{labeling}"] = {
                "seconds": time.perf_counter() - started,
                "pairs": summary["rows_valid"],
                "unet_evaluations_per_row": summary["unet_row_evaluations"] / summary["rows_valid"],
            }
            for seed in range(arguments.seeds):
                run = out / "runs" / f"{recipe}-{labeling}-seed{seed}"
                if not (run / "unet" / "config.json").exists():
                    import shutil

                    shutil.rmtree(run, ignore_errors=True)
                    run_train(TrainOptions(
                        cache=str(store), out=str(run), beta=2000.0, lr=3e-5, steps=arguments.steps, batch_size=16,
                        grad_accum=1, warmup=10, seed=seed, num_workers=0, checkpoint_every=arguments.steps,
                        keep_checkpoints=1,
                    ), reporter)
                runs[(recipe, labeling, seed)] = run
    unets = {f"{recipe}-{labeling}-seed{seed}": run_unet(path) for (recipe, labeling, seed), path in runs.items()}
    evaluation = evaluate(model, unets, arguments.eval_seeds, sampler, reporter)
    prompts = len(world.HELD_OUT_PROMPTS)
    rows = []
    for recipe in RECIPES:
        for labeling in LABELINGS:
            names = [f"{recipe}-{labeling}-seed{seed}" for seed in range(arguments.seeds)]
            differences = np.stack([evaluation.aligned[name] - evaluation.base for name in names])
            differences = differences.reshape(len(names), prompts, arguments.eval_seeds)
            delta, delta_interval = clustered_bootstrap(differences, "mean")
            rate, rate_interval = clustered_bootstrap(differences, "win_rate")
            per_seed = [float(d.mean()) for d in differences]
            per_seed_rate = [float(np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)).mean()) for d in differences]
            rows.append({
                "recipe": recipe, "labels": labeling, "runs": len(names), "samples_per_run": differences[0].size,
                "delta_reward": delta, "delta_interval": delta_interval, "win_rate": rate,
                "win_interval": rate_interval, "delta_per_seed": per_seed, "win_rate_per_seed": per_seed_rate,
            })
    record = {"stage_one": stage_one, "results": rows, "base_mean_reward": float(evaluation.base.mean()),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    lines = ["| recipe | labels | Δ reward [95% CI] | win rate [95% CI] | per seed (Δ / win) |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        seeds = ", ".join(f"{d:+.4f} / {w:.1%}" for d, w in zip(row["delta_per_seed"], row["win_rate_per_seed"]))
        lines.append(
            f"| {row['recipe']} | {row['labels']} | {row['delta_reward']:+.4f} [{row['delta_interval'][0]:+.4f}, "
            f"{row['delta_interval'][1]:+.4f}] | {row['win_rate']:.1%} [{row['win_interval'][0]:.1%}, "
            f"{row['win_interval'][1]:.1%}] | {seeds} |"
        )
    lines += ["", "| store | stage-one seconds | pairs | UNet evaluations per row |", "| --- | --- | --- | --- |"]
    for name, facts in stage_one.items():
        lines.append(f"| {name} | {facts['seconds']:.1f} | {facts['pairs']} | {facts['unet_evaluations_per_row']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

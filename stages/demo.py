"""`inpo demo` and `inpo world ...`: the whole pipeline in the shapes world, where the truth is known.

demo = world (load or build) → the base model's own samples, two seeds per training prompt,
labelled by the world's reward (Pick-a-Pic parquet) → `run_invert` → `run_train` → sampling of
base and aligned models on held-out prompts with the same seeds → rewards, win rate, intervals,
a PNG grid and a reward plot. With controls, the same is repeated with shuffled and with reversed
labels. The pieces are also CLI commands (`inpo world data`, `inpo world eval`), so the proof in
docs/proof.md runs the real `inpo invert` / `inpo train` commands between them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.errors import UserError
from inpo_pipeline.method.recipes import DEFAULT_RECIPE
from inpo_pipeline.reporting import Reporter
from inpo_pipeline.evaluation.sampling import files_sha256
from inpo_pipeline.worlds.shapes import SamplerSettings

DATA_SEED_BASE = 1_000_000
"""Seeds of the preference data's samples start here; evaluation seeds are 0, 1, 2, … (disjoint)."""


# ------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class WorldKind:
    """How a world's pipeline is built, loaded, sampled and given a trained denoiser: the SD1.5
    world (UNet, DDIM) or the flow world (SD3-type transformer, FlowMatch Euler, DESIGN §1.8)."""

    denoiser_folder: str
    denoiser_class: str
    default_guidance: float
    load_pipeline: Callable[[Path], Any]
    sample: Callable[..., np.ndarray]
    build: Callable[..., dict[str, Any]]


def _flow_kind() -> WorldKind:
    from inpo_pipeline.worlds import shapes_flow as world_flow

    return WorldKind("transformer", "SD3Transformer2DModel", 4.0, world_flow.load_flow_pipeline,
                     world_flow.sample_flow, world_flow.build_flow_world)


WORLD_KINDS: dict[str, Callable[[], WorldKind]] = {
    "sd15": lambda: WorldKind("unet", "UNet2DConditionModel", 3.0, world.load_pipeline, world.sample,
                              world.build_world),
    "sd3": _flow_kind,
}
"""World kinds by the family of the world's pipeline (a world is one family's pipeline folder)."""


def named_worlds() -> dict[str, Path]:
    """The committed worlds, by the name `inpo demo --world` accepts."""
    from inpo_pipeline.worlds.shapes_flow import DEFAULT_FLOW_WORLD

    return {"shapes": world.DEFAULT_WORLD, "shapes-flow": DEFAULT_FLOW_WORLD}


def world_folder(path: str | Path | None) -> Path:
    """A world's folder: a committed world's name (shapes, shapes-flow), a folder, or the default."""
    if path is None:
        return world.DEFAULT_WORLD
    return named_worlds().get(str(path), Path(path))


def world_kind(model: Path | str) -> WorldKind:
    """The kind of the world at `model` (from its model_index.json); the SD1.5 world when absent."""
    from inpo_pipeline.families import ModelError, detect_family

    if not (Path(model) / "model_index.json").exists():
        return WORLD_KINDS["sd15"]()
    try:
        family = detect_family(str(model)).name
    except ModelError as error:
        raise UserError(str(error)) from error
    if family not in WORLD_KINDS:
        raise UserError(f"{model} is a {family} pipeline; a world is an SD1.5-type or SD3-type pipeline folder")
    return WORLD_KINDS[family]()


def ensure_world(path: str | None, rebuild: bool, reporter: Reporter) -> Path:
    """The world model folder: the committed one (or `path`), built first if missing or asked."""
    folder = world_folder(path)
    if rebuild or not (folder / "model_index.json").exists():
        build = _flow_kind().build if folder.name.endswith("flow") else world.build_world
        reporter.line(f"building the world model at {folder} (deterministic; minutes on 2 cores)")
        record = build(folder, progress=reporter.progress)
        reporter.line(f"world model built in {record['timings']['total_seconds']:.0f} s")
    return folder


# ------------------------------------------------------------------------------ preference data
@dataclass
class PreferencePool:
    """The base model's sample pairs (uint8 images, exactly what the parquet stores) and rewards."""

    prompts: list[str]
    seeds_0: np.ndarray
    seeds_1: np.ndarray
    images_0: np.ndarray
    images_1: np.ndarray
    reward_0: np.ndarray
    reward_1: np.ndarray

    def save(self, path: Path, key: dict[str, Any]) -> None:
        np.savez_compressed(path, key=json.dumps(key, sort_keys=True), prompts=np.array(self.prompts),
                            **{k: getattr(self, k) for k in ("seeds_0", "seeds_1", "images_0", "images_1",
                                                               "reward_0", "reward_1")})

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> PreferencePool | None:
        if not path.exists():
            return None
        with np.load(path) as saved:
            if str(saved["key"]) != json.dumps(key, sort_keys=True):
                return None
            return cls(prompts=[str(p) for p in saved["prompts"]], seeds_0=saved["seeds_0"], seeds_1=saved["seeds_1"],
                       images_0=saved["images_0"], images_1=saved["images_1"], reward_0=saved["reward_0"],
                       reward_1=saved["reward_1"])


def sample_pool(model: Path, pairs_per_prompt: int, sampler: SamplerSettings, seed: int, reporter: Reporter,
                cache: Path | None = None) -> PreferencePool:
    """Two samples of the base model per (training prompt, pair), seeds DATA_SEED_BASE + …, scored."""
    kind = world_kind(model)
    key = {"model": str(Path(model).resolve()), "fingerprint": files_sha256(Path(model) / kind.denoiser_folder),
           "pairs": pairs_per_prompt,
           "sampler": asdict(sampler), "seed": seed, "prompts": list(world.TRAIN_PROMPTS)}
    if cache is not None and (pool := PreferencePool.load(cache, key)) is not None:
        reporter.line(f"preference samples: reusing {cache}")
        return pool
    prompts = [p for p in world.TRAIN_PROMPTS for _ in range(pairs_per_prompt)]
    first = DATA_SEED_BASE + seed * 100_000
    seeds_0 = first + 2 * np.arange(len(prompts))
    seeds_1 = seeds_0 + 1
    pipe = kind.load_pipeline(model)
    with reporter.progress("sampling preference pairs", 2 * len(prompts), unit="images") as advance:
        images_0 = world.to_uint8(kind.sample(pipe, prompts, seeds_0, sampler, advance))
        images_1 = world.to_uint8(kind.sample(pipe, prompts, seeds_1, sampler, advance))
    pool = PreferencePool(prompts, seeds_0, seeds_1, images_0, images_1,
                          world.reward(images_0, prompts), world.reward(images_1, prompts))
    if cache is not None:
        pool.save(cache, key)
    return pool


def rescored(pool: PreferencePool, reward_name: str) -> PreferencePool:
    """The same samples with the rewards of `world.REWARDS[reward_name]`."""
    score = world.REWARDS[reward_name]
    return replace(pool, reward_0=score(pool.images_0, pool.prompts), reward_1=score(pool.images_1, pool.prompts))


def write_dataset(pool: PreferencePool, path: Path, labeling: str, seed: int = 0) -> dict[str, Any]:
    """The pool as a Pick-a-Pic parquet labelled by `labeling`; returns a short description."""
    labels = world.preference_labels(pool.reward_0, pool.reward_1, labeling, seed)
    world.write_preference_parquet(path, pool.prompts, pool.images_0, pool.images_1, labels)
    truth = world.preference_labels(pool.reward_0, pool.reward_1, "reward")
    return {"path": str(path), "pairs": len(labels), "labeling": labeling,
            "agreement_with_reward": float(np.mean(labels == truth)),
            "mean_reward_gap": float(np.mean(np.abs(pool.reward_0 - pool.reward_1)))}


# ------------------------------------------------------------------------------ aligned models
def run_unet(run_dir: Path | str, step: int | None = None) -> Any:
    """The trained denoiser of an `inpo train` run (`unet/` or `transformer/`), or the one in its
    checkpoint at `step`."""
    import diffusers
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    folder = next((name for name in ("unet", "transformer") if (run_dir / name / "config.json").exists()), None)
    if folder is None:
        raise UserError(f"{run_dir} holds no trained unet/ or transformer/ (a LoRA run? export it with --export-pipeline)")
    class_name = json.loads((run_dir / folder / "config.json").read_text())["_class_name"]
    unet = getattr(diffusers, class_name).from_pretrained(str(run_dir / folder))
    if step is not None:
        checkpoint = run_dir / "checkpoints" / f"step-{step:07d}" / "model.safetensors"
        if not checkpoint.exists():
            raise UserError(f"{run_dir} has no checkpoint at step {step} ({checkpoint} is missing)")
        unet.load_state_dict(load_file(str(checkpoint)))
    return unet.eval()


@dataclass
class Evaluation:
    """Rewards of base and each aligned model on the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    base: np.ndarray
    base_images: np.ndarray
    aligned: dict[str, np.ndarray] = field(default_factory=dict)
    aligned_images: dict[str, np.ndarray] = field(default_factory=dict)

    def comparisons(self) -> dict[str, world.Comparison]:
        return {name: world.compare(self.base, rewards, self.prompts) for name, rewards in self.aligned.items()}


def evaluation_set(eval_seeds: int) -> tuple[list[str], list[int]]:
    """Held-out prompts × seeds 0..eval_seeds−1."""
    prompts = [p for p in world.HELD_OUT_PROMPTS for _ in range(eval_seeds)]
    return prompts, [s for _ in world.HELD_OUT_PROMPTS for s in range(eval_seeds)]


def evaluate(model: Path, unets: dict[str, Any], eval_seeds: int, sampler: SamplerSettings,
             reporter: Reporter) -> Evaluation:
    """Sample base and each aligned UNet on held-out prompts with the same seeds; score all."""
    prompts, seeds = evaluation_set(eval_seeds)
    kind = world_kind(model)
    pipe = kind.load_pipeline(model)
    base_unet = getattr(pipe, kind.denoiser_folder)
    total = len(prompts) * (1 + len(unets))
    with reporter.progress("sampling base and aligned", total, unit="images") as advance:
        base_images = world.to_uint8(kind.sample(pipe, prompts, seeds, sampler, advance))
        result = Evaluation(prompts, seeds, world.reward(base_images, prompts), base_images)
        for name, unet in unets.items():
            setattr(pipe, kind.denoiser_folder, unet)
            images = world.to_uint8(kind.sample(pipe, prompts, seeds, sampler, advance))
            result.aligned[name] = world.reward(images, prompts)
            result.aligned_images[name] = images
    setattr(pipe, kind.denoiser_folder, base_unet)
    return result


# ------------------------------------------------------------------------------ the demo
@dataclass
class DemoOptions:
    """The options of `inpo demo`; the training defaults are the ones the sweep in docs/proof.md picked."""

    out: str = "demo-output"
    world: str | None = None
    rebuild_world: bool = False
    pairs_per_prompt: int = 50
    eval_seeds: int = 40
    controls: bool = True
    # the rewards labelling the data (world.REWARDS); each gets its own data, stores and runs
    rewards: str = "colour,brightness"
    labels: str = "reward,shuffled,reversed"  # "reward" alone when controls is False
    beta: float | None = None  # the world family's default β (objectives.default_beta): 2000 SD1.5
    lr: float = 3e-5
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    warmup: int = 10
    prompt_dropout: float | None = None  # the store's default (recipes.train_prompt_dropout_default)
    recipe: str = DEFAULT_RECIPE
    timesteps_per_pair: int = 2
    inversion_steps: int = 10
    sample_steps: int = 20
    guidance: float | None = None  # the world's: 3.0 (SD1.5 world), 4.0 (flow world)
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.pairs_per_prompt >= 2, "--pairs-per-prompt must be at least 2"),
            (self.eval_seeds >= 1, "--eval-seeds must be at least 1"),
            (self.sample_steps >= 1, "--sample-steps must be at least 1"),
            (self.guidance is None or self.guidance >= 1, "--guidance must be >= 1"),
            (bool(self.reward_names) and all(r in world.REWARDS for r in self.reward_names),
             f"--rewards must be a comma-separated list of {', '.join(world.REWARDS)}"),
            (bool(self.labelings) and all(label in world.LABELINGS for label in self.labelings),
             f"--labels must be a comma-separated list of {', '.join(world.LABELINGS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def labelings(self) -> list[str]:
        names = [name.strip() for name in self.labels.split(",") if name.strip()]
        return names if self.controls else [name for name in names if name == "reward"]

    @property
    def reward_names(self) -> list[str]:
        return [name.strip() for name in self.rewards.split(",") if name.strip()]

    def sampler(self, kind: WorldKind) -> SamplerSettings:
        guidance = self.guidance if self.guidance is not None else kind.default_guidance
        return SamplerSettings(steps=self.sample_steps, guidance=guidance)


def invert_and_train(model: Path, data: Path, work: Path, options: DemoOptions, reporter: Reporter) -> Path:
    """The real stages, in process: `run_invert` into work/store.zarr, `run_train` into work/run."""
    from stages.invert import InvertOptions, run_invert
    from stages.train import TrainOptions, run_train

    store, run = work / "store.zarr", work / "run"
    run_invert(InvertOptions(
        model=str(model), data=str(data), out=str(store), recipe=options.recipe,
        timesteps_per_pair=options.timesteps_per_pair, inversion_steps=options.inversion_steps,
        batch_size=64, rows_per_shard=128, shards_per_window=4, seed=options.seed, overwrite=True,
        device="cpu",
    ), reporter)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run_train(TrainOptions(
        cache=str(store), out=str(run), beta=options.beta, lr=options.lr, steps=options.steps,
        batch_size=options.batch_size, grad_accum=options.grad_accum, warmup=options.warmup,
        prompt_dropout=options.prompt_dropout, seed=options.seed, num_workers=0,
        checkpoint_every=options.steps, keep_checkpoints=1,
    ), reporter)
    return run


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """The whole story; writes results.json, grid.png and rewards.png under options.out."""
    options.validate()
    reporter = reporter or Reporter()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)

    model = ensure_world(options.world, options.rebuild_world, reporter)
    sampler = options.sampler(world_kind(model))
    timings["world"] = time.perf_counter() - started
    mark = time.perf_counter()
    pool = sample_pool(model, options.pairs_per_prompt, sampler, options.seed, reporter,
                       cache=out / "preference-samples.npz")
    timings["preference_samples"] = time.perf_counter() - mark
    reporter.line(f"{len(pool.prompts)} pairs on {len(world.TRAIN_PROMPTS)} training prompts; "
                  f"mean reward of the base samples {np.mean([pool.reward_0, pool.reward_1]):.4f}")

    labelings = options.labelings
    count = len(options.reward_names) * len(labelings)
    # from the one measurement we have: 212 s for 3 runs (colour, true/shuffled/reversed) on 2 idle cores
    reporter.line(f"demo: {count} invert + train runs, then {count + 1} models × "
                  f"{len(world.HELD_OUT_PROMPTS) * options.eval_seeds} held-out samples; about "
                  f"{count * 212 / 3 / 60:.0f} min on 2 idle cores (3 runs took 212 s), several times that on busy "
                  f"ones — torch uses OMP_NUM_THREADS threads (set it to the free cores)")
    runs: dict[str, Path] = {}
    datasets: dict[str, Any] = {}
    for reward_name in options.reward_names:
        scored = rescored(pool, reward_name)
        for labeling in labelings:
            # the colour reward keeps the folder names of earlier demos (out/reward, out/shuffled, …)
            name = labeling if reward_name == "colour" else f"{reward_name}-{labeling}"
            mark = time.perf_counter()
            reporter.line(f"— reward: {reward_name}, labels: {labeling} —")
            data = out / "data" / f"{name}.parquet"
            datasets[name] = {"reward": reward_name, **write_dataset(scored, data, labeling, seed=options.seed)}
            runs[name] = invert_and_train(model, data, out / name, options, reporter)
            timings[f"invert_train_{name}"] = time.perf_counter() - mark

    mark = time.perf_counter()
    evaluation = evaluate(model, {name: run_unet(run) for name, run in runs.items()}, options.eval_seeds,
                          sampler, reporter)
    timings["evaluation"] = time.perf_counter() - mark
    comparisons = {}
    for name, images in evaluation.aligned_images.items():
        score = world.REWARDS[datasets[name]["reward"]]
        comparisons[name] = world.compare(score(evaluation.base_images, evaluation.prompts),
                                          score(images, evaluation.prompts), evaluation.prompts)
    colour_runs = [name for name in runs if datasets[name]["reward"] == "colour"]
    if colour_runs:
        # the grid and the plot show the colour reward (what evaluation.aligned holds)
        evaluation.aligned = {name: evaluation.aligned[name] for name in colour_runs}
        write_grid(out / "grid.png", evaluation, colour_runs[0])
        write_reward_plot(out / "rewards.png", evaluation)
    timings["total"] = time.perf_counter() - started
    results = {
        "options": asdict(options), "model": str(model), "sampler": asdict(sampler), "datasets": datasets,
        "comparisons": {name: c.as_dict() for name, c in comparisons.items()},
        "timings_seconds": timings, "grid": str(out / "grid.png"), "plot": str(out / "rewards.png"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_comparisons(reporter, comparisons, title=f"inpo demo: {evaluation.base.size} held-out samples "
                                                    f"({len(world.HELD_OUT_PROMPTS)} prompts × {options.eval_seeds} seeds)")
    reporter.line(f"grid: {out / 'grid.png'}  plot: {out / 'rewards.png'}  results: {out / 'results.json'}  "
                  f"({timings['total']:.0f} s)")
    return results


# ------------------------------------------------------------------------------ reporting
def print_comparisons(reporter: Reporter, comparisons: dict[str, world.Comparison], title: str) -> None:
    """One row per model: base → aligned mean reward, Δ and win rate with their 95% intervals (the
    p-values are in results.json: the table keeps to 80 columns)."""
    if not reporter.enabled:
        return
    from rich.table import Table

    from rich import box

    # compact enough for 80 columns and for logs: one line per model, no cell wraps
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for column in ("labels", "reward", "Δ reward [95% CI]", "win rate [95% CI]"):
        table.add_column(column, no_wrap=True)
    for name, c in comparisons.items():
        table.add_row(
            name, f"{c.base_mean:.3f}→{c.aligned_mean:.3f}",
            f"{c.difference:+.3f} [{c.difference_interval[0]:+.3f}, {c.difference_interval[1]:+.3f}]",
            f"{c.win_rate:.1%} [{100 * c.win_interval[0]:.1f}, {100 * c.win_interval[1]:.1f}]",
        )
    reporter.console.print(table)
    if comparisons:
        reporter.line(f"(n = {next(iter(comparisons.values())).n} paired samples per row; ties count half)")
        reporter.line("(intervals resample prompts with all their seeds; p-values in results.json)")


def write_grid(path: Path, evaluation: Evaluation, name: str, seeds_shown: int = 4, scale: int = 3) -> Path:
    """Rows: held-out prompts; columns: base | aligned for the same seed, `seeds_shown` seeds."""
    from PIL import Image, ImageDraw

    size, gap, label = world.IMAGE_SIZE * scale, 4, 96
    seeds = sorted(set(evaluation.seeds))[:seeds_shown]
    prompts = list(dict.fromkeys(evaluation.prompts))
    width = label + len(seeds) * (2 * size + 3 * gap)
    height = 16 + len(prompts) * (size + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    index = {(p, s): i for i, (p, s) in enumerate(zip(evaluation.prompts, evaluation.seeds))}
    for column, seed in enumerate(seeds):
        x = label + column * (2 * size + 3 * gap)
        draw.text((x, 2), f"seed {seed}: base | aligned", fill="black")
    for row, prompt in enumerate(prompts):
        y = 16 + row * (size + gap)
        draw.text((2, y + size // 2 - 6), prompt, fill="black")
        for column, seed in enumerate(seeds):
            i = index[(prompt, seed)]
            x = label + column * (2 * size + 3 * gap)
            for offset, image in ((0, evaluation.base_images[i]), (size + gap, evaluation.aligned_images[name][i])):
                tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
                canvas.paste(tile, (x + offset, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def write_reward_plot(path: Path, evaluation: Evaluation) -> Path:
    """Each sample's reward, aligned (true labels) against base, and every model's mean reward with
    its prompt-clustered 95% interval (`plots.draw_reward_comparison`)."""
    from inpo_pipeline.evaluation.plots import draw_reward_comparison

    return draw_reward_comparison(path, evaluation.base, evaluation.aligned, evaluation.prompts,
                                  scatter="reward" if "reward" in evaluation.aligned else None)

"""The research loop's experiments in the shapes world: docs/experiments.md's tables and plots.

    OMP_NUM_THREADS=2 python scripts/experiments.py --out experiments-output --docs docs \\
        --sweep flips,steps,guidance,reconstruction,rounds

Every trained setting is run as a *mirror*: for labels L, the same training (same store
settings, same seed) on L and on the reversed labels ¬L, and the headline statistic is the paired
win rate of π(L) over π(¬L) on held-out prompts × seeds (colour reward). Whatever training does to
a model regardless of its labels (the drift that took the shuffled control to 53–72% against the
base) is common to both sides and cancels. The shuffled control is run the same way, at every
setting: S = a fair coin per pair, π(S) against π(¬S). S and ¬S have the same distribution, so the
control's expected win rate is exactly 50% whatever the drift. The conventional "against the base"
numbers are reported beside, to show that drift.

Each setting has `--seeds` training seeds (and, for flipped labels, its own flip draw per seed);
intervals resample training runs and prompts with their seeds (`inpo_pipeline.evaluation.stats.compare_paired`).
Sweeps: `flips` (a fraction p of the reward labels flipped), `steps` (inversion steps n), `guidance`
(inversion guidance w), `reconstruction` (invert base samples with n steps under each timestep
mode, DDIM back, PSNR; no training), `rounds` (`inpo rounds` on the same data, and on-policy pairs
labelled by the shapes scorer, against one round of the same total steps).
Everything is cached under --out (stores by their labels and inversion settings, runs by store,
steps and seed, each run's held-out rewards), so a rerun resumes; other training settings need
another --out; `--reduced` is the small form that
`just test-slow` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inpo_pipeline.method import ddim  # noqa: E402
from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.reporting import Reporter  # noqa: E402
from inpo_pipeline.evaluation.stats import compare_paired  # noqa: E402
from stages.demo import PreferencePool, ensure_world, evaluation_set, run_unet, sample_pool  # noqa: E402

KINDS = ("labels", "mirror", "shuffled", "shuffled-mirror")
SWEEPS = ("flips", "steps", "guidance", "reconstruction", "rounds", "rounds-same-data", "rounds-on-policy")


@dataclass
class Settings:
    """What every training of the experiments shares (the defaults are docs/proof.md's, smaller data)."""

    pairs_per_prompt: int = 30
    steps: int = 80
    lr: float = 3e-5
    batch_size: int = 16
    warmup: int = 10
    eval_seeds: int = 24
    seeds: int = 3
    inversion_steps: int = 10
    inversion_guidance: float = 1.0  # the authors' recipe's w
    sample_steps: int = 20
    flips: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])
    step_counts: list[int] = field(default_factory=lambda: [3, 5, 10, 30])
    guidances: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    rounds: int = 3
    reconstruction_images: int = 48


REDUCED = Settings(pairs_per_prompt=4, steps=6, eval_seeds=2, seeds=2, flips=[0.0, 0.5], step_counts=[3, 5],
                   guidances=[0.0, 1.0], rounds=2, reconstruction_images=4, batch_size=8)


def digest(*parts: Any) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return hasher.hexdigest()[:16]


# ------------------------------------------------------------------------------ labels
def labels_for(pool: PreferencePool, kind: str, seed: int, flip: float = 0.0) -> np.ndarray:
    """label_0 per pair: reward labels with a fraction `flip` flipped (own draw per seed), a fair
    coin (shuffled), or the reversal of either (the mirror: ties stay ties)."""
    truth = world.preference_labels(pool.reward_0, pool.reward_1, "reward")
    if kind.startswith("shuffled"):
        labels = np.random.default_rng(20_000 + seed).integers(0, 2, len(truth)).astype(np.float64)
    else:
        labels = truth.copy()
        flipped = np.random.default_rng(10_000 + seed).permutation(len(truth))[: round(flip * len(truth))]
        labels[flipped] = np.where(labels[flipped] == 0.5, 0.5, 1.0 - labels[flipped])
    return np.where(labels == 0.5, 0.5, 1.0 - labels) if kind.endswith("mirror") else labels


# ------------------------------------------------------------------------------ stores, runs, rewards
class Lab:
    """The world, its preference samples, and cached stores / runs / held-out rewards under `out`."""

    def __init__(self, out: Path, settings: Settings, reporter: Reporter) -> None:
        self.out, self.settings, self.reporter = out, settings, reporter
        out.mkdir(parents=True, exist_ok=True)
        self.model = ensure_world(None, False, reporter)
        self.sampler = world.SamplerSettings(settings.sample_steps, 3.0)
        self.pool = sample_pool(self.model, settings.pairs_per_prompt, self.sampler, 0, reporter,
                                cache=out / "preference-samples.npz")
        self.prompts, self.eval_seeds = evaluation_set(settings.eval_seeds)
        self.stage_one: dict[str, dict[str, Any]] = {}

    def invert_options(self, **overrides: Any) -> dict[str, Any]:
        return {"recipe": "authors", "inversion_steps": self.settings.inversion_steps,
                "inversion_guidance": self.settings.inversion_guidance, "timesteps_per_pair": 2, **overrides}

    def dataset(self, labels: np.ndarray) -> Path:
        path = self.out / "data" / f"{digest(labels)}.parquet"
        if not path.exists():
            temporary = path.with_suffix(".tmp.parquet")
            world.write_preference_parquet(temporary, self.pool.prompts, self.pool.images_0, self.pool.images_1, labels)
            os.replace(temporary, path)
        return path

    def store(self, labels: np.ndarray, invert: dict[str, Any]) -> Path:
        from stages.invert import InvertOptions, run_invert

        key = digest(labels, invert)
        store = self.out / "stores" / f"{key}.zarr"
        record = store.with_suffix(".json")
        if not record.exists():
            started = time.perf_counter()
            summary = run_invert(InvertOptions(model=str(self.model), data=str(self.dataset(labels)), out=str(store),
                                               batch_size=64, rows_per_shard=128, shards_per_window=4, seed=0,
                                               device="cpu", objectives="inpo", **invert), self.reporter)
            record.write_text(json.dumps({
                "seconds": time.perf_counter() - started, "rows": summary["rows_valid"],
                "unet_calls_per_row": summary["unet_row_evaluations"] / max(summary["rows_valid"], 1),
                "invert": invert}))
        return store

    def run(self, labels: np.ndarray, invert: dict[str, Any], seed: int, steps: int | None = None) -> Path:
        from stages.train import TrainOptions, run_train

        steps = steps or self.settings.steps
        store = self.store(labels, invert)
        run = self.out / "runs" / f"{store.stem}-{steps}-seed{seed}"
        record = run / "run.json"
        if not (record.exists() and json.loads(record.read_text()).get("status") == "finished"):
            shutil.rmtree(run, ignore_errors=True)
            run_train(TrainOptions(cache=str(store), out=str(run), lr=self.settings.lr, steps=steps,
                                   batch_size=self.settings.batch_size, grad_accum=1, warmup=self.settings.warmup,
                                   seed=seed, num_workers=0, checkpoint_every=steps, keep_checkpoints=1), self.reporter)
        return run

    def rewards(self, model_folder: Path | None, unet_of_run: Path | None = None) -> np.ndarray:
        """Held-out colour rewards (prompts × seeds, flattened) of the base, a run's UNet or a pipeline."""
        target = unet_of_run or model_folder
        cache = (target / "held-out-rewards.npy") if target is not None else self.out / "base-held-out-rewards.npy"
        key = cache.with_suffix(".json")
        identity = {"eval_seeds": self.settings.eval_seeds, "sample_steps": self.settings.sample_steps}
        if cache.exists() and key.exists() and json.loads(key.read_text()) == identity:
            return np.load(cache)
        pipe = world.load_pipeline(model_folder or self.model)
        if unet_of_run is not None:
            pipe.unet = run_unet(unet_of_run)
        images = world.to_uint8(world.sample(pipe, self.prompts, self.eval_seeds, self.sampler))
        values = world.reward(images, self.prompts)
        np.save(cache, values)
        key.write_text(json.dumps(identity))
        return values

    def run_rewards(self, run: Path) -> np.ndarray:
        return self.rewards(None, unet_of_run=run)


# ------------------------------------------------------------------------------ statistics
def summary(first: list[np.ndarray], second: list[np.ndarray] | np.ndarray, prompts: list[str]) -> dict[str, Any]:
    """first[s] − second[s] (or − second, one array) over training runs s, clustered by prompt."""
    differences = np.stack([a - (second[i] if isinstance(second, list) else second) for i, a in enumerate(first)])
    result = compare_paired(differences, prompts)
    rate, delta = result.win_rate, result.mean_difference
    return {"win_rate": rate.estimate, "win_interval": [rate.low, rate.high], "win_p_value": rate.p_value,
            "delta": delta.estimate, "delta_interval": [delta.low, delta.high], "delta_p_value": delta.p_value,
            "runs": int(differences.shape[0]), "samples": int(differences.shape[1]),
            "win_rate_per_run": [float(np.mean(np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)))) for d in differences]}


def mirror_setting(lab: Lab, name: str, invert: dict[str, Any], flip: float = 0.0,
                   control: bool = True) -> dict[str, Any]:
    """One setting: π(L) vs π(¬L) and π(S) vs π(¬S) over the training seeds, plus each against the base."""
    base = lab.rewards(None)
    rewards: dict[str, list[np.ndarray]] = {}
    kinds = KINDS if control else KINDS[:2]
    for kind in kinds:
        rewards[kind] = []
        for seed in range(lab.settings.seeds):
            started = time.perf_counter()
            run = lab.run(labels_for(lab.pool, kind, seed, flip), invert, seed)
            rewards[kind].append(lab.run_rewards(run))
            lab.reporter.line(f"{name}: {kind} seed {seed} done ({time.perf_counter() - started:.0f} s)")
    result = {"setting": name, "invert": invert, "flip": flip,
              "mirror": summary(rewards["labels"], rewards["mirror"], lab.prompts),
              "labels_vs_base": summary(rewards["labels"], base, lab.prompts)}
    if control:
        result["control_mirror"] = summary(rewards["shuffled"], rewards["shuffled-mirror"], lab.prompts)
        result["control_vs_base"] = summary(rewards["shuffled"], base, lab.prompts)
    stores = {json.dumps(lab.invert_options()), json.dumps(invert)}
    result["stage_one"] = [json.loads(p.read_text()) for p in (lab.out / "stores").glob("*.json")
                           if json.dumps(json.loads(p.read_text())["invert"]) in stores]
    return result


# ------------------------------------------------------------------------------ reconstruction
@torch.no_grad()
def reconstruction_psnr(lab: Lab, steps: int, mode: str, guidance: float, count: int,
                        timesteps: tuple[int, ...] = (249, 499, 749, 999)) -> dict[str, float]:
    """Invert `count` base samples to each t with `steps` DDIM steps (`mode`, guidance w), walk the
    same steps back down with the DDIM sampler (η = 0), decode, PSNR in dB against the sample."""
    pipe = world.load_pipeline(lab.model)
    unet, vae = pipe.unet, pipe.vae
    alphas = pipe.scheduler.alphas_cumprod
    alpha_list = alphas.double().tolist()
    images = lab.pool.images_0[:count]
    prompts = lab.pool.prompts[:count]
    latent_0 = world.encode_latents(vae, images.astype(np.float32) / 255.0) * vae.config.scaling_factor
    cond = world.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    uncond = world.encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * count)

    def noise(latent: torch.Tensor, label: int) -> torch.Tensor:
        label_tensor = torch.full((count,), label, dtype=torch.long)
        eps_uncond = unet(latent, label_tensor, encoder_hidden_states=uncond).sample if guidance != 1.0 else None
        eps_cond = unet(latent, label_tensor, encoder_hidden_states=cond).sample if guidance != 0.0 else None
        return ddim.guided_noise(eps_uncond, eps_cond, guidance)

    results: dict[str, float] = {}
    for t in timesteps:
        walk = ddim.inversion_steps(t, mode, steps, alphas, dict(pipe.scheduler.config))
        latent = latent_0.clone()
        for step in walk:
            latent = ddim.inversion_step(latent, noise(latent, max(step.label, 0)),
                                         torch.tensor(step.alpha_bar_from), torch.tensor(step.alpha_bar_to))
        for step in reversed(walk):
            upper = alpha_list.index(step.alpha_bar_to)  # the sampler calls the UNet at the level it leaves
            latent = ddim.inversion_step(latent, noise(latent, upper),
                                         torch.tensor(step.alpha_bar_to), torch.tensor(step.alpha_bar_from))
        decoded = vae.decode(latent / vae.config.scaling_factor).sample
        back = world.to_uint8(((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
        mse = ((back.astype(np.float64) - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        results[str(t)] = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    # the VAE alone (encode, decode): the ceiling any inversion can reach
    decoded = vae.decode(latent_0 / vae.config.scaling_factor).sample
    back = world.to_uint8(((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    mse = ((back.astype(np.float64) - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    results["vae_only"] = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    results["mean"] = float(np.mean([results[str(t)] for t in timesteps]))
    return results


# ------------------------------------------------------------------------------ rounds
def rounds_setting(lab: Lab, on_policy: bool) -> dict[str, Any]:
    """Rounds 1..R of `inpo rounds` (mirror and shuffled control), each round's policy against the
    other chain's same round; and one round of R× the steps, the same total, on round 1's data."""
    from stages.rounds import RoundsOptions, run_rounds

    settings = lab.settings
    invert = {**lab.invert_options(), "batch_size": 64, "rows_per_shard": 128, "shards_per_window": 4,
              "objectives": "inpo"}
    train = {"lr": settings.lr, "steps": settings.steps, "batch_size": settings.batch_size, "grad_accum": 1,
             "warmup": settings.warmup, "num_workers": 0, "checkpoint_every": settings.steps, "keep_checkpoints": 1}
    # each prompt once, 2 × pairs_per_prompt seeds: `inpo label` pairs seeds (0, 1), (2, 3), … into
    # pairs_per_prompt distinct pairs per prompt (a prompt listed twice would draw the same images)
    prompts_file = lab.out / "train-prompts-once.txt"
    prompts_file.write_text("\n".join(world.TRAIN_PROMPTS) + "\n")
    per_round: dict[str, list[list[np.ndarray]]] = {kind: [[] for _ in range(settings.rounds)] for kind in KINDS}
    long_runs: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    scorer_of = {"labels": "colour", "mirror": "-colour", "shuffled": "random", "shuffled-mirror": "-random"}
    for kind in KINDS:
        for seed in range(settings.seeds):
            chain_dir = lab.out / ("rounds-on-policy" if on_policy else "rounds-same-data") / f"{kind}-seed{seed}"
            if on_policy:
                options = RoundsOptions(model=str(lab.model), out=str(chain_dir), rounds=settings.rounds,
                                        prompts=str(prompts_file), scorer="shapes",
                                        scorer_model=f"{scorer_of[kind]}@{seed}" if "random" in scorer_of[kind]
                                        else scorer_of[kind], sample_seeds=2 * settings.pairs_per_prompt,
                                        sample_steps=settings.sample_steps, sample_guidance=3.0, seed=seed,
                                        invert=invert, train=train, device="cpu")
            else:
                data = lab.dataset(labels_for(lab.pool, kind, seed))
                options = RoundsOptions(model=str(lab.model), out=str(chain_dir), rounds=settings.rounds,
                                        data=str(data), seed=seed, invert=invert, train=train, device="cpu")
            chain = run_rounds(options, lab.reporter)
            for index, entry in enumerate(chain["rounds"][: settings.rounds]):
                per_round[kind][index].append(lab.rewards(chain_dir / entry["pipeline"]))
            if not on_policy:
                long_run = lab.run(labels_for(lab.pool, kind, seed), lab.invert_options(), seed,
                                   steps=settings.steps * settings.rounds)
                long_runs[kind].append(lab.run_rewards(long_run))
    rows = []
    for index in range(settings.rounds):
        rows.append({"round": index + 1,
                     "mirror": summary(per_round["labels"][index], per_round["mirror"][index], lab.prompts),
                     "control_mirror": summary(per_round["shuffled"][index], per_round["shuffled-mirror"][index],
                                               lab.prompts)})
    result: dict[str, Any] = {"on_policy": on_policy, "rounds": rows}
    if not on_policy:
        result["one_round_same_steps"] = {
            "steps": settings.steps * settings.rounds,
            "mirror": summary(long_runs["labels"], long_runs["mirror"], lab.prompts),
            "control_mirror": summary(long_runs["shuffled"], long_runs["shuffled-mirror"], lab.prompts)}
    return result


# ------------------------------------------------------------------------------ report
def cell(entry: dict[str, Any]) -> str:
    low, high = entry["win_interval"]
    return f"{entry['win_rate']:.1%} [{low:.1%}, {high:.1%}], p {entry['win_p_value']:.2g}"


def delta_cell(entry: dict[str, Any]) -> str:
    low, high = entry["delta_interval"]
    return f"{entry['delta']:+.4f} [{low:+.4f}, {high:+.4f}]"


def plot_settings(path: Path, title: str, xlabel: str, xs: list[float], rows: list[dict[str, Any]],
                  extra: dict[str, list[float]] | None = None) -> None:
    """Mirror and control win rates with their 95% intervals against the setting (and 50%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for key, label, colour in (("mirror", "π(L) vs π(¬L)", "tab:blue"), ("control_mirror", "π(S) vs π(¬S) (control)", "tab:grey"),
                               ("labels_vs_base", "π(L) vs base", "tab:green"), ("control_vs_base", "π(S) vs base", "tab:orange")):
        present = [(x, row[key]) for x, row in zip(xs, rows) if key in row]
        if not present:
            continue
        values = np.array([entry["win_rate"] for _, entry in present])
        lows = np.array([entry["win_interval"][0] for _, entry in present])
        highs = np.array([entry["win_interval"][1] for _, entry in present])
        axis.errorbar([x for x, _ in present], values, yerr=[values - lows, highs - values], label=label,
                      color=colour, marker="o", capsize=3, linestyle="-" if "mirror" in key else ":")
    axis.axhline(0.5, color="black", linewidth=0.8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("paired win rate (colour reward)")
    axis.set_title(title)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, loc="lower left")
    if extra:
        twin = axis.twinx()
        for label, values in extra.items():
            twin.plot(xs, values, color="tab:red", marker="s", linestyle="--", label=label)
        twin.set_ylabel(", ".join(extra))
        twin.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def setting_table(rows: list[dict[str, Any]], first: str, values: list[str]) -> list[str]:
    lines = [f"| {first} | π(L) vs π(¬L) (headline) | Δ reward | control π(S) vs π(¬S) | π(L) vs base | π(S) vs base | stage one s | UNet calls / row |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for value, row in zip(values, rows):
        stage = [s for s in row["stage_one"] if s["invert"] == row["invert"]]
        seconds = f"{np.mean([s['seconds'] for s in stage]):.1f}" if stage else "–"
        calls = f"{stage[0]['unet_calls_per_row']:.1f}" if stage else "–"
        lines.append(f"| {value} | {cell(row['mirror'])} | {delta_cell(row['mirror'])} | "
                     f"{cell(row['control_mirror']) if 'control_mirror' in row else '–'} | {cell(row['labels_vs_base'])} | "
                     f"{cell(row['control_vs_base']) if 'control_vs_base' in row else '–'} | {seconds} | {calls} |")
    return lines



GENERATED = "<!-- generated: {name} (scripts/experiments.py; do not edit by hand) -->"
END = "<!-- end: {name} -->"


def fill_block(text: str, name: str, lines: list[str]) -> str:
    """Replace the generated block `name` of a markdown page (appended when it has none)."""
    start, end = GENERATED.format(name=name), END.format(name=name)
    block = "\n".join([start, *lines, end])
    if start in text and end in text:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_report(results: dict[str, Any], docs: Path, command: str) -> Path:
    """Tables and plots of every finished sweep into DOCS/experiments.md's generated blocks."""
    page = docs / "experiments.md"
    figures = docs / "experiments"
    text = page.read_text() if page.exists() else "# Experiments\n"
    text = fill_block(text, "command", ["```", command, "```",
                                        f"Settings: `{json.dumps(results['settings'])}`; OMP_NUM_THREADS="
                                        f"{results.get('omp_num_threads')}."])
    for sweep, first, label in (("flips", "labels flipped p", "fraction of labels flipped"),
                                ("steps", "inversion steps n", "inversion steps n"),
                                ("guidance", "inversion guidance w", "inversion guidance w")):
        if sweep not in results:
            continue
        values, rows = results[sweep]["values"], results[sweep]["rows"]
        plot_settings(figures / f"{sweep}.png", f"{sweep}: mirror and control ({results['settings']['seeds']} seeds)",
                      label, [float(v) for v in values], rows)
        text = fill_block(text, sweep, [*setting_table(rows, first, [str(v) for v in values]), "",
                                        f"![{sweep}](experiments/{sweep}.png)"])
    if "reconstruction" in results:
        rows = results["reconstruction"]
        times = [k for k in rows[0] if k.isdigit()]
        lines = ["| mode | n | w | " + " | ".join(f"PSNR t={t} (dB)" for t in times) + " | mean | VAE alone |",
                 "| --- | --- | --- | " + " | ".join("---" for _ in times) + " | --- | --- |"]
        for row in rows:
            lines.append(f"| {row['mode']} | {row['n']} | {row['w']:g} | " + " | ".join(f"{row[t]:.2f}" for t in times)
                         + f" | {row['mean']:.2f} | {row['vae_only']:.2f} |")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.4))
        for mode in dict.fromkeys(r["mode"] for r in rows):
            for w in dict.fromkeys(r["w"] for r in rows):
                part = [r for r in rows if r["mode"] == mode and r["w"] == w]
                axis.plot([r["n"] for r in part], [r["mean"] for r in part], marker="o", label=f"{mode}, w={w:g}")
        axis.axhline(rows[0]["vae_only"], color="black", linewidth=0.8, linestyle=":", label="VAE alone")
        axis.set_xscale("log")
        axis.set_xlabel("inversion steps n")
        axis.set_ylabel("PSNR after invert + DDIM back (dB)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figures.mkdir(parents=True, exist_ok=True)
        figure.savefig(figures / "reconstruction.png", dpi=110)
        plt.close(figure)
        if "steps" in results:
            by_n = {int(v): row["mirror"]["win_rate"] for v, row in zip(results["steps"]["values"], results["steps"]["rows"])}
            part = [r for r in rows if r["mode"] == "authors" and r["w"] == 1.0 and r["n"] in by_n]
            if len(part) >= 3:
                correlation = float(np.corrcoef([r["mean"] for r in part], [by_n[r["n"]] for r in part])[0, 1])
                lines += ["", f"Correlation over n of the authors-mode, w=1 mean PSNR with the mirror win rate "
                              f"of the steps sweep: {correlation:+.2f} ({len(part)} points)."]
        text = fill_block(text, "reconstruction", [*lines, "", "![reconstruction](experiments/reconstruction.png)"])
    for key, title in (("rounds_same_data", "rounds, same data"), ("rounds_on_policy", "rounds, on-policy")):
        if key not in results:
            continue
        entry = results[key]
        lines = ["| round | π(L) vs π(¬L) (headline) | Δ reward | control π(S) vs π(¬S) |", "| --- | --- | --- | --- |"]
        for row in entry["rounds"]:
            lines.append(f"| {row['round']} | {cell(row['mirror'])} | {delta_cell(row['mirror'])} | {cell(row['control_mirror'])} |")
        if "one_round_same_steps" in entry:
            single = entry["one_round_same_steps"]
            lines.append(f"| one round, {single['steps']} steps | {cell(single['mirror'])} | {delta_cell(single['mirror'])} | "
                         f"{cell(single['control_mirror'])} |")
        rows = entry["rounds"]
        plot_settings(figures / f"{key}.png", title, "round", [float(r["round"]) for r in rows], rows)
        text = fill_block(text, key, [*lines, "", f"![{key}](experiments/{key}.png)"])
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments-output"))
    parser.add_argument("--sweep", default=",".join(SWEEPS), help=f"comma-separated: {', '.join(SWEEPS)}")
    parser.add_argument("--docs", type=Path, default=None, help="also write DOCS/experiments.md and DOCS/experiments/*.png")
    parser.add_argument("--reduced", action="store_true", help="the small form (test-slow): 2 seeds, tiny data")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per setting (default 3)")
    parser.add_argument("--report-only", action="store_true", help="write --docs from --out/results.json, run nothing")
    arguments = parser.parse_args()
    if arguments.report_only:
        if arguments.docs is None:
            raise SystemExit("error: --report-only needs --docs")
        recorded = json.loads((arguments.out / "results.json").read_text())
        page = write_report(recorded, arguments.docs, recorded.get("command", "python scripts/experiments.py"))
        print(f"wrote {page}")
        return
    sweeps = [s for s in arguments.sweep.split(",") if s]
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise SystemExit(f"error: --sweep {unknown} not in {list(SWEEPS)}")
    settings = REDUCED if arguments.reduced else Settings()
    if arguments.seeds is not None:
        settings.seeds = arguments.seeds
    reporter = Reporter()
    started = time.perf_counter()
    lab = Lab(arguments.out, settings, reporter)
    results_path = arguments.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = settings.__dict__
    results["command"] = ("OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS")) + " python "
                          + " ".join(["scripts/experiments.py", *sys.argv[1:]]))
    results["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2, default=float))

    if "flips" in sweeps:
        # the coin labels do not depend on p: one control serves every p (it is trained once)
        rows = [mirror_setting(lab, f"flip {p}", lab.invert_options(), flip=p) for p in settings.flips]
        results["flips"] = {"values": settings.flips, "rows": rows}
        save()
    if "steps" in sweeps:
        rows = [mirror_setting(lab, f"n {n}", lab.invert_options(inversion_steps=n)) for n in settings.step_counts]
        results["steps"] = {"values": settings.step_counts, "rows": rows}
        save()
    if "guidance" in sweeps:
        rows = [mirror_setting(lab, f"w {w}", lab.invert_options(inversion_guidance=w)) for w in settings.guidances]
        results["guidance"] = {"values": settings.guidances, "rows": rows}
        save()
    if "reconstruction" in sweeps:
        rows = []
        for mode in ddim.TIMESTEP_MODES:
            for n in settings.step_counts:
                for w in (0.0, 1.0):
                    rows.append({"mode": mode, "n": n, "w": w,
                                 **reconstruction_psnr(lab, n, mode, w, settings.reconstruction_images)})
        results["reconstruction"] = rows
        save()
    if "rounds" in sweeps or "rounds-same-data" in sweeps:
        results["rounds_same_data"] = rounds_setting(lab, on_policy=False)
        save()
    if "rounds" in sweeps or "rounds-on-policy" in sweeps:
        results["rounds_on_policy"] = rounds_setting(lab, on_policy=True)
        save()
    results["seconds_this_run"] = time.perf_counter() - started
    save()
    if arguments.docs is not None:
        write_report(results, arguments.docs, results["command"])
    reporter.line(f"results: {results_path} ({results['seconds_this_run']:.0f} s)")


if __name__ == "__main__":
    main()

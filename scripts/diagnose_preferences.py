"""Why a preference run moves the way it does: the reference's residuals, and the policy's errors.

    OMP_NUM_THREADS=2 python scripts/diagnose_preferences.py --store S.zarr [--run RUN ...] --rows 512

For a store made with `--objectives all` and a sample of its usable rows (caption, no dropout):

1. **Residual DC** (mean over the latent's pixels, per channel) of the reference at each
   objective's inputs: r = ε_ref(x, t, c) − target, with (x, target) = (x_t, τ_t) for InPO and
   (x_fwd, ε) for Diffusion-DPO. A loss that lowers e^w − e^l moves an output bias δ along
   −(r^w − r^l), which moves every x0 prediction, and so the samples, along +(r^w − r^l) (x̂0 =
   (x − √(1−ā)·(ε̂ + δ))/√ā). Projected on the pair's own preferred direction d = DC(x0^w) − DC(x0^l),
   `push` = ⟨(r^w − r^l)_DC, d⟩/‖d‖ is > 0 where that first-order move goes toward the winner and
   < 0 where it goes toward the loser; for SFT (which lowers e^w alone) it is ⟨r^w_DC, d⟩/‖d‖.
   Since r = (x0 − x̂0)·√ā/√(1−ā) for InPO's τ, a negative push means the reference's one-step x0
   prediction at the inverted x_t *overshoots* the image in the preferred direction.
2. **Errors over training**, for each `--run` (its checkpoints and final UNet): e_θ − e_ref of
   winners and losers on the same rows, at the run's own objective's inputs.

Everything is reported by timestep band. Prints JSON (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cache_schema import CacheStore  # noqa: E402
from inpo_pipeline.method import ddim  # noqa: E402
from inpo_pipeline.data.batches import denoiser_inputs, read_micro_batch  # noqa: E402
from inpo_pipeline.models.reference import load_unet, unet_noise  # noqa: E402

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def _predict(unet: torch.nn.Module, batch: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    batch = denoiser_inputs(batch)
    out = []
    with torch.no_grad():
        for start in range(0, len(batch["latents"]), size):
            part = slice(start, start + size)
            out.append(unet_noise(unet, batch["latents"][part], batch["timesteps"][part], batch["text"][part],
                                  None if batch.get("pooled") is None else batch["pooled"][part],
                                  None if batch.get("time_ids") is None else batch["time_ids"][part]).float())
    return torch.cat(out)


def _bands(timesteps: np.ndarray, values: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for low, high in BANDS:
        pick = (timesteps >= low) & (timesteps < high)
        if not pick.any():
            continue
        entry = {"t": f"[{low}, {high})", "rows": int(pick.sum())}
        for name, value in values.items():
            entry[name] = float(np.mean(value[pick]))
        rows.append(entry)
    pick = np.ones(len(timesteps), dtype=bool)
    rows.append({"t": "all", "rows": int(pick.sum()), **{name: float(np.mean(v)) for name, v in values.items()}})
    return rows


def residual_dc(store: CacheStore, rows: np.ndarray, reference: torch.nn.Module) -> dict:
    pairs = len(rows)
    no_drop = np.zeros(pairs, dtype=bool)
    clean = store.read_rows(rows, inputs="forward")
    preferred = (clean.clean_chosen.mean(axis=(2, 3)) - clean.clean_rejected.mean(axis=(2, 3)))  # (B, C)
    norm = np.linalg.norm(preferred, axis=1) + 1e-12
    timesteps = clean.timestep.astype(np.int64)
    report = {}
    for objective in ("inpo", "diffusion-dpo"):
        batch = read_micro_batch(store, rows, no_drop, objective)
        residual = (_predict(reference, batch) - denoiser_inputs(batch)["targets"]).numpy()
        dc = residual.mean(axis=(2, 3))
        chosen, rejected = dc[:pairs], dc[pairs:]
        pairwise_push = ((chosen - rejected) * preferred).sum(1) / norm
        winner_push = (chosen * preferred).sum(1) / norm
        errors = (residual ** 2).mean(axis=(1, 2, 3))
        dc_share = (dc ** 2).mean(1) / np.maximum((residual ** 2).mean(axis=(1, 2, 3)), 1e-12)
        report[objective] = _bands(timesteps, {
            "push": pairwise_push, "push_positive_share": (pairwise_push > 0).astype(float),
            "sft_push": winner_push, "sft_push_positive_share": (winner_push > 0).astype(float),
            "dc_share_of_error": dc_share[:pairs], "reference_error_chosen": errors[:pairs],
            "reference_error_rejected": errors[pairs:],
        })
    return report


def errors_over_training(store: CacheStore, rows: np.ndarray, run: Path, reference_batches: dict) -> dict:
    from stages.demo import run_unet

    record = json.loads((run / "run.json").read_text())
    objective = record["options"]["objective"]
    pairs = len(rows)
    batch = reference_batches.setdefault(objective, read_micro_batch(store, rows, np.zeros(pairs, dtype=bool), objective))
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
    timesteps = batch["timesteps"][:pairs].numpy()
    out = []
    for step in steps:
        unet = run_unet(run, step)
        errors = ddim.per_sample_mse(_predict(unet, batch), denoiser_inputs(batch)["targets"]).numpy()
        chosen = errors[:pairs] - batch["reference_error_chosen"].numpy()
        entry = {"step": step, "bands": _bands(timesteps, {"winner_excess": chosen} if len(errors) == pairs else {
            "winner_excess": chosen, "loser_excess": errors[pairs:] - batch["reference_error_rejected"].numpy()})}
        out.append(entry)
    return {"run": str(run), "objective": objective, "checkpoints": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", default=[])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    store = CacheStore.open(arguments.store)
    usable = store.valid_rows()
    rows = np.sort(np.random.default_rng(0).choice(usable, min(arguments.rows, len(usable)), replace=False))
    reference = load_unet(store.settings["model"], store.settings.get("unet"))
    report = {"store": str(arguments.store), "rows": len(rows), "residual_dc": residual_dc(store, rows, reference)}
    batches: dict = {}
    report["runs"] = [errors_over_training(store, rows, run, batches) for run in arguments.run]
    text = json.dumps(report, indent=1)
    if arguments.out:
        arguments.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

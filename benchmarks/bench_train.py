"""Stage-two benchmark: time per pair of four training steps on the same UNet and batch.

    python benchmarks/bench_train.py --shape small --batch-size 2               # CPU
    python benchmarks/bench_train.py --shape sd15 --batch-size 8 --device cuda --bf16

(a) cached:  the step of `inpo train` — a micro-batch from the store through the real data loader
             (spawned workers), policy forward + backward, InPO loss, optimizer step every
             `--grad-accum` micro-batches (amortised);
(b) online:  the authors' step, composed from this project's functions — text encoding, VAE
             encode, the released inversion (departures below t, DESIGN §1.5) with the reference UNet, the
             reference forward, policy forward + backward, optimizer step as in (a);
(c) DPO:     a Diffusion-DPO step — text encoding, VAE encode, forward noising with fresh noise,
             reference forward, policy forward + backward, optimizer step as in (a);
(d) floor:   policy forward + backward alone on (a)'s tensors, already on the device;
(e) cached Diffusion-DPO and (f) cached SFT: (a) with `--objective diffusion-dpo|sft` — the same
             loader reading the store's forward-noised inputs (DESIGN §1.7), the same update.
Images are decoded and resized before timing, which favours (b) and (c) (their loaders decode).
Also: the data loader's micro-batches/s alone, against (a)'s consumption.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import SHAPES, build_shaped_pipeline, dump, machine  # noqa: E402
from cache_schema import CacheStore  # noqa: E402
from inpo_pipeline.method import ddim  # noqa: E402
from inpo_pipeline.data.batches import BatchSchedule, MicroBatches, denoiser_inputs, micro_batch_loader  # noqa: E402
from inpo_pipeline.data.sources import open_source, prepare_image  # noqa: E402
from inpo_pipeline.worlds.example import write_pickapic_parquet  # noqa: E402
from inpo_pipeline.method.loss import inpo_loss  # noqa: E402
from inpo_pipeline.models.reference import load_reference, unet_noise  # noqa: E402
from inpo_pipeline.method.processes import process_from_settings  # noqa: E402
from inpo_pipeline.method.objectives import OBJECTIVES  # noqa: E402
from inpo_pipeline.models.policy import load_policy, policy_errors  # noqa: E402
from inpo_pipeline.reporting import Reporter  # noqa: E402
from stages.invert import InvertOptions, run_invert  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RoundRobin:
    """Times several step functions in interleaved rounds; reports each one's median."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: dict[str, list[float]] = {}
        self.counters: dict[str, int] = {}

    def run(self, name: str, step, iterations: int) -> None:
        start_index = self.counters.get(name, 0)
        synchronize(self.device)
        started = time.perf_counter()
        for index in range(start_index, start_index + iterations):
            step(index)
        synchronize(self.device)
        self.counters[name] = start_index + iterations
        self.samples.setdefault(name, []).append((time.perf_counter() - started) / iterations)

    def median(self, name: str) -> float:
        return float(np.median(self.samples[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "small", "sd15"], default="small")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4, help="micro-batches per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (policy) and bf16 frozen models")
    parser.add_argument("--work", type=Path, default=Path(".devbench"))
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    frozen_dtype = torch.bfloat16 if arguments.bf16 else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if arguments.bf16 else contextlib.nullcontext
    resolution = SHAPES[arguments.shape]["resolution"] if arguments.shape in SHAPES else 64
    batch = arguments.batch_size

    # ---- a store for (a), made by the real stage one
    model = build_shaped_pipeline(arguments.work / f"model-{arguments.shape}", arguments.shape)
    data = arguments.work / f"train-pairs-{arguments.pairs}.parquet"
    if not data.exists():
        write_pickapic_parquet(data, num_pairs=arguments.pairs, seed=1, ties=0, broken=0, row_group_size=64)
    store_path = arguments.work / f"train-store-{arguments.shape}.zarr"
    shutil.rmtree(store_path, ignore_errors=True)
    run_invert(InvertOptions(model=str(model), data=str(data), out=str(store_path), resolution=resolution,
                             batch_size=16, device=arguments.device,
                             compute_dtype="bfloat16" if arguments.bf16 else "float32"), Reporter(enabled=False))
    store = CacheStore.open(store_path)
    settings = store.settings
    schedule = BatchSchedule(store.valid_rows(), batch, 1, 0, seed=0, prompt_dropout=0.2)
    total = arguments.warmup + arguments.iterations * arguments.rounds

    # ---- the policy and its optimizer (shared by every variant; weights keep moving, as in training)
    policy = load_policy(settings, 0).to(device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-8, weight_decay=1e-2)
    beta = 2000.0

    def optimizer_tick(index: int) -> None:
        if (index + 1) % arguments.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def policy_update(latents, timesteps, text, targets, reference_chosen, reference_rejected, index):
        with autocast():
            noise = unet_noise(policy, latents, timesteps, text)
        chosen, rejected = ddim.per_sample_mse(noise, targets).chunk(2)
        loss = inpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta).loss.mean()
        (loss / arguments.grad_accum).backward()
        optimizer_tick(index)

    # ---- (a), (e), (f): the cached step of each objective through the real loader
    process = process_from_settings(settings)

    def cached_step_of(objective_name: str):
        objective = OBJECTIVES[objective_name]
        loader = iter(micro_batch_loader(MicroBatches(str(store_path), schedule, 0, 10 * total, objective_name,
                                                      process), arguments.num_workers))

        def cached_step(index: int) -> None:
            micro = next(loader)
            with autocast():
                chosen, rejected = policy_errors(policy, micro, device)
            rejected_reference = micro.get("reference_error_rejected")
            loss = objective.loss(chosen, rejected, micro["reference_error_chosen"].to(device),
                                  None if rejected_reference is None else rejected_reference.to(device),
                                  beta).loss.mean()
            (loss / arguments.grad_accum).backward()
            optimizer_tick(index)

        return cached_step


    # ---- (d) floor: forward + backward on the same kind of tensors, already on the device
    fixed = MicroBatches(str(store_path), schedule, 0, 1)[0][0]  # a read group of one micro-batch
    fixed = denoiser_inputs(fixed, device)

    def floor_step(_index: int) -> None:
        with autocast():
            noise = unet_noise(policy, fixed["latents"], fixed["timesteps"], fixed["text"])
        noise.float().pow(2).mean().backward()


    # ---- frozen models for (b) and (c): reference UNet, VAE, text encoder
    reference = load_reference(settings["model"])
    reference.unet.to(device=device, dtype=frozen_dtype)
    reference.vae.to(device)
    for encoder in reference.text.encoders:
        encoder.to(device)
    source = open_source(str(data))
    records = list(source.read(np.arange(min(arguments.pairs, 4 * batch))))
    pixels = torch.from_numpy(np.stack([prepare_image(getattr(r, side), resolution).pixels
                                        for r in records for side in ("chosen", "rejected")]))
    captions = [r.caption for r in records]
    alphas = reference.alphas_cumprod
    generator = np.random.default_rng(0)
    calls = {"inversion": 0, "images": 0}

    def online_inputs(index: int):
        pick = [(index * batch + j) % len(records) for j in range(batch)]
        images = torch.cat([pixels[[2 * p for p in pick]], pixels[[2 * p + 1 for p in pick]]]).to(device)
        with torch.no_grad():
            text, _ = reference.text.encode([captions[p] for p in pick], device)
            text = torch.cat([text, text])
            x0 = reference.encode_images(images)
        t = torch.from_numpy(generator.integers(0, 1000, size=batch)).repeat(2)
        return text, x0, t

    def online_step(index: int) -> None:
        text, x0, t = online_inputs(index)
        latents = x0.clone()
        # the released loop (DESIGN §1.5): departures d < t, UNet at label d, η·σ·z after each step
        walks = [ddim.authors_steps(int(step), 10, alphas, reference.scheduler_config) for step in t]
        with torch.no_grad():
            for position in range(max(len(w) for w in walks)):
                active = [i for i, w in enumerate(walks) if len(w) > position]
                steps = [walks[i][position] for i in active]
                alpha_from = torch.tensor([s.alpha_bar_from for s in steps], dtype=torch.float64)
                alpha_to = torch.tensor([s.alpha_bar_to for s in steps], dtype=torch.float64)
                labels = torch.tensor([s.label for s in steps], device=device)
                noise = unet_noise(reference.unet, latents[active], labels, text[active]).float()
                moved = ddim.inversion_step(latents[active], noise, alpha_from, alpha_to).float()
                sigma = ddim.jump_noise_std(alpha_from, alpha_to).float().to(device).reshape(-1, 1, 1, 1)
                latents[active] = moved + 0.1 * sigma * torch.randn_like(moved)
                calls["inversion"] += len(active)
            calls["images"] += len(walks)
            alpha_t = ddim.alpha_bar_at(alphas, t)
            target = ddim.single_step_target(latents, x0, alpha_t)
            reference_error = ddim.per_sample_mse(unet_noise(reference.unet, latents, t.to(device), text), target)
        policy_update(latents, t.to(device), text, target, *reference_error.chunk(2), index)


    def dpo_step(index: int) -> None:
        text, x0, t = online_inputs(index)
        noise = torch.randn(x0[: len(x0) // 2].shape, device=device).repeat(2, 1, 1, 1)
        alpha_t = ddim.alpha_bar_at(alphas, t).to(device).reshape(-1, 1, 1, 1)
        noisy = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise
        with torch.no_grad():
            reference_error = ddim.per_sample_mse(unet_noise(reference.unet, noisy, t.to(device), text), noise)
        policy_update(noisy.float(), t.to(device), text, noise, *reference_error.chunk(2), index)

    # ---- interleaved rounds: one warm-up round, then `--rounds` timed ones; medians
    steps = {"a_cached": cached_step_of("inpo"), "d_floor": floor_step, "b_online": online_step, "c_dpo": dpo_step,
             "e_cached_dpo": cached_step_of("diffusion-dpo"), "f_cached_sft": cached_step_of("sft")}
    timer = RoundRobin(device)
    for round_index in range(arguments.rounds + 1):
        for name, step in steps.items():
            timer.run(name, step, arguments.warmup if round_index == 0 else arguments.iterations)
            optimizer.zero_grad(set_to_none=True)
    for name in steps:
        timer.samples[name] = timer.samples[name][1:]
    seconds_cached = timer.median("a_cached")

    # ---- the loader alone
    loader_only = iter(micro_batch_loader(MicroBatches(str(store_path), schedule, 0, 40 * total), arguments.num_workers))
    timer.run("loader", lambda _i: next(loader_only), arguments.warmup)
    timer.run("loader", lambda _i: next(loader_only), 4 * arguments.iterations)
    seconds_loader = timer.samples["loader"][-1]

    per_pair = {name: timer.median(name) / batch for name in steps}
    dump({
        "benchmark": "train",
        "shape": arguments.shape, "resolution": resolution, "pairs_per_micro_batch": batch,
        "grad_accum": arguments.grad_accum, "bf16": arguments.bf16, "device": str(device),
        "iterations": arguments.iterations, "rounds": arguments.rounds, "num_workers": arguments.num_workers,
        "seconds_per_pair_all_rounds": {k: [round(x / batch, 5) for x in v] for k, v in timer.samples.items() if k != "loader"},
        "seconds_per_pair": {k: round(v, 5) for k, v in per_pair.items()},
        "pairs_per_second": {k: round(1 / v, 3) for k, v in per_pair.items()},
        "ratio_b_over_a": round(per_pair["b_online"] / per_pair["a_cached"], 3),
        "ratio_c_over_a": round(per_pair["c_dpo"] / per_pair["a_cached"], 3),
        "ratio_a_over_d": round(per_pair["a_cached"] / per_pair["d_floor"], 3),
        "ratio_e_over_a": round(per_pair["e_cached_dpo"] / per_pair["a_cached"], 3),
        "ratio_c_over_e": round(per_pair["c_dpo"] / per_pair["e_cached_dpo"], 3),
        "ratio_f_over_a": round(per_pair["f_cached_sft"] / per_pair["a_cached"], 3),
        "online_inversion_unet_calls_per_image": round(calls["inversion"] / max(calls["images"], 1), 2),
        "loader_micro_batches_per_second": round(1 / seconds_loader, 2),
        "cached_step_micro_batches_per_second": round(1 / seconds_cached, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()

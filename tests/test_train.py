"""`inpo train` through the real CLI on tiny stores: step-0 agreement, learning, LoRA, export,
checkpoints, resume after SIGKILL, DDP, and the errors a user can hit."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.data.batches import BatchSchedule
from inpo_pipeline.cli.app import app
from inpo_pipeline.worlds.example import build_tiny_sd15
from inpo_pipeline.models.reference import load_unet
from inpo_pipeline.models.policy import preference_metrics
from tests.conftest import accelerate_launch, cli_env

runner = CliRunner()
INVERT = ["--resolution", "32", "--rows-per-shard", "8", "--shards-per-window", "2", "--batch-size", "16",
          "--timesteps-per-pair", "2"]
FAST = ["--batch-size", "4", "--grad-accum", "2", "--warmup", "0", "--num-workers", "0"]


def make_store(model: Path, data: Path, out: Path) -> Path:
    result = runner.invoke(app, ["invert", "--model", str(model), "--data", str(data), "--out", str(out), *INVERT])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def sd15_store(tmp_path_factory, tiny_sd15, pickapic) -> Path:
    return make_store(tiny_sd15, pickapic["path"], tmp_path_factory.mktemp("train") / "sd15.zarr")


@pytest.fixture(scope="module")
def sdxl_store(tmp_path_factory, tiny_sdxl, pickapic) -> Path:
    return make_store(tiny_sdxl, pickapic["path"], tmp_path_factory.mktemp("train") / "sdxl.zarr")


def train(store: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--cache", str(store), "--out", str(out), *FAST, *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_step_zero_policy_equals_reference(family, empty_prompt, sd15_store, sdxl_store):
    """DESIGN §2: with policy = reference the loss is log 2 and the margin 0, on every row."""
    store = CacheStore.open(sd15_store if family == "sd15" else sdxl_store)
    settings = store.settings
    reference = load_unet(settings["model"])
    result = preference_metrics(reference, store, store.valid_rows(), beta=5000.0, empty_prompt=empty_prompt)
    assert result["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["max_abs_margin"] < 1e-2


def test_training_lowers_the_loss_and_raises_accuracy(sd15_store, tmp_path):
    run = tmp_path / "run"
    result = train(sd15_store, run, "--steps", "20", "--lr", "2e-5", "--prompt-dropout", "0.2")
    assert result.exit_code == 0, result.output
    lines = metrics(run)
    assert [line["step"] for line in lines] == list(range(1, 21))
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    store = CacheStore.open(sd15_store)
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(run / "unet")
    before = preference_metrics(load_unet(store.settings["model"]), store, store.valid_rows(), beta=2000.0)
    after = preference_metrics(trained, store, store.valid_rows(), beta=2000.0)
    print(f"store loss {before['loss']:.4f} -> {after['loss']:.4f}, "
          f"accuracy {before['implicit_accuracy']:.2f} -> {after['implicit_accuracy']:.2f}")
    assert after["loss"] < 0.6 and after["implicit_accuracy"] > 0.8
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["effective_batch"] == 8
    assert record["options"]["beta"] == 2000.0 and record["options"]["optimizer"] == "adamw"
    assert record["store"]["settings"]["unet_fingerprint"] == store.settings["unet_fingerprint"]
    assert "effective batch 8 = 4 per device × 1 process(es) × 2 accumulation" in result.output
    assert not list(run.rglob("events.out.tfevents.*"))  # trackers only with --report-to


def test_sdxl_defaults_and_export(sdxl_store, tmp_path):
    run = tmp_path / "xl"
    result = train(sdxl_store, run, "--steps", "2", "--export-pipeline")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "run.json").read_text())
    assert record["options"]["beta"] == 5000.0 and record["options"]["optimizer"] == "adafactor"
    assert record["options"]["lr"] == pytest.approx(8e-8)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(run / "pipeline")
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_lora_trains_saves_and_loads(sd15_store, tmp_path, tiny_sd15):
    run = tmp_path / "lora"
    result = train(sd15_store, run, "--steps", "3", "--lora-rank", "4", "--lr", "1e-3", "--export-pipeline")
    assert result.exit_code == 0, result.output
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    base_weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base.load_lora_weights(run / "lora")
    generator = torch.Generator().manual_seed(0)
    with_lora = base("a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images
    exported = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    generator = torch.Generator().manual_seed(0)
    fused = exported("a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images
    assert np.abs(with_lora - fused).max() < 1e-3
    changed = [k for k, v in exported.unet.state_dict().items() if not torch.equal(v, base_weights[k])]
    assert changed and all("attn" in k for k in changed)


def test_existing_run_dir_needs_resume_and_resume_checks_settings(sd15_store, tmp_path):
    run = tmp_path / "run"
    assert train(sd15_store, run, "--steps", "2").exit_code == 0
    again = train(sd15_store, run, "--steps", "2")
    assert again.exit_code == 2 and "--resume" in again.output
    other = train(sd15_store, run, "--steps", "4", "--resume", "--beta", "10")
    assert other.exit_code == 2 and "beta" in other.output
    more = train(sd15_store, run, "--steps", "4", "--resume")
    assert more.exit_code == 0, more.output
    assert [line["step"] for line in metrics(run)] == [1, 2, 3, 4]


def test_refuses_incomplete_store_other_weights_and_bad_options(sd15_store, tmp_path, pickapic):
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(sd15_store, incomplete)
    (incomplete / "done" / "shards" / "c" / "1").unlink()
    result = train(incomplete, tmp_path / "a")
    assert result.exit_code == 2 and "incomplete" in result.output

    model = build_tiny_sd15(tmp_path / "model-copy", seed=0)
    store = make_store(model, pickapic["path"], tmp_path / "copy.zarr")
    shutil.rmtree(model / "unet")
    build_tiny_sd15(tmp_path / "other", seed=3)
    shutil.copytree(tmp_path / "other" / "unet", model / "unet")
    result = train(store, tmp_path / "b")
    assert result.exit_code == 2 and "other weights" in result.output

    versioned = tmp_path / "versioned.zarr"
    shutil.copytree(sd15_store, versioned)
    meta = json.loads((versioned / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (versioned / "zarr.json").write_text(json.dumps(meta))
    result = train(versioned, tmp_path / "c")
    assert result.exit_code == 2 and "schema version 99" in result.output

    for option, value in (("--prompt-dropout", "1.5"), ("--beta", "-1"), ("--mixed-precision", "fp8")):
        result = train(sd15_store, tmp_path / "d", option, value)
        assert result.exit_code == 2 and option in result.output, result.output
    result = runner.invoke(app, ["train", "--cache", str(sd15_store), "--out", str(tmp_path / "e"),
                                 "--batch-size", "1000"])
    assert result.exit_code == 2 and "fewer than one global batch" in result.output


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(sd15_store, tmp_path, monkeypatch):
    import dataclasses

    from inpo_pipeline.method.objectives import OBJECTIVES

    real = OBJECTIVES["inpo"].loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == 7:  # micro-batch 7 = step 4 with 2 accumulation steps
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setitem(OBJECTIVES, "inpo", dataclasses.replace(OBJECTIVES["inpo"], loss=poisoned))
    run = tmp_path / "nan"
    result = train(sd15_store, run, "--steps", "6", "--checkpoint-every", "2")
    assert result.exit_code == 2 and "non-finite" in result.output and "step 4" in result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]


def test_a_run_from_before_the_data_order_option_resumes_in_its_own_row_order(sd15_store, tmp_path):
    run = tmp_path / "run"
    assert train(sd15_store, run, "--steps", "2", "--data-order", "rows", "--checkpoint-every", "2").exit_code == 0
    record = json.loads((run / "run.json").read_text())
    for name in ("data_order", "shuffle_buffer"):  # what an earlier inpo recorded
        del record["options"][name]
    (run / "run.json").write_text(json.dumps(record))
    refused = train(sd15_store, run, "--steps", "3", "--resume")
    assert refused.exit_code == 2 and "data_order" in refused.output
    resumed = train(sd15_store, run, "--steps", "3", "--resume", "--data-order", "rows")
    assert resumed.exit_code == 0, resumed.output
    assert [line["step"] for line in metrics(run)] == [1, 2, 3]


def test_schedule_covers_every_row_once_per_epoch_across_ranks():
    rows = np.arange(3, 103, dtype=np.int64)
    schedules = [BatchSchedule(rows, 4, 3, rank, seed=1, prompt_dropout=0.25) for rank in range(3)]
    per_epoch = schedules[0].micro_batches_per_epoch
    assert per_epoch == 100 // 12
    for epoch in range(2):
        seen = np.concatenate([s.micro_batch(epoch * per_epoch + m)[0] for s in schedules for m in range(per_epoch)])
        assert len(seen) == len(set(seen.tolist())) == per_epoch * 12
        assert set(seen.tolist()) <= set(rows.tolist())
    first = schedules[0].micro_batch(0)[0]
    assert not np.array_equal(first, schedules[0].micro_batch(per_epoch)[0])
    dropped = np.concatenate([schedules[0].dropped(rows, epoch) for epoch in range(40)])
    assert 0.2 < dropped.mean() < 0.3


def _train_command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "inpo_pipeline", "train", "--cache", str(store), "--out", str(out),
            "--lr", "1e-4", "--checkpoint-every", "2", *FAST, *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_sigkill_and_resume_end_with_the_same_weights(sd15_store, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_train_command(sd15_store, whole, "--steps", "8"), env=cli_env(), check=True,
                   capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(sd15_store, killed, "--steps", "8"), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (killed / "checkpoints" / "step-0000004").exists():
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "unet").exists()
    resumed = subprocess.run(_train_command(sd15_store, killed, "--steps", "8", "--resume"), env=cli_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    first, second = _weights(whole), _weights(killed)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert metrics(whole)[-1]["loss"] == metrics(killed)[-1]["loss"]


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(sd15_store, tmp_path):
    one = tmp_path / "one"
    subprocess.run(_train_command(sd15_store, one, "--steps", "3", "--batch-size", "4", "--grad-accum", "1"),
                   env=cli_env(), check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    launch = accelerate_launch(2, *_train_command(sd15_store, two, "--steps", "3", "--batch-size", "2",
                                                  "--grad-accum", "1")[3:])
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 per device × 2 process(es) × 1 accumulation" in result.stderr
    first, second = _weights(one), _weights(two)
    start = load_unet(CacheStore.open(sd15_store).settings["model"]).state_dict()
    # Adam moves every weight by ≈ lr per step whatever its gradient's size, so a weight whose
    # gradient is ≈ 0 moves by float noise's sign: compare the updates as a whole, not elementwise
    update = torch.cat([(first[k] - start[k].to(first[k].dtype)).flatten() for k in first])
    apart = torch.cat([(first[k] - second[k]).flatten() for k in first])
    relative = (apart.norm() / update.norm()).item()
    print(f"2 DDP ranks vs 1 process: |Δ weights| / |update| = {relative:.2e}, update norm {update.norm():.3e}")
    assert update.norm() > 0 and relative < 1e-2
    losses = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert np.allclose(*losses, rtol=1e-4)


def test_mixed_precision_step_zero_matches_when_the_store_used_the_same_precision(tiny_sdxl, pickapic, tmp_path):
    """e_ref computed under bf16 autocast (fp32 weights) agrees with `--mixed-precision bf16` training."""
    store = tmp_path / "bf16.zarr"
    result = runner.invoke(app, ["invert", "--model", str(tiny_sdxl), "--data", str(pickapic["path"]), "--out",
                                 str(store), "--resolution", "32", "--rows-per-shard", "8", "--batch-size", "8",
                                 "--compute-dtype", "bfloat16", "--recipe", "inpo"])
    assert result.exit_code == 0, result.output
    matched = train(store, tmp_path / "matched", "--steps", "1", "--batch-size", "8", "--grad-accum", "1",
                    "--mixed-precision", "bf16", "--prompt-dropout", "0.5")
    assert matched.exit_code == 0, matched.output
    assert "computed with compute dtype" not in matched.output  # no precision warning
    assert metrics(tmp_path / "matched")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the default precision is the store's: no flag needed for log 2
    default = train(store, tmp_path / "default", "--steps", "1", "--batch-size", "8", "--grad-accum", "1")
    assert default.exit_code == 0 and "computed with compute dtype" not in default.output
    assert json.loads((tmp_path / "default" / "run.json").read_text())["options"]["mixed_precision"] == "bf16"
    assert metrics(tmp_path / "default")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    mismatched = train(store, tmp_path / "mismatched", "--steps", "1", "--batch-size", "8", "--grad-accum", "1",
                       "--mixed-precision", "no")
    assert mismatched.exit_code == 0 and "--mixed-precision bf16 for exact agreement" in mismatched.output


def test_resume_refuses_fewer_steps_and_another_store(sd15_store, tiny_sd15, pickapic, tmp_path):
    run = tmp_path / "run"
    assert train(sd15_store, run, "--steps", "4", "--checkpoint-every", "2").exit_code == 0
    fewer = train(sd15_store, run, "--steps", "3", "--resume")
    assert fewer.exit_code == 2 and "--steps 3 is below the checkpoint's step 4" in fewer.output
    other_store = make_store(tiny_sd15, pickapic["path"], tmp_path / "other.zarr")
    moved = train(other_store, run, "--steps", "6", "--resume", "--checkpoint-every", "2")
    assert moved.exit_code == 2 and "store_created_at" in moved.output.replace("\n", "")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_store_with_a_lost_object_is_refused_in_one_line(sd15_store, tmp_path, workers):
    """A shard object deleted after the fact (a partial copy) must not train as zeros."""
    import shutil

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(sd15_store, damaged)
    (damaged / "rows" / "target_rejected" / "c" / "0" / "0" / "0" / "0").unlink()
    result = train(damaged, tmp_path / "run", "--steps", "2", "--num-workers", str(workers))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rows/target_rejected/c/0/0/0/0" in errors[0], result.output
    assert "Traceback" not in result.output
    verify = runner.invoke(app, ["cache", "verify", str(damaged)])
    assert verify.exit_code != 0 and "rows/target_rejected/c/0/0/0/0 is missing" in verify.output


class _Exploit:
    """Unpickling this writes a marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_resume_never_unpickles_a_file_in_the_run_folder(sd15_store, tmp_path):
    import pickle

    import torch

    run = tmp_path / "run"
    assert train(sd15_store, run, "--steps", "2", "--checkpoint-every", "1").exit_code == 0
    checkpoint = run / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
        "scheduler.json", "training_state.json"]
    marker = tmp_path / "executed"
    # what accelerate would unpickle: custom objects, RNG states, the optimizer
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(_Exploit(str(marker))))
    torch.save({"x": _Exploit(str(marker))}, checkpoint / "optimizer.bin")
    resumed = train(sd15_store, run, "--steps", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not marker.exists()

    # a checkpoint of the old pickled format is refused in one line, and still not unpickled
    old = run / "checkpoints" / "step-0000003"
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json"):
        (old / name).unlink()
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Exploit(str(marker))))
    refused = train(sd15_store, run, "--steps", "4", "--resume")
    assert refused.exit_code == 2 and "cannot load safely" in " ".join(refused.output.split()), refused.output
    assert not marker.exists()


def test_winner_excess_is_logged_and_the_safeguard_only_changes_gradients(sd15_store, tmp_path):
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    assert train(sd15_store, plain, "--steps", "3", "--lr", "1e-3").exit_code == 0
    result = train(sd15_store, guarded, "--steps", "3", "--lr", "1e-3", "--winner-preserving", "0.9")
    assert result.exit_code == 0, result.output
    first, second = metrics(plain), metrics(guarded)
    # step 1: same rows, same weights, and the safeguard leaves every forward value alone
    for key in ("loss", "margin", "winner_error_excess", "loser_error_excess"):
        assert first[0][key] == pytest.approx(second[0][key], rel=1e-6, abs=1e-9), key
    assert first[0]["winner_error_excess"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert all(line["loser_gradient_scale"] is None for line in first)
    assert all(0.0 <= line["loser_gradient_scale"] <= 1.0 for line in second)
    assert json.loads((guarded / "run.json").read_text())["options"]["winner_preserving"] == 0.9
    assert "winners' error − reference's" in " ".join(result.output.split())


def test_winner_monitor_warns_once_when_the_winners_error_stays_above_the_reference():
    from inpo_pipeline.reporting import Reporter
    from stages.train import WinnerMonitor

    lines: list[str] = []
    reporter = Reporter(enabled=False)
    reporter.line = lines.append  # type: ignore[method-assign]
    monitor = WinnerMonitor(reporter, safeguarded=False)
    for step, excess in enumerate([-1e-3] * 10 + [5e-3] * 5 + [1e-3] * 20, start=1):
        monitor.update(step, {"winner_error_excess": excess})
    # the 10-step mean first turns positive at step 12 (8 × −1e-3 + 2 × 5e-3 > 0)
    assert monitor.rose_at == 12
    assert len(lines) == 1 and "step 12" in lines[0] and "--winner-preserving" in lines[0]
    quiet = WinnerMonitor(reporter, safeguarded=False)
    for step in range(1, 40):
        quiet.update(step, {"winner_error_excess": -1e-4})
    assert quiet.rose_at is None and len(lines) == 1


def test_verify_repair_lets_invert_redo_exactly_the_lost_shards(sd15_store, tiny_sd15, pickapic, tmp_path):
    import shutil

    from cache_schema import CacheStore

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(sd15_store, damaged)
    (damaged / "rows" / "latent_rejected" / "c" / "1" / "0" / "0" / "0").unlink()
    (damaged / "prompts" / "embedding" / "c" / "0" / "0" / "0").unlink()
    repaired = runner.invoke(app, ["cache", "verify", str(damaged), "--repair"])
    assert repaired.exit_code == 1 and "1 shard(s) and 1 prompt chunk(s)" in " ".join(repaired.output.split())
    after = runner.invoke(app, ["cache", "verify", str(damaged)])
    assert "is missing" not in after.output and "incomplete" in after.output
    redo = runner.invoke(app, ["invert", "--model", str(tiny_sd15), "--data", str(pickapic["path"]),
                               "--out", str(damaged), *INVERT])
    assert redo.exit_code == 0, redo.output
    assert runner.invoke(app, ["cache", "verify", str(damaged)]).exit_code == 0
    original, restored = CacheStore.open(sd15_store).data_arrays(), CacheStore.open(damaged).data_arrays()
    assert sorted(original) == sorted(restored)
    for path, values in original.items():
        assert np.array_equal(values, restored[path]), path


def test_report_to_logs_every_steps_metrics_to_tensorboard_and_wandb_offline(sd15_store, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "tracked"
    result = train(sd15_store, run, "--steps", "3", "--report-to", "all")
    assert result.exit_code == 0, result.output
    logged = metrics(run)
    events = EventAccumulator(str(next(p.parent for p in run.rglob("events.out.tfevents.*"))))
    events.Reload()
    for name in ("loss", "implicit_accuracy", "margin", "lr", "grad_norm", "pairs_per_second"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2, 3], name
        assert [s.value for s in scalars] == pytest.approx([line[name] for line in logged], rel=1e-6), name
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    untracked = tmp_path / "untracked"
    assert train(sd15_store, untracked, "--steps", "1").exit_code == 0
    assert not list(untracked.rglob("events.out.tfevents.*")) and not (untracked / "wandb").exists()
    bad = train(sd15_store, tmp_path / "bad", "--steps", "1", "--report-to", "mlflow")
    assert bad.exit_code == 2 and "--report-to must be one of" in bad.output


def test_validation_grids_are_written_logged_and_leave_training_untouched(sd15_store, tmp_path, monkeypatch):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = tmp_path / "validation.txt"
    prompts.write_text("a red cube\na blue sphere\na green cone\n")
    run = tmp_path / "validated"
    result = train(sd15_store, run, "--steps", "3", "--checkpoint-every", "3", "--report-to", "all",
                   "--validation-prompts", str(prompts), "--validation-every", "2", "--validation-seeds", "2",
                   "--validation-steps", "3")
    assert result.exit_code == 0, result.output
    grids = sorted(p.name for p in (run / "validation").iterdir())
    assert grids == ["step-0000002.png", "step-0000003.png"]  # every 2 steps and at the end
    first, last = (Image.open(run / "validation" / name) for name in grids)
    assert first.size == (2 * 32, 3 * 32)  # columns: seeds; rows: prompts; the store's 32 px
    assert np.asarray(first).std() > 0 and not np.array_equal(np.asarray(first), np.asarray(last))
    events = EventAccumulator(str(next(p.parent for p in run.rglob("events.out.tfevents.*"))), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("validation")] == [2, 3]
    # sampling draws nothing from the training RNG and leaves the weights alone: the same run without it
    plain = tmp_path / "plain"
    assert train(sd15_store, plain, "--steps", "3", "--checkpoint-every", "3").exit_code == 0
    assert metrics(plain)[-1]["loss"] == metrics(run)[-1]["loss"]
    first_weights, second_weights = _weights(plain), _weights(run)
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    missing = train(sd15_store, tmp_path / "missing", "--steps", "1", "--validation-prompts", str(tmp_path / "nope.txt"))
    assert missing.exit_code == 2 and "--validation-prompts" in missing.output and "not found" in missing.output
    assert not (tmp_path / "missing").exists()
    globbed = train(sd15_store, tmp_path / "globbed", "--steps", "1", "--validation-prompts", str(tmp_path / "*.txt"))
    assert globbed.exit_code == 2 and "--validation-prompts" in globbed.output and "not found" in globbed.output
    alone = train(sd15_store, tmp_path / "alone", "--steps", "1", "--validation-every", "1")
    assert alone.exit_code == 2 and "--validation-every needs --validation-prompts" in alone.output

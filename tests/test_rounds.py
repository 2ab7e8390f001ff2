"""`inpo rounds`: each round's reference is the previous round's policy, the chain is recorded,
and a chain killed mid-round resumes to the same weights as one that never stopped."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.cli.app import app
from inpo_pipeline.errors import UserError
from inpo_pipeline.models.reference import fingerprint_module, load_unet
from inpo_pipeline.models.policy import preference_metrics
from stages.rounds import RoundsOptions, parse_stage_options, run_rounds
from tests.conftest import cli_env

runner = CliRunner()
INVERT = {"resolution": 32, "rows_per_shard": 8, "shards_per_window": 2, "batch_size": 16, "timesteps_per_pair": 2}
TRAIN = {"steps": 6, "batch_size": 4, "grad_accum": 1, "warmup": 0, "num_workers": 0, "lr": 1e-4,
         "checkpoint_every": 1, "keep_checkpoints": 2}


def _flags(stage: str, values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{stage}", f"{key.replace('_', '-')}={value}")]


def _chain_command(model: Path, data: Path, out: Path, rounds: int = 2) -> list[str]:
    return [sys.executable, "-m", "inpo_pipeline", "rounds", "--model", str(model), "--data", str(data),
            "--out", str(out), "--rounds", str(rounds), *_flags("invert", INVERT), *_flags("train", TRAIN),
            "--device", "cpu"]


def _unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def whole_chain(tmp_path_factory, tiny_sd15, pickapic) -> Path:
    out = tmp_path_factory.mktemp("rounds") / "whole"
    done = subprocess.run(_chain_command(tiny_sd15, pickapic["path"], out), env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_round_two_inverts_with_round_one_policy(whole_chain, tiny_sd15, pickapic):
    chain = json.loads((whole_chain / "chain.json").read_text())
    assert chain["mode"] == "same-data" and [e["round"] for e in chain["rounds"]] == [1, 2]
    first, second = chain["rounds"]
    assert first["reference"] == str(tiny_sd15) and second["reference"] == first["pipeline"]
    assert second["reference_from_run"] == first["run"]
    assert first["data"] == second["data"] == str(pickapic["path"])
    assert [first["seed"], second["seed"]] == [0, 1]
    assert chain["final_pipeline"] == second["pipeline"]
    for entry in chain["rounds"]:
        assert entry["done"] == ["store", "run", "pipeline"]
        assert CacheStore.open(str(whole_chain / entry["store"])).is_complete()
    # the round-2 store's reference errors are round 1's trained policy's, not the base model's
    base = fingerprint_module(load_unet(str(tiny_sd15)))
    trained = load_unet(str(whole_chain / first["pipeline"]))
    assert first["reference_fingerprint"] == base
    assert second["reference_fingerprint"] == fingerprint_module(trained) != base
    # so round 1's policy is round 2's step-0 policy: loss log 2, margin 0 (DESIGN §2)
    store = CacheStore.open(str(whole_chain / second["store"]))
    step_zero = preference_metrics(trained.float(), store, store.valid_rows(), beta=5000.0)
    assert abs(step_zero["loss"] - math.log(2)) < 1e-6
    assert step_zero["max_abs_margin"] < 1e-3
    # and round 2 moved away from it
    assert not all(torch.equal(value, trained.state_dict()[name].cpu())
                   for name, value in _unet_weights(whole_chain / second["run"]).items())


def test_a_chain_killed_in_round_two_resumes_to_the_same_weights(whole_chain, tiny_sd15, pickapic, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(_chain_command(tiny_sd15, pickapic["path"], out), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "round-2" / "run" / "checkpoints" / "step-0000002").exists():
            break
        time.sleep(0.005)
    assert process.poll() is None, "the chain finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    chain = json.loads((out / "chain.json").read_text())
    assert chain["rounds"][0]["done"] == ["store", "run", "pipeline"]
    assert chain["rounds"][1]["done"] == ["store"]
    resumed = subprocess.run(_chain_command(tiny_sd15, pickapic["path"], out), env=cli_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 round(s) already finished" in resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    for number in (1, 2):
        first = _unet_weights(whole_chain / f"round-{number}" / "run")
        second = _unet_weights(out / f"round-{number}" / "run")
        assert all(torch.equal(first[name], second[name]) for name in first), f"round {number} differs"


def test_a_resume_with_other_options_is_refused_and_more_rounds_extend(whole_chain, tiny_sd15, pickapic, tmp_path):
    import shutil

    out = tmp_path / "chain"
    shutil.copytree(whole_chain, out)
    other = runner.invoke(app, ["rounds", "--model", str(tiny_sd15), "--data", str(pickapic["path"]),
                                "--out", str(out), *_flags("invert", INVERT), *_flags("train", {**TRAIN, "lr": 2e-4})])
    assert other.exit_code == 2 and "other options (train)" in other.output and "choose another --out" in other.output
    extended = runner.invoke(app, ["rounds", "--model", str(tiny_sd15), "--data", str(pickapic["path"]),
                                   "--out", str(out), "--rounds", "3", *_flags("invert", INVERT), *_flags("train", TRAIN)])
    assert extended.exit_code == 0, extended.output
    chain = json.loads((out / "chain.json").read_text())
    assert [e["round"] for e in chain["rounds"]] == [1, 2, 3]
    # the copied rounds were not redone
    assert chain["rounds"][1]["finished_at"] == json.loads((whole_chain / "chain.json").read_text())["rounds"][1]["finished_at"]
    assert chain["rounds"][2]["reference"] == chain["rounds"][1]["pipeline"]


def test_on_policy_rounds_sample_label_and_fuse_a_lora(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(world.TRAIN_PROMPTS[:8]) + "\n")
    out = tmp_path / "on-policy"
    chain = run_rounds(RoundsOptions(
        model=str(world.DEFAULT_WORLD), out=str(out), rounds=2, prompts=str(prompts), scorer="shapes",
        sample_seeds=4, sample_steps=4, sample_guidance=3.0, device="cpu",
        invert={**INVERT, "inversion_steps": 4}, train={**TRAIN, "steps": 2, "lora_rank": 4}))
    first, second = chain["rounds"]
    assert first["done"] == second["done"] == ["samples", "labels", "store", "run", "pipeline"]
    assert first["labels"]["pairs"] == second["labels"]["pairs"] == 16
    assert first["scorer"]["scorer"] == "shapes" and first["scorer"]["model"] == "colour"
    assert second["reference"] == first["pipeline"] == "round-1/pipeline" and second["data"] == "round-2/data.parquet"
    # round 2's samples came from round 1's fused policy (its manifest names that pipeline)
    record = json.loads((out / "round-2" / "samples" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["model"]["model"] == str(out / first["pipeline"])
    fused = load_unet(str(out / first["pipeline"]))
    assert second["reference_fingerprint"] == fingerprint_module(fused)
    assert fingerprint_module(fused) != fingerprint_module(load_unet(str(world.DEFAULT_WORLD)))


def test_option_errors():
    with pytest.raises(UserError, match="either --data"):
        RoundsOptions(model="m", out="o").validate()
    with pytest.raises(UserError, match="needs --scorer"):
        RoundsOptions(model="m", out="o", prompts="p").validate()
    with pytest.raises(UserError, match="sets model itself"):
        RoundsOptions(model="m", out="o", data="d", invert={"model": "x"}).validate()
    with pytest.raises(UserError, match="reference is --model"):
        RoundsOptions(model="m", out="o", data="d", invert={"unet": "sft/unet"}).validate()
    with pytest.raises(UserError, match="has no option nonsense"):
        parse_stage_options(["nonsense=1"], "train")
    with pytest.raises(UserError, match="not a valid int"):
        parse_stage_options(["steps=many"], "train")
    assert parse_stage_options(["lr=1e-5", "lora-rank=8", "beta=none", "export-pipeline=false"], "train") == \
        {"lr": 1e-5, "lora_rank": 8, "beta": None, "export_pipeline": False}

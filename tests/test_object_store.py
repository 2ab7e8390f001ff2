"""Stores on object storage: `inpo invert`, `cache info`, `cache verify` and `inpo train` on
s3:// URLs against a real S3 API (moto's server on 127.0.0.1, started by the `s3_server`
fixture), with credentials and the endpoint from the standard AWS_* environment.

Every invariant of a local store is checked there: bit-identical to a local store of the same
command, several writers owning whole shards, a killed creation and a killed worker finished by
running again, checksum and missing-object detection, and no credential in any object.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

from cache_schema import CacheStore, StoreError
from cache_schema.locations import locate
from inpo_pipeline.cli.app import app
from tests.conftest import S3_SECRET, cli_env
from tests.test_processes import assert_same_store, invert_command

runner = CliRunner()


def filesystem() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def invert(model: Path, data: Path, out: str, *extra: str):
    return runner.invoke(app, invert_command(model, data, out)[3:] + list(extra))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_sd15, pickapic) -> Path:
    out = tmp_path_factory.mktemp("local") / "store.zarr"
    result = invert(tiny_sd15, pickapic["path"], str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def s3_store(s3_server, tiny_sd15, pickapic) -> str:
    url = f"s3://{s3_server()}/stores/store.zarr"
    result = invert(tiny_sd15, pickapic["path"], url)
    assert result.exit_code == 0, result.output
    return url


def test_a_store_on_s3_is_bit_identical_to_a_local_one_and_holds_no_credential(local_store, s3_store):
    assert_same_store(local_store, s3_store)
    fs = filesystem()
    root = s3_store.removeprefix("s3://")
    objects = fs.find(root)
    local_objects = sorted(str(p.relative_to(local_store)) for p in local_store.rglob("*") if p.is_file())
    assert sorted(name[len(root) + 1:] for name in objects) == local_objects
    for name in objects:
        content = fs.cat_file(name)
        assert S3_SECRET.encode() not in content and b"inpo-test-key" not in content, name
    # the store's own record of where it is: the URL, nothing else
    assert CacheStore.open(s3_store).provenance["options"]["out"] == s3_store


def test_cache_info_and_verify_read_an_s3_store(s3_store, local_store):
    info = runner.invoke(app, ["cache", "info", s3_store, "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    local = CacheStore.open(local_store).summary()
    assert summary["path"] == s3_store and summary["complete"] and summary["rows_valid"] == local["rows_valid"]
    # the same objects, so the same bytes but the root metadata's (it records --out)
    assert abs(summary["bytes_on_disk"] - local["bytes_on_disk"]) < 200
    verify = runner.invoke(app, ["cache", "verify", s3_store])
    assert verify.exit_code == 0 and f"OK {s3_store}" in verify.output, verify.output


def test_a_second_run_on_a_finished_s3_store_resumes_and_changes_nothing(s3_store, local_store, tiny_sd15, pickapic):
    def etags() -> dict[str, str]:
        listed = filesystem().find(s3_store.removeprefix("s3://"), detail=True)
        return {name: entry["ETag"] for name, entry in listed.items()}

    before = etags()
    started = time.monotonic()
    result = invert(tiny_sd15, pickapic["path"], s3_store)
    print(f"resume took {time.monotonic() - started:.1f} s")
    assert result.exit_code == 0 and "resuming the store" in result.output, result.output
    after = etags()
    root = s3_store.removeprefix("s3://") + "/zarr.json"
    assert {k: v for k, v in before.items() if k != root} == {k: v for k, v in after.items() if k != root}
    assert_same_store(local_store, s3_store)


def _copy_store(source: str, target: str) -> None:
    fs = filesystem()
    fs.copy(source.removeprefix("s3://"), target.removeprefix("s3://"), recursive=True)


def test_a_flipped_byte_or_a_lost_object_on_s3_is_caught_and_repaired(s3_server, s3_store, local_store,
                                                                         tiny_sd15, pickapic):
    url = f"s3://{s3_server()}/damaged.zarr"
    _copy_store(s3_store, url)
    fs = filesystem()
    latent = f"{url.removeprefix('s3://')}/rows/latent_chosen/c/1/0/0/0"
    damaged = bytearray(fs.cat_file(latent))
    damaged[100] ^= 0x01
    fs.pipe_file(latent, bytes(damaged))
    store = CacheStore.open(url)
    rows = np.arange(store.layout.rows_per_shard, 2 * store.layout.rows_per_shard)
    with pytest.raises(StoreError, match="fails its crc32c checksum"):
        store.read_rows(rows)
    verify = runner.invoke(app, ["cache", "verify", url])
    assert verify.exit_code == 1 and "rows/latent_chosen" in verify.output

    fs.rm(latent)
    with pytest.raises(StoreError, match="is missing rows/latent_chosen/c/1/0/0/0"):
        CacheStore.open(url).read_rows(rows)
    repair = runner.invoke(app, ["cache", "verify", url, "--repair"])
    assert repair.exit_code == 1 and "missing" in repair.output
    redo = invert(tiny_sd15, pickapic["path"], url)
    assert redo.exit_code == 0, redo.output
    assert_same_store(local_store, url)


def test_a_creation_killed_before_its_root_object_is_redone_by_the_next_run(s3_server, s3_store, local_store,
                                                                              tiny_sd15, pickapic):
    """What a creator killed mid-upload leaves: some of the store's objects and no root."""
    url = f"s3://{s3_server()}/interrupted.zarr"
    fs = filesystem()
    source = s3_store.removeprefix("s3://")
    for name in fs.find(source):
        relative = name[len(source) + 1:]
        if relative.startswith(("rows/timestep", "rows/prompt_index", "prompts/text")):
            fs.pipe_file(f"{url.removeprefix('s3://')}/{relative}", fs.cat_file(name))
    assert not CacheStore.exists(url) and CacheStore.interrupted_creation(url)
    result = invert(tiny_sd15, pickapic["path"], url)
    assert result.exit_code == 0 and "creation was interrupted" in result.output, result.output
    assert_same_store(local_store, url)


@pytest.mark.slow
def test_two_uncoordinated_workers_on_s3_one_killed_then_finished_equal_one_local_process(
        s3_server, local_store, tiny_sd15, pickapic):
    """Two `--worker I --workers 2` processes create and fill one S3 store at once (neither waits
    for the other); worker 1 is killed as soon as the store exists; worker 0 finishes its share;
    a plain `inpo invert` finishes the rest, bit-identical to one local process."""
    url = f"s3://{s3_server()}/workers.zarr"
    workers = [subprocess.Popen(invert_command(tiny_sd15, pickapic["path"], url) + ["--worker", str(i), "--workers", "2"],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    deadline = time.monotonic() + 300
    while not CacheStore.exists(url) and time.monotonic() < deadline and workers[1].poll() is None:
        time.sleep(0.05)
    assert workers[1].poll() is None, "worker 1 finished before it could be killed"
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait()
    _stdout, stderr = workers[0].communicate(timeout=600)
    assert workers[0].returncode == 0, stderr[-3000:]
    assert "worker 0 of 2" in stderr
    assert not CacheStore.open(url).is_complete()  # worker 1's windows are left
    finished = subprocess.run(invert_command(tiny_sd15, pickapic["path"], url), env=cli_env(),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_store(local_store, url)


def test_training_from_an_s3_store_equals_training_from_the_local_copy(s3_store, local_store, tmp_path):
    runs = {}
    for name, cache in (("local", str(local_store)), ("s3", s3_store)):
        out = tmp_path / name
        result = runner.invoke(app, ["train", "--cache", cache, "--out", str(out), "--steps", "2",
                                     "--batch-size", "4", "--grad-accum", "2", "--warmup", "0",
                                     "--num-workers", "1"])
        assert result.exit_code == 0, result.output
        runs[name] = out
    assert json.loads((runs["s3"] / "run.json").read_text())["store"]["path"] == s3_store
    local = UNet2DConditionModel.from_pretrained(runs["local"] / "unet").state_dict()
    remote = UNet2DConditionModel.from_pretrained(runs["s3"] / "unet").state_dict()
    assert all(torch.equal(local[key], remote[key]) for key in local)
    losses = [[json.loads(line)["loss"] for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
              for name in ("local", "s3")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_object_store_mistakes_fail_in_one_line(s3_server, tiny_sd15, pickapic):
    keyed = invert(tiny_sd15, pickapic["path"], "s3://AKIAXXXX:hunter2@bucket/store.zarr")
    assert keyed.exit_code != 0 and "keys do not go in the URL" in keyed.output and "hunter2" not in keyed.output
    missing = invert(tiny_sd15, pickapic["path"], "s3://inpo-no-such-bucket/store.zarr")
    assert missing.exit_code != 0 and "there is no bucket 'inpo-no-such-bucket'" in missing.output
    assert len(missing.output.strip().splitlines()[-1]) < 300
    absent = runner.invoke(app, ["cache", "info", f"s3://{s3_server()}/nothing.zarr"])
    assert absent.exit_code != 0 and "no inpo cache store at s3://" in absent.output
    with pytest.raises(StoreError, match="prefix inside the bucket"):
        locate("s3://bucket-only")


def test_a_foreign_prefix_is_never_overwritten_or_deleted(s3_server, tiny_sd15, pickapic):
    bucket = s3_server()
    fs = filesystem()
    fs.pipe_file(f"{bucket}/theirs.zarr/notes.txt", b"not an inpo store")
    for extra in ([], ["--overwrite"]):
        result = invert(tiny_sd15, pickapic["path"], f"s3://{bucket}/theirs.zarr", *extra)
        assert result.exit_code != 0 and "not an inpo cache store" in result.output, result.output
    assert fs.cat_file(f"{bucket}/theirs.zarr/notes.txt") == b"not an inpo store"

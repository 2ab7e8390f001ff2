"""`inpo invert`, `inpo cache info` and `inpo cache verify` through the real CLI."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.cli.app import app
from inpo_pipeline.worlds.example import build_tiny_sd15, write_manifest

runner = CliRunner()
SMALL = ["--resolution", "32", "--rows-per-shard", "4", "--shards-per-window", "2", "--batch-size", "6"]


def invert(model: Path, data: Path | str, out: Path, *extra: str):
    return runner.invoke(app, ["invert", "--model", str(model), "--data", str(data), "--out", str(out), *SMALL, *extra])


def row_arrays(store: Path) -> dict[str, np.ndarray]:
    opened = CacheStore.open(store)
    batch = opened.read_rows(np.arange(opened.layout.num_rows))
    return {name: value for name, value in vars(batch).items() if value is not None}


@pytest.fixture(scope="module")
def sd15_store(tmp_path_factory, tiny_sd15, pickapic) -> Path:
    out = tmp_path_factory.mktemp("stores") / "sd15.zarr"
    result = invert(tiny_sd15, pickapic["path"], out)
    assert result.exit_code == 0, result.output
    return out


def test_invert_writes_a_complete_store(sd15_store, pickapic):
    summary = CacheStore.open(sd15_store).summary()
    kept = len(pickapic["kept_rows"]) + len(pickapic["broken_rows"])
    assert summary["complete"]
    assert summary["rows"] == kept
    assert summary["rows_valid"] == len(pickapic["kept_rows"])
    assert summary["broken_source_rows"] == sorted(pickapic["broken_rows"])
    assert summary["provenance"]["filter"]["ties"] == len(pickapic["tie_rows"])
    assert summary["settings"]["recipe"] == summary["settings"]["timestep_mode"] == "authors"
    # rows are permuted: the source rows are not in order, but every kept pair is present
    store = CacheStore.open(sd15_store)
    source_rows = store.read_plan(slice(None)).source_row
    assert sorted(source_rows.tolist()) == sorted(pickapic["kept_rows"] + pickapic["broken_rows"])
    assert source_rows.tolist() != sorted(source_rows.tolist())


def test_cache_info_and_verify(sd15_store, pickapic):
    info = runner.invoke(app, ["cache", "info", str(sd15_store)])
    assert info.exit_code == 0, info.output
    assert "complete" in info.output and "ties dropped" in info.output
    for row in pickapic["broken_rows"]:
        assert str(row) in info.output
    as_json = json.loads(runner.invoke(app, ["cache", "info", str(sd15_store), "--json"]).stdout)
    assert as_json["rows_valid"] == len(pickapic["kept_rows"])
    verify = runner.invoke(app, ["cache", "verify", str(sd15_store), "--recompute", "4"])
    assert verify.exit_code == 0, verify.output
    assert "recomputed 4 rows" in verify.output


def test_verify_fails_on_a_flipped_byte(sd15_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(sd15_store, copy)
    shard = next(p for p in sorted((copy / "rows" / "target_rejected" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["cache", "verify", str(copy)])
    assert result.exit_code == 1
    assert "target_rejected" in result.output and "unreadable" in result.output


def test_resume_redoes_only_missing_shards_bit_identically(sd15_store, tiny_sd15, pickapic, tmp_path):
    copy = tmp_path / "resume.zarr"
    shutil.copytree(sd15_store, copy)
    # forget shards 1 and 3 as a killed run would have left them: data present or not, flag unset
    for shard in (1, 3):
        (copy / "done" / "shards" / "c" / str(shard)).unlink()
    latent_dir = copy / "rows" / "latent_chosen" / "c" / "1"
    shutil.rmtree(latent_dir)
    result = invert(tiny_sd15, pickapic["path"], copy)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    before, after = row_arrays(sd15_store), row_arrays(copy)
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def test_refuses_other_settings_and_other_weights(sd15_store, tiny_sd15, pickapic, tmp_path):
    copy = tmp_path / "mismatch.zarr"
    shutil.copytree(sd15_store, copy)
    result = invert(tiny_sd15, pickapic["path"], copy, "--seed", "5")
    assert result.exit_code == 2
    assert "seed" in result.output and "--overwrite" in result.output
    other = build_tiny_sd15(tmp_path / "other-model", seed=1)
    result = invert(other, pickapic["path"], copy)
    assert result.exit_code == 2 and "unet_fingerprint" in result.output
    result = invert(tiny_sd15, pickapic["path"], copy, "--seed", "5", "--overwrite")
    assert result.exit_code == 0, result.output
    assert CacheStore.open(copy).settings["seed"] == 5


def test_sdxl_store_keeps_size_conditioning(tiny_sdxl, pickapic, tmp_path):
    out = tmp_path / "sdxl.zarr"
    result = invert(tiny_sdxl, pickapic["path"], out, "--time-ids", "original", "--timesteps-per-pair", "2")
    assert result.exit_code == 0, result.output
    store = CacheStore.open(out)
    assert store.layout.pooled_dim == 32 and store.layout.text_shape == (77, 64)
    rows = store.read_rows(store.valid_rows())
    source = pq.read_table(pickapic["path"]).to_pylist()
    from inpo_pipeline.data.sources import prepare_image

    plan = store.read_plan(store.valid_rows())
    for index, source_row in enumerate(plan.source_row):
        record = source[int(source_row)]
        chosen = record["jpg_0"] if record["label_0"] > record["label_1"] else record["jpg_1"]
        image = prepare_image(chosen, 32)
        expected = [*image.original_size, *image.crop_top_left, 32, 32]
        assert rows.time_ids_chosen[index].tolist() == expected
    assert store.layout.num_rows == 2 * (len(pickapic["kept_rows"]) + len(pickapic["broken_rows"]))
    embeddings, pooled = store.read_prompt_embeddings(np.array([0, 1]))
    assert pooled is not None and np.isfinite(pooled).all() and np.abs(embeddings).sum() > 0


def test_manifest_input(tiny_sd15, tmp_path):
    written = write_manifest(tmp_path / "pairs.jsonl", num_pairs=6, seed=1, fmt="jsonl")
    out = tmp_path / "manifest.zarr"
    result = invert(tiny_sd15, written["path"], out)
    assert result.exit_code == 0, result.output
    summary = CacheStore.open(out).summary()
    assert summary["broken_source_rows"] == sorted(written["broken_rows"])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_input_errors(tiny_sd15, pickapic, tmp_path):
    no_caption = tmp_path / "no-caption.parquet"
    table = pq.read_table(pickapic["path"]).drop_columns(["caption"])
    pq.write_table(table, no_caption)
    assert "caption" in _one_line_error(invert(tiny_sd15, no_caption, tmp_path / "a.zarr"))

    only_ties = tmp_path / "ties.parquet"
    table = pq.read_table(pickapic["path"])
    ties = table.filter(pa.compute.equal(table.column("label_0"), 0.5))
    pq.write_table(ties, only_ties)
    assert "no usable pairs" in _one_line_error(invert(tiny_sd15, only_ties, tmp_path / "b.zarr"))

    assert "model_index.json" in _one_line_error(invert(tmp_path, pickapic["path"], tmp_path / "c.zarr"))
    assert "multiple of" in _one_line_error(
        runner.invoke(app, ["invert", "--model", str(tiny_sd15), "--data", str(pickapic["path"]),
                            "--out", str(tmp_path / "d.zarr"), "--resolution", "34"]))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot write" in _one_line_error(invert(tiny_sd15, pickapic["path"], blocker / "store.zarr"))
    assert "not found" in _one_line_error(invert(tiny_sd15, tmp_path / "missing.parquet", tmp_path / "e.zarr"))
    not_a_store = tmp_path / "precious"
    not_a_store.mkdir()
    (not_a_store / "notes.txt").write_text("keep me")
    assert "not an inpo cache store" in _one_line_error(invert(tiny_sd15, pickapic["path"], not_a_store, "--overwrite"))
    assert (not_a_store / "notes.txt").exists()


def test_full_disk_leaves_no_false_done_flag(tiny_sd15, pickapic, tmp_path, monkeypatch):
    """ENOSPC in the middle of a shard: one-line error, that shard not done, a re-run completes it."""
    out = tmp_path / "full.zarr"
    original = CacheStore.write_shard
    calls = {"n": 0}

    def failing(self, shard, result):
        calls["n"] += 1
        if calls["n"] == 2:
            self.group["rows"]["latent_chosen"][self.layout.shard_rows(shard)] = result.latent_chosen
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, shard, result)

    monkeypatch.setattr(CacheStore, "write_shard", failing)
    line = _one_line_error(invert(tiny_sd15, pickapic["path"], out))
    assert "disk full" in line and "resume" in line
    assert CacheStore.open(out).shards_done().sum() == 1
    monkeypatch.setattr(CacheStore, "write_shard", original)
    assert invert(tiny_sd15, pickapic["path"], out).exit_code == 0
    assert CacheStore.open(out).is_complete()

"""The README's first quick-start command (`inpo example`), reduced: invert then train."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from cache_schema import CacheStore
from inpo_pipeline.cli.app import app


def test_example_inverts_and_trains(tmp_path):
    result = CliRunner().invoke(app, ["example", "--out", str(tmp_path), "--pairs", "12", "--steps", "4"])
    assert result.exit_code == 0, result.output
    store = CacheStore.open(tmp_path / "store-sd15.zarr")
    assert store.is_complete() and len(store.valid_rows()) > 0
    lines = [json.loads(line) for line in (tmp_path / "run-sd15" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-4
    assert (tmp_path / "run-sd15" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert "inpo example" in result.output and "final loss" in result.output

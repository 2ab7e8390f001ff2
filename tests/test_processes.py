"""Real processes: two accelerate ranks fill one store; SIGKILL at any point, then resume.

Both must give a store bit-identical to one uninterrupted single-process run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache_schema import CacheStore
from tests.conftest import accelerate_launch, cli_env

ARGS = ["--resolution", "32", "--rows-per-shard", "2", "--shards-per-window", "2", "--batch-size", "4",
        "--timesteps-per-pair", "2"]


def invert_command(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "inpo_pipeline", "invert", "--model", str(model), "--data", str(data),
            "--out", str(out), *ARGS]


def assert_same_store(expected: Path, actual: Path) -> None:
    """Every data array bit for bit; done/shard_stats (seconds: a diagnostic) is the only one left out."""
    first, second = CacheStore.open(expected), CacheStore.open(actual)
    assert first.is_complete() and second.is_complete()
    data, other = first.data_arrays(), second.data_arrays()
    assert sorted(data) == sorted(other) and "rows/latent_chosen" in data and "done/shard_stats" not in data
    for path, values in data.items():
        assert values.dtype == other[path].dtype and np.array_equal(values, other[path]), path
    rows = np.arange(first.layout.num_rows)
    a, b = first.read_rows(rows), second.read_rows(rows)
    for name, value in vars(a).items():
        if value is not None:
            assert np.array_equal(value, getattr(b, name)), name
    prompts = np.arange(first.layout.num_prompts)
    assert np.array_equal(first.read_prompt_embeddings(prompts)[0], second.read_prompt_embeddings(prompts)[0])
    assert first.prompt_texts() == second.prompt_texts()


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_sd15, pickapic) -> Path:
    out = tmp_path_factory.mktemp("reference") / "one-process.zarr"
    subprocess.run(invert_command(tiny_sd15, pickapic["path"], out), env=cli_env(), check=True,
                   capture_output=True, timeout=600)
    return out


def test_two_accelerate_processes_equal_one(reference_store, tiny_sd15, pickapic, tmp_path):
    out = tmp_path / "two-processes.zarr"
    launch = accelerate_launch(2, *invert_command(tiny_sd15, pickapic["path"], out)[3:])
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert_same_store(reference_store, out)


def _done_shards(out: Path) -> int:
    folder = out / "done" / "shards" / "c"
    return len(list(folder.iterdir())) if folder.exists() else 0


@pytest.mark.parametrize("moment", ["startup", "creating", "created", "mid-shards"])
def test_sigkill_then_resume_is_bit_identical(moment, reference_store, tiny_sd15, pickapic, tmp_path):
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen(invert_command(tiny_sd15, pickapic["path"], out), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    ready = {
        "startup": lambda: True,
        "creating": lambda: (out.parent / f".{out.name}.creating" / "rows").exists(),
        "created": lambda: (out / "zarr.json").exists(),
        "mid-shards": lambda: _done_shards(out) >= 3,
    }[moment]
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if moment == "startup":
        time.sleep(1.5)
    assert process.poll() is None, "the run finished before it could be killed; use more rows"
    process.send_signal(signal.SIGKILL)
    process.wait()
    if moment == "mid-shards":
        total = CacheStore.open(out).layout.num_shards
        assert 3 <= _done_shards(out) < total
    resumed = subprocess.run(invert_command(tiny_sd15, pickapic["path"], out), env=cli_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(reference_store, out)


def test_three_uncoordinated_workers_one_killed_then_finished_equal_one_process(
        reference_store, tiny_sd15, pickapic, tmp_path):
    """`--worker I --workers 3` as separate processes on one store (no process group); worker 1
    is killed once the store exists; the others finish their shares and exit 0 on an incomplete
    store; a plain `inpo invert` finishes it, bit-identical to one uninterrupted process."""
    out = tmp_path / "workers.zarr"
    workers = [subprocess.Popen(invert_command(tiny_sd15, pickapic["path"], out) + ["--worker", str(index), "--workers", "3"],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(3)]
    deadline = time.monotonic() + 300
    while not (out / "zarr.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert workers[1].poll() is None, "worker 1 finished before it could be killed"
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait()
    for index in (0, 2):
        _stdout, stderr = workers[index].communicate(timeout=600)
        assert workers[index].returncode == 0, stderr[-3000:]
        assert f"worker {index} of 3" in stderr and "share is done" in " ".join(stderr.split())
    store = CacheStore.open(out)
    windows = store.layout.num_windows
    assert windows >= 3 and not store.is_complete()  # worker 1's windows are left
    finished = subprocess.run(invert_command(tiny_sd15, pickapic["path"], out), env=cli_env(),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_store(reference_store, out)
    assert not list(out.parent.glob(f".{out.name}.creating*"))  # the killed creator's sibling is gone


def test_worker_options_are_checked_in_one_line(tiny_sd15, pickapic, tmp_path):
    for extra, message in ((["--worker", "3", "--workers", "3"], "--worker must be between 0 and"),
                           (["--worker", "0"], "--worker and --workers go together")):
        result = subprocess.run(invert_command(tiny_sd15, pickapic["path"], tmp_path / "x.zarr") + extra,
                                env=cli_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "x.zarr").exists()

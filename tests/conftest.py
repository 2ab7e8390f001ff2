"""Shared fixtures: tiny SD1.5/SDXL/SD3/FLUX pipelines saved to disk once per session, and tiny data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inpo_pipeline.worlds.example import (
    build_tiny_flux, build_tiny_sd3, build_tiny_sd15, build_tiny_sdxl, write_pickapic_parquet,
)

# The suite runs on 2 cores; pinning threads keeps float results identical between a test's
# own computation and the subprocesses it launches.
torch.set_num_threads(int(os.environ.get("INPO_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 pipeline as a v-prediction model (SD 2.x's parameterisation)."""
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd2v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 Pick-a-Pic rows: 3 ties, 2 pairs with a broken image, repeated/unicode/empty captions."""
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "pickapic.parquet", num_pairs=24, seed=0)


def accelerate_launch(processes: int, *inpo_arguments: str) -> list[str]:
    """`accelerate launch --multi_gpu` of `python -m inpo_pipeline ...`: CPU ranks over gloo here."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(29500 + os.getpid() % 2000), "-m", "inpo_pipeline", *inpo_arguments]


def cli_env() -> dict[str, str]:
    """Environment for `python -m inpo_pipeline` subprocesses: one thread, no GPU."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONUNBUFFERED": "1"})
    return env


# A secret no test ever passes on: the S3 tests check that no object of a store holds it.
S3_SECRET = "inpo-test-secret-never-stored"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server, benchmarks/local_s3.py), credentials and the
    endpoint in the AWS_* environment; yields a function that makes a fresh bucket."""
    from benchmarks.local_s3 import local_s3

    with local_s3(access_key="inpo-test-key", secret=S3_SECRET) as new_bucket:
        yield new_bucket

"""Tests of ``inpo_pipeline.worlds.example``: the tiny tokenizer, tiny pipelines and toy datasets."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTokenizer, CLIPTokenizerFast

from inpo_pipeline.worlds.example import (
    BOS_TOKEN_ID,
    CAPTIONS,
    EOS_TOKEN_ID,
    PICKAPIC_SCHEMA,
    build_tiny_sd15,
    build_tiny_sdxl,
    build_tiny_tokenizer,
    write_manifest,
    write_pickapic_folder,
    write_pickapic_parquet,
)

UNICODE_CAPTION = "ein Hund im Schnee — 雪の中の犬 🐕"
TEXTS = [
    "",
    UNICODE_CAPTION,
    "🐕🐈\u200d⬛👩🏽\u200d🚀",  # ZWJ emoji sequences
    "  Tabs\tand\nNEWLINES  ",
    "\x00\x7f\u200b",
    "x" * 500,
]


def decode(data: bytes) -> Image.Image | None:
    """The fully decoded image, or None when PIL cannot open or load the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except OSError:  # includes UnidentifiedImageError and "image file is truncated"
        return None


# --------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(path)
    return path


def test_tokenizer_files(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 514
    assert vocab["<|startoftext|>"] == BOS_TOKEN_ID and vocab["<|endoftext|>"] == EOS_TOKEN_ID
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version: 0.2")


@pytest.mark.parametrize("tokenizer_class", [CLIPTokenizer, CLIPTokenizerFast])
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_any_text(tokenizer_dir: Path, tokenizer_class: type, text: str) -> None:
    tokenizer = tokenizer_class.from_pretrained(tokenizer_dir)
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    ids = tokenizer(text, truncation=True).input_ids
    assert ids[0] == BOS_TOKEN_ID and ids[-1] == EOS_TOKEN_ID
    assert EOS_TOKEN_ID not in ids[1:-1]  # the unknown token is EOS: no byte fell back to it
    assert max(ids) < 1000 and len(ids) <= 77
    padded = tokenizer(text, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(padded) == 77


def test_tokenizer_round_trips_unicode(tokenizer_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(UNICODE_CAPTION).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == UNICODE_CAPTION.lower()
    assert tokenizer("").input_ids == [BOS_TOKEN_ID, EOS_TOKEN_ID]


# --------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "pipe", seed=0)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


def _generate(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        [UNICODE_CAPTION, ""],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_sd15_loads_and_generates(sd15_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir)
    assert pipe.safety_checker is None
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder.config.bos_token_id == pipe.tokenizer.bos_token_id
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.steps_offset == 1
    images = _generate(pipe)
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_sdxl_loads_and_generates(sdxl_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.unet.config.cross_attention_dim == 64
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    images = _generate(pipe)
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("build", [build_tiny_sd15, build_tiny_sdxl])
def test_same_seed_gives_identical_weights(
    build: Callable[[Path, int], Path], tmp_path: Path
) -> None:
    first, again, other = (build(tmp_path / name, s) for name, s in [("a", 0), ("b", 0), ("c", 1)])
    weights = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert Path("unet/diffusion_pytorch_model.safetensors") in weights
    for rel in weights:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
    unet = Path("unet/diffusion_pytorch_model.safetensors")
    assert (first / unet).read_bytes() != (other / unet).read_bytes()


# --------------------------------------------------------------------------------- datasets


def test_pickapic_parquet(tmp_path: Path) -> None:
    info = write_pickapic_parquet(tmp_path / "train.parquet", num_pairs=24, seed=0)
    parquet = pq.ParquetFile(info["path"])
    assert parquet.schema_arrow == PICKAPIC_SCHEMA
    assert parquet.metadata.num_rows == info["num_rows"] == 24
    groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert groups == [8, 8, 8]
    rows = parquet.read().to_pylist()

    assert len(info["tie_rows"]) == 3 and len(info["broken_rows"]) == 2
    assert not set(info["tie_rows"]) & set(info["broken_rows"])
    assert sorted(info["kept_rows"] + info["tie_rows"] + info["broken_rows"]) == list(range(24))
    sizes, modes = set(), set()
    for i, row in enumerate(rows):
        labels = (row["label_0"], row["label_1"])
        decoded = [decode(row["jpg_0"]), decode(row["jpg_1"])]
        if i in info["tie_rows"]:
            assert labels == (0.5, 0.5) and row["best_image_uid"] == ""
        else:
            assert labels in {(1.0, 0.0), (0.0, 1.0)}
            winner = row["image_0_uid"] if labels[0] == 1.0 else row["image_1_uid"]
            assert row["best_image_uid"] == winner
        if i in info["broken_rows"]:
            assert sum(image is None for image in decoded) == 1
        else:
            assert all(image is not None for image in decoded)
            sizes |= {image.size for image in decoded}
            modes |= {image.mode for image in decoded}
    assert all(40 <= side <= 120 for size in sizes for side in size)
    assert any(w != h and w % 2 for w, h in sizes)
    assert {"RGB", "L", "RGBA"} <= modes

    captions = [row["caption"] for row in rows]
    assert len(set(captions)) == info["num_distinct_captions"] < len(captions)
    assert UNICODE_CAPTION in captions and "" in captions
    assert set(captions) <= set(CAPTIONS)
    again = write_pickapic_parquet(tmp_path / "again.parquet", num_pairs=24, seed=0)
    assert pq.read_table(again["path"]).equals(parquet.read())


def test_pickapic_folder(tmp_path: Path) -> None:
    infos = write_pickapic_folder(tmp_path, num_files=2, pairs_per_file=12, seed=0, ties=1)
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [info["num_rows"] for info in infos] == [12, 12]
    assert all(len(info["tie_rows"]) == 1 for info in infos)
    first, second = (pq.read_table(info["path"]) for info in infos)
    assert first.column("jpg_0").to_pylist() != second.column("jpg_0").to_pylist()


def test_pickapic_rejects_too_many_special_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_pickapic_parquet(tmp_path / "x.parquet", num_pairs=4, ties=3, broken=2)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_resolves(tmp_path: Path, fmt: str) -> None:
    info = write_manifest(tmp_path / f"pairs.{fmt}", num_pairs=8, seed=0, fmt=fmt)
    with info["path"].open(encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            rows = [json.loads(line) for line in handle]
        else:
            rows = list(csv.DictReader(handle))
    assert len(rows) == info["num_rows"] == 8
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert len(info["broken_rows"]) == 2 and info["tie_rows"] == []
    missing = 0
    for i, row in enumerate(rows):
        paths = [info["path"].parent / row[role] for role in ("chosen", "rejected")]
        assert all(p.parent == tmp_path / "images" for p in paths)
        readable = [p.is_file() and decode(p.read_bytes()) is not None for p in paths]
        missing += sum(not p.exists() for p in paths)
        assert all(readable) == (i in info["kept_rows"])
    assert missing == 1
    assert {row["prompt"] for row in rows} <= set(CAPTIONS)
    assert len({row["prompt"] for row in rows}) == info["num_distinct_captions"]

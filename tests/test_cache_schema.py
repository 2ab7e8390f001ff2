"""Tests of the cache store (``cache_schema.store``) against DESIGN §2's cache properties.

Small stores only (no models): 10 rows of (4, 8, 8) latents in shards of 4 rows (3 shards, the
last one partial), 5 prompts of (77, 32) hidden states in chunks of 2 (3 chunks, the last one
partial); an SD-type layout (no pooled embedding, no time ids) and an SDXL-type one (pooled 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_schema import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    CacheStore,
    RowPlan,
    ShardResult,
    StoreError,
    StoreLayout,
    decode_storage,
    encode_storage,
    round_to_storage,
)

TESTS_DIR = Path(__file__).resolve().parent

PROMPTS = ["", "a photo of a cat", "ünïcødé — 猫 🐱 café", "  spaces  and\nnewline", "x"]
SETTINGS = {
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "timesteps_per_pair": 2,
    "filter": {"drop_ties": True, "caption_column": "caption"},
    "nothing": None,
    "unicode": "déjà vu",
}
PROVENANCE = {"model": "tiny-sd", "weights_sha256": "ab" * 32, "seed": 1234, "created": "2024-01-01T00:00:00Z"}


def make_layout(kind: str = "sd", storage_dtype: str = "float16", **overrides) -> StoreLayout:
    values = dict(
        num_rows=10,
        latent_shape=(4, 8, 8),
        num_prompts=len(PROMPTS),
        text_shape=(77, 32),
        pooled_dim=None if kind == "sd" else 32,
        storage_dtype=storage_dtype,
        rows_per_shard=4,
        shards_per_window=2,
        prompts_per_chunk=2,
    )
    values.update(overrides)
    return StoreLayout(**values)


def make_plan(num_rows: int) -> RowPlan:
    rows = np.arange(num_rows)
    return RowPlan(
        timestep=(rows * 97 + 13) % 1000,
        prompt_index=rows % len(PROMPTS),
        # two draws per source pair; large, non-monotone source rows exercise int64 storage
        source_row=np.array([(10**10 + 7 * (num_rows - r // 2)) for r in rows], dtype=np.int64),
        draw=rows % 2,
    )


def new_store(path: Path, kind: str = "sd", storage_dtype: str = "float16", **overrides) -> CacheStore:
    layout = make_layout(kind, storage_dtype, **overrides)
    CacheStore.create(path, layout, SETTINGS, PROVENANCE, make_plan(layout.num_rows), PROMPTS)
    return CacheStore.open(path, mode="r+")


def make_result(layout: StoreLayout, shard: int, salt: int = 0) -> ShardResult:
    """Deterministic float32 values for one shard (also imported by the writer subprocesses)."""
    span = layout.shard_rows(shard)
    n = span.stop - span.start
    rng = np.random.default_rng([layout.num_rows, shard, salt])
    rows = np.arange(span.start, span.stop)

    def latent(scale: float) -> np.ndarray:
        return (rng.standard_normal((n, *layout.latent_shape)) * scale).astype(np.float32)

    sdxl = layout.pooled_dim is not None
    return ShardResult(
        latent_chosen=latent(1.0),
        latent_rejected=latent(3.0),
        target_chosen=latent(0.1),
        target_rejected=latent(40.0),
        reference_error_chosen=rng.random((n, 2)).astype(np.float32) + 0.1,
        reference_error_rejected=rng.random((n, 2)).astype(np.float32) + 0.2,
        valid=(rows % 3 != 2).astype(np.uint8),
        inversion_steps=(rows % 5 + 1).astype(np.int16),
        time_ids_chosen=rng.integers(0, 1024, (n, 6)).astype(np.float32) if sdxl else None,
        time_ids_rejected=rng.integers(0, 1024, (n, 6)).astype(np.float32) if sdxl else None,
        clean_chosen=latent(0.9) if layout.forward_arrays else None,
        clean_rejected=latent(1.1) if layout.forward_arrays else None,
        forward_error_chosen=rng.random((n, 2)).astype(np.float32) + 0.3 if layout.forward_arrays else None,
        forward_error_rejected=rng.random((n, 2)).astype(np.float32) + 0.4 if layout.forward_arrays else None,
        stats=np.array([6.0 * n, float(shard), 0.25 + shard], dtype=np.float64),
    )


def make_prompt_embeddings(layout: StoreLayout, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
    span = layout.prompt_chunk(chunk)
    n = span.stop - span.start
    rng = np.random.default_rng([99, chunk])
    text = (rng.standard_normal((n, *layout.text_shape)) * 2).astype(np.float32)
    pooled = None
    if layout.pooled_dim is not None:
        pooled = rng.standard_normal((n, layout.pooled_dim)).astype(np.float32)
    return text, pooled


def fill_prompts(store: CacheStore) -> None:
    for chunk in range(store.layout.num_prompt_chunks):
        store.write_prompt_chunk(chunk, *make_prompt_embeddings(store.layout, chunk))


def reference_round(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """The storage rounding computed independently of the store module."""
    values = np.asarray(values, dtype=np.float32)
    if storage_dtype == "float32":
        return values.copy()
    if storage_dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    import torch

    return torch.from_numpy(values.copy()).to(torch.bfloat16).to(torch.float32).numpy()


def expected_rows(layout: StoreLayout, results: dict[int, ShardResult], name: str) -> np.ndarray:
    parts = [getattr(results[s], name) for s in sorted(results)]
    return np.concatenate(parts)


# ---------------------------------------------------------------------- create / open


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_create_open_round_trip(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nested" / "store"
    layout = make_layout(kind, "bfloat16")
    plan = make_plan(layout.num_rows)
    CacheStore.create(path, layout, SETTINGS, PROVENANCE, plan, PROMPTS)
    assert CacheStore.exists(path)

    store = CacheStore.open(path)
    assert store.layout == layout
    assert store.layout.latent_shape == (4, 8, 8) and store.layout.text_shape == (77, 32)
    assert store.settings == SETTINGS
    assert store.provenance == PROVENANCE
    attrs = store.attributes
    assert attrs["state"] == "ready"
    assert attrs["schema"] == SCHEMA_NAME == "inpo.cache"
    assert attrs["schema_version"] == SCHEMA_VERSION == 3
    assert CacheStore.read_attributes(path)["state"] == "ready"

    back = store.read_plan(slice(None))
    np.testing.assert_array_equal(back.timestep, plan.timestep)
    np.testing.assert_array_equal(back.prompt_index, plan.prompt_index)
    np.testing.assert_array_equal(back.source_row, plan.source_row)
    np.testing.assert_array_equal(back.draw, plan.draw)
    assert back.source_row.dtype == np.int64 and back.source_row[0] == 10**10 + 70
    assert back.timestep.dtype == np.int32
    some = store.read_plan(np.array([9, 3]))
    np.testing.assert_array_equal(some.timestep, plan.timestep[[9, 3]])

    assert store.prompt_texts() == PROMPTS
    assert store.prompt_texts(np.array([2, 0])) == [PROMPTS[2], ""]
    assert store.prompt_texts(slice(3, 5)) == PROMPTS[3:5]

    # nothing written yet: no shard, no prompt chunk, no valid row
    assert store.shards_done().tolist() == [False, False, False]
    assert store.prompt_chunks_done().tolist() == [False, False, False]
    assert store.valid_rows().tolist() == []
    assert not store.is_complete()
    # SD stores have no pooled embedding and no time ids; SDXL stores have both
    assert ("pooled_embedding" in store.group["prompts"]) == (kind == "sdxl")
    assert ("time_ids_chosen" in store.group["rows"]) == (kind == "sdxl")


def test_update_provenance_is_persisted(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    store.update_provenance(finished="2024-02-02T00:00:00Z", rank_count=2)
    reopened = CacheStore.open(tmp_path / "store")
    assert reopened.provenance == {**PROVENANCE, "finished": "2024-02-02T00:00:00Z", "rank_count": 2}
    assert reopened.settings == SETTINGS


def test_create_rejects_bad_plan_and_prompts(tmp_path: Path) -> None:
    layout = make_layout()
    with pytest.raises(StoreError, match="does not match"):
        CacheStore.create(tmp_path / "a", layout, {}, {}, make_plan(9), PROMPTS)
    with pytest.raises(StoreError, match="does not match"):
        CacheStore.create(tmp_path / "b", layout, {}, {}, make_plan(10), PROMPTS[:4])
    with pytest.raises(StoreError, match="empty prompt"):
        CacheStore.create(tmp_path / "c", layout, {}, {}, make_plan(10), ["x", *PROMPTS[1:]])
    with pytest.raises(StoreError, match="differ in length"):
        RowPlan(np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3))


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no inpo cache store"):
        CacheStore.open(tmp_path / "does-not-exist")


def test_open_non_inpo_zarr_group(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "other"), mode="w")
    group.attrs["purpose"] = "something else"
    with pytest.raises(StoreError, match="not an inpo cache store"):
        CacheStore.open(tmp_path / "other")


def test_open_other_schema_version(tmp_path: Path) -> None:
    new_store(tmp_path / "store")
    zarr.open_group(str(tmp_path / "store"), mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=r"schema version 4.*re-create"):
        CacheStore.open(tmp_path / "store")


def test_open_interrupted_creation(tmp_path: Path) -> None:
    new_store(tmp_path / "store")
    zarr.open_group(str(tmp_path / "store"), mode="r+").attrs["state"] = "creating"
    assert CacheStore.read_attributes(tmp_path / "store")["state"] == "creating"
    with pytest.raises(StoreError, match="not fully created"):
        CacheStore.open(tmp_path / "store")


# ---------------------------------------------------------------------- shard writes and reads


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16", "float32"])
def test_write_then_read_rounds_to_storage(tmp_path: Path, kind: str, storage_dtype: str) -> None:
    store = new_store(tmp_path / "store", kind, storage_dtype)
    results = {shard: make_result(store.layout, shard) for shard in range(3)}
    for shard, result in results.items():
        store.write_shard(shard, result)

    batch = CacheStore.open(tmp_path / "store").read_rows(slice(None))
    np.testing.assert_array_equal(batch.indices, np.arange(10))
    for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected"):
        written = expected_rows(store.layout, results, name)
        got = getattr(batch, name)
        assert got.dtype == np.float32 and got.shape == (10, 4, 8, 8)
        np.testing.assert_array_equal(got, reference_round(written, storage_dtype))
        if storage_dtype == "float32":
            np.testing.assert_array_equal(got, written)
        else:
            # rounding really happened, and it is within half a unit of the last place
            assert (got != written).mean() > 0.9
            rel = 2.0**-11 if storage_dtype == "float16" else 2.0**-8
            assert np.all(np.abs(got - written) <= rel * np.abs(written) + 1e-7)
    for name in ("reference_error_chosen", "reference_error_rejected"):
        np.testing.assert_array_equal(getattr(batch, name), expected_rows(store.layout, results, name))
    if kind == "sdxl":
        for name in ("time_ids_chosen", "time_ids_rejected"):
            np.testing.assert_array_equal(getattr(batch, name), expected_rows(store.layout, results, name))
    else:
        assert batch.time_ids_chosen is None and batch.time_ids_rejected is None
    plan = make_plan(10)
    np.testing.assert_array_equal(batch.timestep, plan.timestep)
    np.testing.assert_array_equal(batch.prompt_index, plan.prompt_index)
    assert batch.valid.dtype == bool
    assert batch.valid.tolist() == [r % 3 != 2 for r in range(10)]


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_forward_arrays_round_trip_and_are_checked(tmp_path: Path, storage_dtype: str) -> None:
    """Schema v3's baseline inputs (DESIGN §1.7): x0 in the storage dtype, forward e_ref in float32."""
    path = tmp_path / "store"
    store = new_store(path, "sd", storage_dtype, forward_arrays=True)
    results = {shard: make_result(store.layout, shard) for shard in range(3)}
    for shard, result in results.items():
        store.write_shard(shard, result)
    fill_prompts(store)
    store = CacheStore.open(path)
    assert store.check_integrity() == []

    batch = store.read_rows(np.array([9, 0, 4]), inputs="forward")
    assert batch.latent_chosen is None and batch.reference_error_chosen is None  # inversion inputs unread
    for name in ("clean_chosen", "clean_rejected"):
        written = expected_rows(store.layout, results, name)[[9, 0, 4]]
        np.testing.assert_array_equal(getattr(batch, name), reference_round(written, storage_dtype))
    for name in ("forward_error_chosen", "forward_error_rejected"):
        np.testing.assert_array_equal(getattr(batch, name), expected_rows(store.layout, results, name)[[9, 0, 4]])
    np.testing.assert_array_equal(batch.source_row, make_plan(10).source_row[[9, 0, 4]])
    both = store.read_rows(np.array([3]), inputs="all")
    assert both.latent_chosen is not None and both.clean_chosen is not None

    target = path / "rows" / "clean_rejected" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x5A
    target.write_bytes(bytes(data))
    problems = CacheStore.open(path).check_integrity()
    assert len(problems) == 1 and problems[0].startswith("shard 1: rows/clean_rejected unreadable"), problems


def test_inversion_only_store_refuses_forward_reads_in_one_line(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    store.write_shard(0, make_result(store.layout, 0))
    with pytest.raises(StoreError) as caught:
        store.read_rows(np.arange(2), inputs="forward")
    assert "\n" not in str(caught.value) and "clean latents" in str(caught.value)
    with pytest.raises(ValueError):
        store.read_rows(np.arange(2), inputs="everything")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_read_rows_unsorted_with_repeats(tmp_path: Path, kind: str) -> None:
    store = new_store(tmp_path / "store", kind, "bfloat16")
    results = {shard: make_result(store.layout, shard) for shard in range(3)}
    for shard, result in results.items():
        store.write_shard(shard, result)
    full = store.read_rows(np.arange(10))

    indices = np.array([9, 0, 5, 5, 9, 2, 8, 0, 4])
    batch = store.read_rows(indices)
    np.testing.assert_array_equal(batch.indices, indices)
    for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected",
                 "reference_error_chosen", "reference_error_rejected", "timestep", "prompt_index", "valid"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(full, name)[indices], err_msg=name)
    # and against the written values directly, row by row
    written = expected_rows(store.layout, results, "latent_rejected")
    for position, row in enumerate(indices):
        np.testing.assert_array_equal(batch.latent_rejected[position], reference_round(written[row], "bfloat16"))
    assert batch.timestep.tolist() == [(r * 97 + 13) % 1000 for r in indices]
    if kind == "sdxl":
        np.testing.assert_array_equal(batch.time_ids_chosen, full.time_ids_chosen[indices])
    single = store.read_rows(np.array([7]))
    np.testing.assert_array_equal(single.latent_chosen[0], full.latent_chosen[7])


def test_partial_last_shard_flags_and_valid_rows(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    assert store.layout.num_shards == 3 and store.layout.shard_rows(2) == slice(8, 10)

    last = make_result(store.layout, 2)
    assert len(last.latent_chosen) == 2
    store.write_shard(2, last)
    assert store.shards_done().tolist() == [False, False, True]
    batch = store.read_rows(np.array([8, 9]))
    np.testing.assert_array_equal(batch.latent_chosen, reference_round(last.latent_chosen, "float16"))
    np.testing.assert_array_equal(batch.reference_error_chosen, last.reference_error_chosen)
    # rows 8, 9: row 8 is invalid (8 % 3 == 2)
    assert store.valid_rows().tolist() == [9]
    # rows of unwritten shards read as zeros and invalid
    unwritten = store.read_rows(np.array([0, 4]))
    assert not unwritten.valid.any() and not unwritten.latent_chosen.any()

    store.write_shard(0, make_result(store.layout, 0))
    assert store.shards_done().tolist() == [True, False, True]
    assert store.valid_rows().tolist() == [0, 1, 3, 9]
    assert not store.is_complete()

    store.write_shard(1, make_result(store.layout, 1))
    assert store.shards_done().tolist() == [True, True, True]
    assert store.valid_rows().tolist() == [0, 1, 3, 4, 6, 7, 9]
    # every shard, but not every prompt chunk
    assert not store.is_complete()
    store.write_prompt_chunk(0, *make_prompt_embeddings(store.layout, 0))
    store.write_prompt_chunk(2, *make_prompt_embeddings(store.layout, 2))
    assert store.prompt_chunks_done().tolist() == [True, False, True]
    assert not store.is_complete()
    store.write_prompt_chunk(1, *make_prompt_embeddings(store.layout, 1))
    assert store.is_complete()


def test_prompts_complete_but_one_shard_missing_is_not_complete(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store", "sdxl")
    fill_prompts(store)
    store.write_shard(0, make_result(store.layout, 0))
    store.write_shard(2, make_result(store.layout, 2))
    assert store.prompt_chunks_done().all()
    assert not store.is_complete()
    assert CacheStore.open(tmp_path / "store").summary()["complete"] is False


def test_failed_shard_write_is_not_marked_done(tmp_path: Path) -> None:
    """A write that stops half way (here: a bad array after the first one) leaves no done flag."""
    store = new_store(tmp_path / "store")
    result = make_result(store.layout, 1)
    result.latent_rejected = result.latent_rejected[:3]
    with pytest.raises(StoreError, match="shard 1: latent_rejected has 3 rows, expected 4"):
        store.write_shard(1, result)
    assert store.shards_done().tolist() == [False, False, False]
    assert store.valid_rows().tolist() == []
    assert store.summary()["rows_done"] == 0


def test_half_written_shard_is_not_read_as_finished(tmp_path: Path) -> None:
    """A writer killed after a shard's data but before its done flag: the shard counts for nothing."""
    store = new_store(tmp_path / "store")
    store.write_shard(0, make_result(store.layout, 0))
    half = make_result(store.layout, 1)
    half.valid[:] = 1
    half.latent_chosen[0, 0, 0, 0] = np.nan
    store.write_shard(1, half)
    store.group["done"]["shards"][1] = 0  # the flag never made it to disk
    store.group["rows"]["valid"][8:10] = 1  # shard 2: data only, no flag at all
    fill_prompts(store)

    assert store.shards_done().tolist() == [True, False, False]
    assert store.read_rows(np.arange(4, 10)).valid.all()
    assert store.valid_rows().tolist() == [0, 1, 3]
    summary = store.summary()
    assert (summary["rows_done"], summary["rows_valid"]) == (4, 3)
    assert summary["broken_source_rows"] == [int(make_plan(10).source_row[2])]
    assert summary["unet_row_evaluations"] == 24.0
    # the NaN in the unfinished shard is not judged; only the missing work is reported
    assert store.check_integrity() == ["incomplete: 2 of 3 shards not done"]
    assert not store.is_complete()


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    """Resume may redo an unfinished shard: the second write wins entirely."""
    store = new_store(tmp_path / "store", "sd", "float32")
    store.write_shard(1, make_result(store.layout, 1, salt=1))
    second = make_result(store.layout, 1, salt=2)
    store.write_shard(1, second)
    np.testing.assert_array_equal(store.read_rows(slice(4, 8)).target_rejected, second.target_rejected)
    np.testing.assert_array_equal(store.group["done"]["shard_stats"][1], second.stats)


# ---------------------------------------------------------------------- storage encoding


def _bf16_bits_torch(values: np.ndarray) -> np.ndarray:
    import torch

    as_bf16 = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return as_bf16.view(torch.int16).numpy().view(np.uint16)


def _bf16_test_values() -> np.ndarray:
    rng = np.random.default_rng(7)
    # random bit patterns over the whole float32 range (NaN payloads: see the test below)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    bits = bits[~np.isnan(bits.view(np.float32))]
    ties = []
    for upper in (0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x0000, 0x0001, 0x7F7E, 0x7F7F, 0x4049, 0xC2C8, 0x0080):
        # exactly half way (ties to even), just below and just above
        ties += [(upper << 16) | 0x8000, (upper << 16) | 0x7FFF, (upper << 16) | 0x8001]
    special = [
        0x00000000, 0x80000000,  # ±0
        0x7F800000, 0xFF800000,  # ±inf
        0x7F7FFFFF, 0xFF7FFFFF,  # ±max float32: rounds to ±inf
        0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF,  # subnormals
        0x00800000, 0x3F800000, 0xBF800000,
    ]
    picked = np.concatenate([bits, np.array(ties + special, dtype=np.uint32)]).view(np.float32)
    decimal = np.array([1.0, -1.0, 0.1, -0.1, 1e-30, -1e-30, 1e30, -1e30, 3.0e38, 1.00390625,
                        1.01171875, -1.00390625, 65504.0, 1e-42, 123456.789], dtype=np.float32)
    normal = (rng.standard_normal(5000) * 10.0 ** rng.integers(-20, 20, 5000)).astype(np.float32)
    return np.concatenate([picked, decimal, normal])


def test_bfloat16_encoding_matches_torch_bit_for_bit() -> None:
    import torch

    values = _bf16_test_values()
    encoded = encode_storage(values, "bfloat16")
    assert encoded.dtype == np.uint16
    np.testing.assert_array_equal(encoded, _bf16_bits_torch(values))

    decoded = decode_storage(encoded, "bfloat16")
    assert decoded.dtype == np.float32
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(round_to_storage(values, "bfloat16").view(np.uint32), expected.view(np.uint32))

    # hand-checked ties: 1 + 2^-8 is half way between 1 and 1 + 2^-7 -> even (1.0);
    # 1 + 3 * 2^-8 is half way between 1 + 2^-7 and 1 + 2^-6 -> even (1 + 2^-6)
    assert round_to_storage(np.array([1.00390625, 1.01171875, -1.00390625], np.float32), "bfloat16").tolist() == [
        1.0, 1.015625, -1.0]
    assert encode_storage(np.array([np.float32(3.4e38)]), "bfloat16")[0] == 0x7F80  # rounds up to inf
    # decoding is exact for every one of the 65536 bit patterns (NaNs stay NaN)
    all_bits = np.arange(2**16, dtype=np.uint16)
    decoded_all = decode_storage(all_bits, "bfloat16")
    torch_all = torch.from_numpy(all_bits.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(np.isnan(decoded_all), np.isnan(torch_all))
    finite = ~np.isnan(torch_all)
    np.testing.assert_array_equal(decoded_all[finite].view(np.uint32), torch_all[finite].view(np.uint32))


def test_bfloat16_encoding_of_common_nans() -> None:
    nans = np.array([0x7FC00000, 0xFFC00000], dtype=np.uint32).view(np.float32)
    assert np.isnan(round_to_storage(nans, "bfloat16")).all()
    assert np.isnan(round_to_storage(np.array([np.nan], np.float32), "bfloat16")).all()


def test_bfloat16_encoding_keeps_every_nan_a_nan() -> None:
    """NaN payloads whose rounding would carry into the exponent (-> inf or a signed zero)."""
    nans = np.array([0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FC00000, 0xFFC00000],
                    dtype=np.uint32)
    rng = np.random.default_rng(11)
    random_nans = (rng.integers(1, 2**23, 2000, dtype=np.uint64).astype(np.uint32) | 0x7F800000
                   | (rng.integers(0, 2, 2000, dtype=np.uint64).astype(np.uint32) << 31))
    values = np.concatenate([nans, random_nans]).view(np.float32)
    assert np.isnan(values).all()
    encoded = encode_storage(values, "bfloat16")
    # an all-ones exponent with a non-zero mantissa, sign kept
    assert ((encoded & 0x7F80) == 0x7F80).all() and ((encoded & 0x007F) != 0).all(), [hex(b) for b in encoded[:7]]
    np.testing.assert_array_equal(encoded >> 15, values.view(np.uint32) >> 31)
    assert np.isnan(round_to_storage(values, "bfloat16")).all()
    import torch

    assert torch.from_numpy(values.copy()).to(torch.bfloat16).isnan().all()


def test_float16_rounding_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([
        (rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 6, 5000)).astype(np.float32),
        np.array([0.0, -0.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65520.0, -65520.0, 6e-8, 2e-8, 1e-3,
                  np.inf, -np.inf], dtype=np.float32),
    ])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).astype(np.float32)
        got = round_to_storage(values, "float16")
        encoded = encode_storage(values, "float16")
    assert encoded.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert got[-10:-5].tolist() == [1.0, 1.0 + 2**-9, 65504.0, np.inf, -np.inf]
    # float32 storage is the identity
    np.testing.assert_array_equal(round_to_storage(values, "float32").view(np.uint32), values.view(np.uint32))


# ---------------------------------------------------------------------- prompts


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_prompt_embeddings_round_trip(tmp_path: Path, kind: str, storage_dtype: str) -> None:
    store = new_store(tmp_path / "store", kind, storage_dtype)
    layout = store.layout
    assert layout.prompt_chunk(2) == slice(4, 5)
    chunks = {chunk: make_prompt_embeddings(layout, chunk) for chunk in range(3)}
    # chunks written out of order; the last, partial chunk holds a single prompt
    for chunk in (2, 0, 1):
        store.write_prompt_chunk(chunk, *chunks[chunk])
    assert store.prompt_chunks_done().tolist() == [True, True, True]
    all_text = np.concatenate([chunks[c][0] for c in range(3)])
    assert all_text.shape == (5, 77, 32)

    indices = np.array([4, 0, 2, 2, 1, 4, 3])
    text, pooled = CacheStore.open(tmp_path / "store").read_prompt_embeddings(indices)
    assert text.dtype == np.float32 and text.shape == (7, 77, 32)
    np.testing.assert_array_equal(text, reference_round(all_text[indices], storage_dtype))
    assert (text != all_text[indices]).mean() > 0.9  # rounded, not the float32 input
    if kind == "sd":
        assert pooled is None
    else:
        all_pooled = np.concatenate([chunks[c][1] for c in range(3)])
        assert pooled.shape == (7, 32)
        np.testing.assert_array_equal(pooled, reference_round(all_pooled[indices], storage_dtype))
    one, _ = store.read_prompt_embeddings(np.array([3]))
    np.testing.assert_array_equal(one[0], reference_round(all_text[3], storage_dtype))


def test_unwritten_prompt_chunk_is_not_done(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store", "sdxl", "float32")
    text, pooled = make_prompt_embeddings(store.layout, 1)
    store.write_prompt_chunk(1, text, pooled)
    assert store.prompt_chunks_done().tolist() == [False, True, False]
    got_text, got_pooled = store.read_prompt_embeddings(np.array([3, 0, 2]))
    np.testing.assert_array_equal(got_text[[0, 2]], text[[1, 0]])
    np.testing.assert_array_equal(got_pooled[[0, 2]], pooled[[1, 0]])
    assert not got_text[1].any() and not got_pooled[1].any()


# ---------------------------------------------------------------------- checksums and integrity


def _complete_store(path: Path, kind: str = "sd", storage_dtype: str = "float16") -> CacheStore:
    store = new_store(path, kind, storage_dtype)
    for shard in range(store.layout.num_shards):
        store.write_shard(shard, make_result(store.layout, shard))
    fill_prompts(store)
    return store


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_intact_complete_store_has_no_problems(tmp_path: Path, kind: str) -> None:
    store = _complete_store(tmp_path / "store", kind)
    assert store.is_complete()
    seen: list[int] = []
    assert CacheStore.open(tmp_path / "store").check_integrity(progress=seen.append) == []
    assert seen == [0, 1, 2]


def test_incomplete_store_reports_missing_work(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    store.write_shard(1, make_result(store.layout, 1))
    store.write_prompt_chunk(0, *make_prompt_embeddings(store.layout, 0))
    assert store.check_integrity() == [
        "incomplete: 2 of 3 shards not done",
        "incomplete: 2 of 3 prompt chunks not done",
    ]


@pytest.mark.parametrize("where", ["chunk data", "shard index"])
def test_flipped_byte_is_detected(tmp_path: Path, where: str) -> None:
    path = tmp_path / "store"
    _complete_store(path)
    shard_file = path / "rows" / "latent_chosen" / "c" / "1" / "0" / "0" / "0"
    assert shard_file.is_file()
    data = bytearray(shard_file.read_bytes())
    offset = len(data) // 3 if where == "chunk data" else len(data) - 10
    data[offset] ^= 0x5A
    shard_file.write_bytes(bytes(data))

    store = CacheStore.open(path)
    with pytest.raises(Exception, match="(?i)checksum"):
        store.read_rows(np.arange(4, 8))
    # other shards still read
    assert store.read_rows(np.array([0, 9])).latent_chosen.shape == (2, 4, 8, 8)
    problems = store.check_integrity()
    assert len(problems) == 1, problems
    assert problems[0].startswith("shard 1: rows/latent_chosen unreadable"), problems
    assert "checksum" in problems[0].lower()


@pytest.mark.parametrize("relative", ["rows/timestep/c/1", "prompts/text/c/0", "rows/valid/c/1", "done/shards/c/1"])
def test_flipped_byte_in_other_arrays_is_reported(tmp_path: Path, relative: str) -> None:
    path = tmp_path / "store"
    _complete_store(path)
    target = path / relative
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))
    problems = CacheStore.open(path).check_integrity()
    assert any("unreadable" in problem for problem in problems), problems


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16", "float32"])
def test_nan_in_finished_shard_is_reported(tmp_path: Path, storage_dtype: str) -> None:
    store = new_store(tmp_path / "store", "sdxl", storage_dtype)
    for shard in range(3):
        result = make_result(store.layout, shard)
        if shard == 1:
            result.latent_rejected[2, 1, 3, 4] = np.nan
            result.reference_error_chosen[0, 1] = np.inf
        if shard == 2:
            result.time_ids_rejected[1, 0] = np.nan
        store.write_shard(shard, result)
    fill_prompts(store)
    assert np.isnan(store.read_rows(np.array([6])).latent_rejected[0, 1, 3, 4])
    assert store.check_integrity() == [
        "shard 1: rows/latent_rejected holds NaN or Inf",
        "shard 1: rows/reference_error_chosen holds NaN or Inf",
        "shard 2: rows/time_ids_rejected holds NaN or Inf",
    ]


def test_negative_step_count_in_valid_row_is_reported(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    for shard in range(3):
        result = make_result(store.layout, shard)
        if shard == 0:
            result.inversion_steps[2] = -1  # row 2 is invalid: not a problem
        if shard == 2:
            result.inversion_steps[1] = -3  # row 9 is valid: a problem
        store.write_shard(shard, result)
    fill_prompts(store)
    assert store.check_integrity() == ["shard 2: negative inversion step count"]


# ---------------------------------------------------------------------- several writers

_WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from test_cache_schema import make_result
    from cache_schema import CacheStore
    path, shards, go, ready, log_path = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
    store = CacheStore.open(path, mode="r+")
    open(ready, "w").close()
    deadline = time.time() + 60
    while not os.path.exists(go):
        if time.time() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    log = []
    for shard in shards:
        start = time.time()
        store.write_shard(shard, make_result(store.layout, shard, salt=shard % 2))
        log.append([shard, start, time.time()])
    with open(log_path, "w") as handle:
        json.dump(log, handle)
    """
)


def test_two_processes_fill_disjoint_shards_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "store"
    # 20 shards of 2 rows (the last one has 1); SDXL so every row array is in play. The writers
    # own alternate shards, so at any moment they write neighbouring shards of the same arrays.
    store = new_store(path, "sdxl", "bfloat16", num_rows=39, rows_per_shard=2, shards_per_window=4)
    layout = store.layout
    assert layout.num_shards == 20
    owners = {"even": list(range(0, 20, 2)), "odd": list(range(1, 20, 2))}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    go = tmp_path / "go"
    procs = {}
    for name, shards in owners.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(TESTS_DIR), str(path), json.dumps(shards), str(go),
             str(tmp_path / f"ready-{name}"), str(tmp_path / f"log-{name}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready-{name}").exists() for name in owners):
            assert time.time() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs.values()), [p.stdout.read() for p in procs.values()]
            time.sleep(0.005)
        go.touch()
        for name, proc in procs.items():
            output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, output.decode()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    logs = {name: json.loads((tmp_path / f"log-{name}.json").read_text()) for name in owners}
    assert [entry[0] for entry in logs["even"]] == owners["even"]
    assert [entry[0] for entry in logs["odd"]] == owners["odd"]
    # the two writers were active at the same time
    even_span = (logs["even"][0][1], logs["even"][-1][2])
    odd_span = (logs["odd"][0][1], logs["odd"][-1][2])
    assert even_span[0] < odd_span[1] and odd_span[0] < even_span[1], logs

    reader = CacheStore.open(path)
    assert reader.shards_done().all() and reader.shards_done().shape == (20,)
    batch = reader.read_rows(slice(None))
    stats = np.asarray(reader.group["done"]["shard_stats"][:])
    for shard in range(20):
        span = layout.shard_rows(shard)
        expected = make_result(layout, shard, salt=shard % 2)
        for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected"):
            np.testing.assert_array_equal(getattr(batch, name)[span],
                                          reference_round(getattr(expected, name), "bfloat16"), err_msg=f"{shard} {name}")
        for name in ("reference_error_chosen", "reference_error_rejected", "time_ids_chosen", "time_ids_rejected"):
            np.testing.assert_array_equal(getattr(batch, name)[span], getattr(expected, name), err_msg=f"{shard} {name}")
        np.testing.assert_array_equal(batch.valid[span], expected.valid.astype(bool))
        np.testing.assert_array_equal(np.asarray(reader.group["rows"]["inversion_steps"][span]), expected.inversion_steps)
        np.testing.assert_array_equal(stats[shard], expected.stats)
    assert reader.check_integrity() == ["incomplete: 3 of 3 prompt chunks not done"]


def _object_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"}


def test_done_flags_and_shard_data_are_separate_objects(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = new_store(path, "sdxl")
    flags = path / "done" / "shards" / "c"
    assert not flags.exists() or list(flags.iterdir()) == []
    store.write_shard(2, make_result(store.layout, 2))
    store.write_shard(0, make_result(store.layout, 0))
    assert sorted(p.name for p in flags.iterdir()) == ["0", "2"]
    assert all((flags / name).is_file() for name in ("0", "2"))
    assert store.shards_done().tolist() == [True, False, True]

    # writing shard 1 creates new objects only: nothing that shards 0 and 2 wrote changes
    before = _object_files(path)
    store.write_shard(1, make_result(store.layout, 1))
    after = _object_files(path)
    for key, content in before.items():
        assert after[key] == content, f"writing shard 1 changed {key}"
    new = set(after) - set(before)
    assert "done/shards/c/1" in new and "done/shard_stats/c/1/0" in new
    assert "rows/latent_chosen/c/1/0/0/0" in new and "rows/valid/c/1" in new
    # shard 1's own objects, one per row array plus its done flag and stats, and nothing else
    assert new == {
        *(f"rows/{name}/c/1/0/0/0" for name in ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected")),
        *(f"rows/{name}/c/1/0" for name in ("reference_error_chosen", "reference_error_rejected",
                                             "time_ids_chosen", "time_ids_rejected")),
        "rows/valid/c/1", "rows/inversion_steps/c/1", "done/shards/c/1", "done/shard_stats/c/1/0",
    }
    assert sorted(p.name for p in flags.iterdir()) == ["0", "1", "2"]


# ---------------------------------------------------------------------- summary


@pytest.mark.parametrize(
    ("kind", "storage_dtype", "raw_bytes"),
    [
        # 4 latents x 256 values x 2 B + 2 errors x 2 x 4 B + u1 + i2 + i4 + i4 + i8 + i2
        # + the v2 plan arrays caption_index (i4) and flip (2 x u1)
        ("sd", "float16", 4 * 256 * 2 + 16 + 21 + 6),
        ("sd", "bfloat16", 2091),
        # + 2 time-id arrays x 6 x 4 B, 4-byte latents
        ("sdxl", "float32", 4 * 256 * 4 + 16 + 48 + 21 + 6),
        # v3's baseline inputs: + 2 clean latents x 256 x 2 B + 2 forward errors x 2 x 4 B
        ("sd-forward", "float16", 6 * 256 * 2 + 32 + 21 + 6),
    ],
)
def test_summary(tmp_path: Path, kind: str, storage_dtype: str, raw_bytes: int) -> None:
    forward = kind.endswith("-forward")
    store = new_store(tmp_path / "store", kind.removesuffix("-forward"), storage_dtype, forward_arrays=forward)
    plan = make_plan(10)
    # valid = row % 3 != 2: invalid rows 2, 5, 8; force rows 0 and 1 (one source pair) invalid too
    first = make_result(store.layout, 0)
    first.valid[:2] = 0
    store.write_shard(0, first)
    store.write_shard(2, make_result(store.layout, 2))
    store.write_prompt_chunk(1, *make_prompt_embeddings(store.layout, 1))

    summary = CacheStore.open(tmp_path / "store").summary()
    assert summary["rows"] == 10
    assert summary["rows_done"] == 6  # shard 0 (4 rows) + shard 2 (2 rows)
    assert summary["rows_valid"] == 2  # rows 3 and 9
    # invalid rows in finished shards: 0, 1, 2, 8 (row 5 is in the unfinished shard 1)
    broken = sorted(set(plan.source_row[[0, 1, 2, 8]].tolist()))
    assert len(broken) == 3
    assert summary["broken_source_rows"] == broken
    assert summary["broken_pairs"] == 3
    assert summary["shards_done"] == 2 and summary["shards"] == 3
    assert summary["prompt_chunks_done"] == 1 and summary["prompt_chunks"] == 3
    assert summary["prompts"] == 5
    assert summary["complete"] is False
    assert summary["bytes_on_disk"] > 0
    assert summary["bytes_on_disk"] == store.bytes_on_disk()
    assert summary["bytes_per_row"] == pytest.approx(summary["bytes_on_disk"] / 10)
    assert summary["raw_bytes_per_row"] == raw_bytes == store.raw_bytes_per_row()
    assert summary["unet_row_evaluations"] == 6.0 * 4 + 6.0 * 2
    assert summary["padded_row_evaluations"] == 0.0 + 2.0
    assert summary["inversion_seconds"] == pytest.approx(0.25 + 2.25)
    assert summary["schema"] == "inpo.cache v3"
    assert summary["layout"] == store.layout.to_json()
    assert summary["settings"] == SETTINGS and summary["provenance"] == PROVENANCE
    json.dumps(summary)  # `inpo cache info --json` must be able to print it


def test_summary_of_empty_store(tmp_path: Path) -> None:
    summary = new_store(tmp_path / "store").summary()
    assert (summary["rows_done"], summary["rows_valid"], summary["broken_source_rows"]) == (0, 0, [])
    assert summary["unet_row_evaluations"] == 0.0 and summary["inversion_seconds"] == 0.0


# ---------------------------------------------------------------------- remove


def test_remove_refuses_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not an inpo cache store"):
        CacheStore.remove(folder)
    assert (folder / "thesis.txt").read_text() == "do not delete"

    zarr.open_group(str(tmp_path / "other-zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="refusing to delete"):
        CacheStore.remove(tmp_path / "other-zarr")
    assert (tmp_path / "other-zarr" / "zarr.json").is_file()

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreError):
        CacheStore.remove(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "x"


def test_remove_store_empty_folder_and_missing_path(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    store.write_shard(0, make_result(store.layout, 0))
    CacheStore.remove(tmp_path / "store")
    assert not (tmp_path / "store").exists()

    # a store whose creation was interrupted is still recognisably a store
    new_store(tmp_path / "half")
    zarr.open_group(str(tmp_path / "half"), mode="r+").attrs["state"] = "creating"
    CacheStore.remove(tmp_path / "half")
    assert not (tmp_path / "half").exists()

    (tmp_path / "empty").mkdir()
    CacheStore.remove(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()

    CacheStore.remove(tmp_path / "never-existed")  # nothing to do, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    ("overrides", "keyword"),
    [
        ({"storage_dtype": "int8"}, "storage dtype"),
        ({"storage_dtype": "bf16"}, "storage dtype"),
        ({"num_rows": 0}, "at least one row"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"shards_per_window": 0}, "shards_per_window"),
        ({"prompts_per_chunk": 0}, "prompts_per_chunk"),
    ],
)
def test_layout_validation(overrides: dict, keyword: str) -> None:
    with pytest.raises(StoreError, match=keyword):
        make_layout(**overrides)


def test_layout_arithmetic() -> None:
    layout = make_layout()  # 10 rows, 4 per shard, 2 shards per window, 5 prompts, 2 per chunk
    assert layout.num_shards == 3
    assert [layout.shard_rows(s) for s in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert layout.rows_per_window == 8
    assert layout.num_windows == 2
    assert layout.window_shards(0) == range(0, 2)
    assert layout.window_shards(1) == range(2, 3)
    assert layout.num_prompt_chunks == 3
    assert [layout.prompt_chunk(c) for c in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 5)]

    exact = make_layout(num_rows=8, num_prompts=4)
    assert exact.num_shards == 2 and exact.shard_rows(1) == slice(4, 8)
    assert exact.num_windows == 1 and exact.window_shards(0) == range(0, 2)
    assert exact.num_prompt_chunks == 2 and exact.prompt_chunk(1) == slice(2, 4)

    one = make_layout(num_rows=1, num_prompts=1, rows_per_shard=64, shards_per_window=16, prompts_per_chunk=256)
    assert (one.num_shards, one.num_windows, one.num_prompt_chunks) == (1, 1, 1)
    assert one.shard_rows(0) == slice(0, 1) and one.prompt_chunk(0) == slice(0, 1)

    many = make_layout(num_rows=1000, rows_per_shard=64, shards_per_window=4)
    assert many.num_shards == 16 and many.num_windows == 4
    assert many.shard_rows(15) == slice(960, 1000)
    assert many.window_shards(3) == range(12, 16)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_layout_json_round_trip(kind: str) -> None:
    layout = make_layout(kind, "bfloat16")
    data = json.loads(json.dumps(layout.to_json()))
    assert data["latent_shape"] == [4, 8, 8]
    assert data["pooled_dim"] == (None if kind == "sd" else 32)
    assert StoreLayout.from_json(data) == layout


# ---------------------------------------------------------------------- lost objects
@pytest.mark.parametrize("relative", [
    "rows/latent_chosen/c/1/0/0/0", "rows/valid/c/1", "rows/reference_error_rejected/c/1/0",
    "rows/draw/c/1", "prompts/embedding/c/0/0/0",
])
def test_a_lost_object_is_reported_and_never_read_as_zeros(tmp_path: Path, relative: str) -> None:
    """zarr reads a missing chunk as its fill value; a finished store must say it is missing."""
    path = tmp_path / "store"
    _complete_store(path)
    store = CacheStore.open(path)
    assert store.every_chunk_written and store.check_integrity() == []
    (path / relative).unlink()
    problems = CacheStore.open(path).check_integrity()
    assert len(problems) == 1 and relative in problems[0] and "missing" in problems[0], problems
    reopened = CacheStore.open(path)
    with pytest.raises(StoreError) as caught:
        if relative.startswith("prompts"):
            reopened.read_prompt_embeddings(np.arange(2))
        else:
            reopened.read_rows(np.arange(4, 8))
    message = str(caught.value)
    assert "\n" not in message and relative in message and "copy the store again" in message
    # rows of intact shards still read
    if not relative.startswith("prompts"):
        assert reopened.read_rows(np.array([0, 9])).latent_chosen.shape == (2, 4, 8, 8)


def test_all_zero_chunks_are_written_so_none_is_missing(tmp_path: Path) -> None:
    """A shard whose rows are all invalid (valid = 0, draw = 0, flip = 0) still has every object."""
    path = tmp_path / "store"
    store = new_store(path)
    result = make_result(store.layout, 1)
    result.valid[:] = 0
    store.write_shard(1, result)
    for name in ("valid", "draw", "flip"):
        assert (path / "rows" / name / "c" / "1").exists() or (path / "rows" / name / "c" / "1" / "0").exists(), name
    assert CacheStore.open(path).missing_shard_objects(1) == []


def test_where_no_store_can_be_made_is_said_without_asking_a_server(tmp_path):
    from cache_schema.locations import LocalFolder, ObjectPrefix, locate

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert CacheStore.target_problem(a_file) == f"{a_file} is a file; give the path of a store folder"
    assert CacheStore.target_problem(tmp_path / "new.zarr") is None
    keyed = CacheStore.target_problem("s3://AKIA:secret@bucket/store.zarr")
    assert keyed is not None and "keys do not go in the URL" in keyed and "secret" not in keyed
    assert isinstance(locate("s3://bucket/a/b.zarr/"), ObjectPrefix) and str(locate("s3://bucket/a/b.zarr/")) == "s3://bucket/a/b.zarr"
    assert isinstance(locate(f"file://{tmp_path}/x.zarr"), LocalFolder)
    assert CacheStore.identity(tmp_path / "." / "x.zarr") == str((tmp_path / "x.zarr").resolve())
    assert CacheStore.identity("s3://bucket/x.zarr") == "s3://bucket/x.zarr"

"""Stage two's data order and reads: inpo_pipeline/data/batches.py on stores of both chunk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from cache_schema import CacheStore, StoreError, StoreLayout
from inpo_pipeline.data.batches import BatchSchedule, MicroBatches, denoiser_inputs, micro_batch_loader, read_micro_batch
from tests.test_cache_schema import PROMPTS, PROVENANCE, SETTINGS, fill_prompts, make_layout, make_plan, make_result

# usable rows with gaps, as a store with undecodable pairs has them
ROWS = np.setdiff1d(np.arange(0, 700), np.arange(5, 700, 37))


def schedules(order: str, ranks: int, batch: int = 4, buffer: int = 64) -> list[BatchSchedule]:
    return [BatchSchedule(ROWS, batch, ranks, rank, seed=5, prompt_dropout=0.2, order=order, block_rows=16,
                          shuffle_buffer=buffer) for rank in range(ranks)]


@pytest.mark.parametrize("order", ["blocks", "rows"])
@pytest.mark.parametrize("ranks", [1, 3])
def test_every_usable_row_once_per_epoch_and_ranks_disjoint(order, ranks):
    ranked = schedules(order, ranks)
    per_epoch = ranked[0].micro_batches_per_epoch
    assert per_epoch == len(ROWS) // (4 * ranks)
    epochs = []
    for epoch in range(3):
        by_rank = [np.concatenate([s.micro_batch(epoch * per_epoch + m)[0] for m in range(per_epoch)]) for s in ranked]
        seen = np.concatenate(by_rank)
        assert len(seen) == len(np.unique(seen)) == per_epoch * 4 * ranks  # no row twice, ranks disjoint
        assert np.isin(seen, ROWS).all()
        assert len(ROWS) - len(seen) < 4 * ranks  # only the last partial global batch is left out
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])
    # 681 rows leave 1 (or 9) out per epoch; the left-out rows change, so every row is trained on
    assert len(ROWS) == 681 and len(np.unique(np.concatenate(epochs))) == len(ROWS)


def test_the_order_is_a_pure_function_of_seed_epoch_index_and_rank():
    first, second = schedules("blocks", 2)[1], schedules("blocks", 2)[1]
    per_epoch = first.micro_batches_per_epoch
    indices = [5 * per_epoch + 3, 0, 2 * per_epoch + 7, 5 * per_epoch + 3, 1]
    for index in indices:  # out of order, as a resumed run asks
        rows, dropped, epoch = first.micro_batch(index)
        again, dropped_again, _ = second.micro_batch(index)
        np.testing.assert_array_equal(rows, again)
        np.testing.assert_array_equal(dropped, dropped_again)
        assert epoch == index // per_epoch
    other_seed = BatchSchedule(ROWS, 4, 2, 1, seed=6, prompt_dropout=0.2, block_rows=16, shuffle_buffer=32)
    assert not np.array_equal(other_seed.micro_batch(0)[0], first.micro_batch(0)[0])


def test_a_read_group_touches_few_blocks_in_block_order_and_most_in_row_order():
    def blocks_touched(schedule: BatchSchedule) -> int:
        group = schedule.group_of(0)
        rows = np.concatenate([schedule.micro_batch(index)[0] for index in group])
        return len(np.unique(rows // 16))

    blocks, rows = schedules("blocks", 2, buffer=128)[0], schedules("rows", 2, buffer=128)[0]
    assert blocks.group_of(0) == range(0, 16) and blocks.group_of(17) == range(16, 32)
    # a window is 128 usable rows = 8 blocks of 16 (each over at most 2 stored chunks of 16 rows,
    # gaps included); one rank's 64 rows cluster in about half of them
    assert blocks_touched(blocks) <= 12
    assert blocks_touched(rows) >= 25


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = BatchSchedule(ROWS, 4, 1, 0, seed=5, prompt_dropout=0.0, block_rows=16, shuffle_buffer=64)
    two = [BatchSchedule(ROWS, 2, 2, rank, seed=5, prompt_dropout=0.0, block_rows=16, shuffle_buffer=64)
           for rank in range(2)]
    assert one.micro_batches_per_epoch == two[0].micro_batches_per_epoch
    for index in range(2 * one.micro_batches_per_epoch):
        together = np.sort(np.concatenate([rank.micro_batch(index)[0] for rank in two]))
        np.testing.assert_array_equal(together, np.sort(one.micro_batch(index)[0]))


def test_groups_do_not_cross_epochs():
    schedule = schedules("blocks", 1, buffer=4 * 7)[0]  # groups of 7 micro-batches
    per_epoch = schedule.micro_batches_per_epoch
    last = schedule.group_of(per_epoch - 1)
    assert last.stop == per_epoch and schedule.group_of(per_epoch).start == per_epoch


def trainable_store(path: Path, compress_latents: bool = False, **layout_fields) -> CacheStore:
    settings = {**SETTINGS, "family": "sd15", "scheduler": dict(DDIMScheduler().config), "seed": 3}
    layout = make_layout(num_rows=40, forward_arrays=True, rows_per_shard=8, prompts_per_chunk=2, **layout_fields)
    CacheStore.create(path, layout, settings, PROVENANCE, make_plan(layout.num_rows), PROMPTS,
                      compress_latents=compress_latents)
    store = CacheStore.open(path, mode="r+")
    for shard in range(layout.num_shards):
        store.write_shard(shard, make_result(layout, shard))
    fill_prompts(store)
    return CacheStore.open(path)


LAYOUTS = {"current": {}, "zstd": {"compress_latents": True},
           "earliest": {"rows_per_chunk": 1, "prompt_shards": True, "compress_latents": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("objective", ["inpo", "diffusion-dpo"])
def test_group_reads_equal_one_read_per_micro_batch_bit_for_bit(tmp_path, layout, objective):
    store = trainable_store(tmp_path / "store", **LAYOUTS[layout])
    rows = store.valid_rows()
    schedule = BatchSchedule(rows, 3, 1, 0, seed=1, prompt_dropout=0.3, block_rows=8, shuffle_buffer=9)  # groups of 3
    count = 2 * schedule.micro_batches_per_epoch + 1
    loaded = list(micro_batch_loader(MicroBatches(str(store.path), schedule, 2, count, objective), 0))
    assert len(loaded) == count
    for index, batch in enumerate(loaded, start=2):
        picked, dropped, _ = schedule.micro_batch(index)
        single = read_micro_batch(CacheStore.open(store.path), picked, dropped, objective)
        assert batch.keys() == single.keys()
        for name, value in single.items():
            assert torch.equal(batch[name], value), name


@pytest.mark.parametrize("objective", ["inpo", "diffusion-dpo", "sft"])
def test_every_layout_hands_the_trainer_the_same_micro_batches(tmp_path, objective):
    """Raw objects read by the store itself (current), zstd through zarr's codecs, one row per
    chunk: the same bits, in the same order, for every micro-batch of two epochs."""
    stores = {name: trainable_store(tmp_path / name, **fields) for name, fields in LAYOUTS.items()}
    schedule = BatchSchedule(stores["current"].valid_rows(), 4, 1, 0, seed=2, prompt_dropout=0.25, block_rows=8,
                             shuffle_buffer=12)
    count = 2 * schedule.micro_batches_per_epoch
    loaded = {name: list(micro_batch_loader(MicroBatches(str(store.path), schedule, 0, count, objective), 0))
              for name, store in stores.items()}
    for index in range(count):
        reference = loaded["current"][index]
        assert reference["latents"].shape[0] == 4 * (1 if objective == "sft" else 2)
        for name in ("zstd", "earliest"):
            assert reference.keys() == loaded[name][index].keys()
            for key, value in reference.items():
                assert torch.equal(value, loaded[name][index][key]), (name, index, key)


def test_new_stores_keep_latents_and_text_as_raw_bytes_and_a_checksum(tmp_path):
    store = trainable_store(tmp_path / "store")
    rows = store.group["rows"]
    for name in ("latent_chosen", "target_rejected", "clean_chosen"):
        assert [type(codec).__name__ for codec in rows[name].metadata.codecs] == ["BytesCodec", "Crc32cCodec"]
    assert [type(codec).__name__ for codec in store.group["prompts"]["embedding"].metadata.codecs] == [
        "BytesCodec", "Crc32cCodec"]
    zipped = trainable_store(tmp_path / "zipped", compress_latents=True)
    assert "ZstdCodec" in [type(codec).__name__ for codec in zipped.group["rows"]["latent_chosen"].metadata.codecs]
    # a raw object is the chunk's bytes and their crc32c: 8 rows of 4×8×8 float16, plus 4 bytes
    shard_file = store.path / "rows" / "latent_chosen" / "c" / "2" / "0" / "0" / "0"
    assert shard_file.stat().st_size == 8 * 4 * 8 * 8 * 2 + 4


@pytest.mark.parametrize("row_by_row_bytes", [0, 10**9])
def test_gather_rows_scatters_any_order_with_repeats_into_the_callers_positions(tmp_path, monkeypatch, row_by_row_bytes):
    import cache_schema.store as store_module

    monkeypatch.setattr(store_module, "ROW_BY_ROW_BYTES", row_by_row_bytes)  # both copy paths
    store = trainable_store(tmp_path / "store")
    everything = store.read_rows(np.arange(40), decode=False).latent_rejected
    wanted = np.array([17, 3, 3, 39, 0, 24, 17])
    out = np.full((10, 4, 8, 8), 7, dtype=np.float16)
    positions = np.array([9, 0, 4, 1, 8, 2, 5])
    store.gather_rows("latent_rejected", wanted, out, positions)
    np.testing.assert_array_equal(out[positions], everything[wanted])
    assert (out[[3, 6, 7]] == 7).all()  # positions not asked for are left alone
    text = np.empty((5, 77, 32), dtype=np.float16)
    store.gather_prompt_embeddings(np.array([3, 0, 3, 1, 2]), text, None)
    expected, _ = store.read_prompt_embeddings(np.array([3, 0, 3, 1, 2]), decode=False)
    np.testing.assert_array_equal(text, expected)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_raw_object_fails_the_read_in_one_line(tmp_path, damage):
    store = trainable_store(tmp_path / "store")
    shard_file = store.path / "rows" / "target_chosen" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-100:]
    shard_file.write_bytes(bytes(data))
    reader = CacheStore.open(store.path)
    message = "fails its crc32c checksum" if damage == "flipped byte" else "holds 4000 bytes, expected 4100"
    with pytest.raises(StoreError, match=message) as raised:
        read_micro_batch(reader, np.array([8, 9]), np.zeros(2, dtype=bool), "inpo")
    assert "\n" not in str(raised.value) and "rows/target_chosen/c/1/0/0/0" in str(raised.value)
    assert read_micro_batch(reader, np.array([0, 17]), np.zeros(2, dtype=bool), "inpo")["latents"].shape == (4, 4, 8, 8)


def test_new_stores_keep_one_chunk_per_shard_and_one_object_per_prompt(tmp_path):
    store = trainable_store(tmp_path / "store")
    assert store.layout.rows_per_chunk == 8 and not store.layout.prompt_shards
    assert store.group["rows"]["latent_chosen"].chunks == (8, 4, 8, 8)
    assert store.group["prompts"]["embedding"].chunks == (1, 77, 32)
    assert store.missing_prompt_objects(0) == []
    lost = store.path / "prompts" / "embedding" / "c" / "1" / "0" / "0"
    lost.unlink()
    assert store.missing_prompt_objects(0) == ["prompts/embedding/c/1/0/0"]


def test_layout_fields_of_earlier_stores_and_bad_chunking():
    written_before = make_layout().to_json()
    del written_before["rows_per_chunk"], written_before["prompt_shards"]
    earlier = StoreLayout.from_json(written_before)
    assert earlier.rows_per_chunk == 1 and earlier.prompt_shards
    assert make_layout(rows_per_shard=4).rows_per_chunk == 4
    with pytest.raises(Exception, match="rows_per_chunk 3 must divide rows_per_shard 4"):
        make_layout(rows_per_shard=4, rows_per_chunk=3)


def test_the_prompt_cache_serves_the_same_values_within_its_budget(tmp_path):
    store = trainable_store(tmp_path / "store")
    uncached = CacheStore.open(store.path)
    uncached.prompt_cache_bytes = 0
    one_prompt = 77 * 32 * 2
    store.prompt_cache_bytes = 2 * one_prompt
    for indices in ([1, 2, 1], [3, 1, 0, 3], [2, 2], [0, 1, 2, 3]):
        text, _pooled = store.read_prompt_embeddings(np.array(indices))
        expected, _ = uncached.read_prompt_embeddings(np.array(indices))
        np.testing.assert_array_equal(text, expected)
        assert store._prompt_cache_used <= 2 * one_prompt
    assert len(store._prompt_cache) == 2


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16", "float32"])
def test_the_loader_hands_over_stored_values_that_become_exactly_the_float32_ones(tmp_path, storage_dtype):
    store = trainable_store(tmp_path / "store", storage_dtype=storage_dtype)
    rows = store.valid_rows()[:5]
    dropped = np.array([False, True, False, False, True])
    batch = read_micro_batch(store, rows, dropped, "inpo")
    assert batch["latents"].dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                      "float32": torch.float32}[storage_dtype]
    assert batch["text"].shape[0] == len(rows)  # each prompt once per pair
    inputs = denoiser_inputs(batch)
    decoded = store.read_rows(rows)
    np.testing.assert_array_equal(inputs["latents"].numpy(), np.concatenate([decoded.latent_chosen, decoded.latent_rejected]))
    np.testing.assert_array_equal(inputs["targets"].numpy(), np.concatenate([decoded.target_chosen, decoded.target_rejected]))
    text, _ = store.read_prompt_embeddings(np.where(dropped, 0, decoded.prompt_index))
    np.testing.assert_array_equal(inputs["text"].numpy(), np.concatenate([text, text]))
    assert inputs["latents"].dtype == inputs["text"].dtype == torch.float32


def test_spawned_workers_hand_over_the_same_micro_batches_from_shared_memory(tmp_path):
    """Workers gather a group straight into shared memory; the trainer gets the same bits, in the
    same order, as reading in its own process (float16 and bfloat16 stores)."""
    for storage_dtype in ("float16", "bfloat16"):
        store = trainable_store(tmp_path / storage_dtype, storage_dtype=storage_dtype)
        schedule = BatchSchedule(store.valid_rows(), 4, 1, 0, seed=4, prompt_dropout=0.25, block_rows=8,
                                 shuffle_buffer=8)
        count = schedule.micro_batches_per_epoch + 2
        own = list(micro_batch_loader(MicroBatches(str(store.path), schedule, 0, count), 0))
        spawned = list(micro_batch_loader(MicroBatches(str(store.path), schedule, 0, count), 2))
        assert len(own) == len(spawned) == count
        assert spawned[0]["latents"].dtype == (torch.bfloat16 if storage_dtype == "bfloat16" else torch.float16)
        for index, (mine, theirs) in enumerate(zip(own, spawned)):
            assert mine.keys() == theirs.keys()
            for key, value in mine.items():
                assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), (storage_dtype, index, key)


@pytest.mark.parametrize("objective", ["inpo", "diffusion-dpo"])
def test_a_workers_shared_slots_are_reused_once_handed_back_and_never_while_held(tmp_path, objective):
    """A worker reads each group into shared slots that the trainer hands back once nothing refers
    to them: streamed through, 13 groups take at most 3 groups' worth of slots (fresh shared memory
    per group would take 13); held — every micro-batch, or one view of one — the values stay the
    ones read, however many groups follow, also after a pass left early."""
    store = trainable_store(tmp_path / "store")
    schedule = BatchSchedule(store.valid_rows(), 1, 1, 0, seed=6, prompt_dropout=0.25, block_rows=8,
                             shuffle_buffer=2)  # groups of 2 micro-batches
    count = schedule.micro_batches_per_epoch // 2 * 2  # whole groups, of one shape
    assert count >= 26
    reference = [read_micro_batch(store, *schedule.micro_batch(index)[:2], objective) for index in range(count)]
    loader = micro_batch_loader(MicroBatches(str(store.path), schedule, 0, count, objective), 1)  # new workers each pass

    def same(batch: dict, index: int) -> None:
        assert batch.keys() == reference[index].keys()
        for key, value in reference[index].items():
            assert torch.equal(batch[key], value), (index, key)

    for index, batch in enumerate(loader):
        same(batch, index)
    slots_per_group = 3  # latents, targets, text
    assert 2 * slots_per_group <= loader.slots_mapped <= 3 * slots_per_group

    kept_view = None
    for index, batch in enumerate(loader):
        same(batch, index)
        if index == 3:
            kept_view = batch["latents"][1:]  # a view outlives its micro-batch
    assert torch.equal(kept_view, reference[3]["latents"][1:])

    for index, batch in enumerate(loader):  # a pass left early leaves nothing behind
        if index == 2:
            break
    held = list(loader)
    assert len(held) == count
    for index, batch in enumerate(held):
        same(batch, index)


def test_the_prompt_cache_is_not_filled_by_a_call_that_leaves_out_the_pooled_embeddings(tmp_path):
    from tests.test_cache_schema import _complete_store

    path = tmp_path / "sdxl"
    _complete_store(path, "sdxl")
    store, uncached = CacheStore.open(path), CacheStore.open(path)
    uncached.prompt_cache_bytes = 0
    wanted = np.array([3, 1, 2])
    text = np.empty((3, *store.layout.text_shape), dtype=np.float16)
    store.gather_prompt_embeddings(wanted, text, None)
    assert len(store._prompt_cache) == 0
    got_text, got_pooled = store.read_prompt_embeddings(wanted)
    want_text, want_pooled = uncached.read_prompt_embeddings(wanted)
    np.testing.assert_array_equal(got_text, want_text)
    np.testing.assert_array_equal(got_pooled, want_pooled)
    np.testing.assert_array_equal(text, uncached.read_prompt_embeddings(wanted, decode=False)[0])


def test_an_index_outside_an_array_fails_in_one_line_instead_of_reading_zeros(tmp_path):
    store = trainable_store(tmp_path / "store")
    number = store.layout.num_prompts
    with pytest.raises(StoreError, match=f"prompts has {number} entries; index {number} is outside them"):
        store.read_prompt_embeddings(np.array([1, number]))
    with pytest.raises(StoreError, match="rows has 40 entries; index 40 is outside them"):
        store.read_rows(np.array([3, 40]))
    with pytest.raises(StoreError, match="rows has 40 entries; index 41 is outside them"):
        read_micro_batch(store, np.array([0, 41]), np.zeros(2, dtype=bool))
    with pytest.raises(StoreError, match="rows/timestep has 40 entries; index -1 is outside them"):
        store.gather_rows("timestep", np.array([-1]), np.empty(1, dtype=np.int32))


def test_the_array_pool_hands_an_array_out_again_only_once_nothing_holds_it():
    from inpo_pipeline.data.batches import _ArrayPool

    pool = _ArrayPool(limit_bytes=2**20, min_bytes=0)
    kind = np.dtype(np.float16)

    def address(array: np.ndarray) -> int:
        return array.__array_interface__["data"][0]

    first = pool.empty((4, 8), kind)
    first_at = address(first)
    held = torch.from_numpy(first)[1:]  # a view of a tensor of it, as a micro-batch is
    del first
    second = pool.empty((4, 8), kind)
    assert address(second) != first_at  # the first is still held through the view
    second_at = address(second)
    del second
    assert address(pool.empty((4, 8), kind)) == second_at  # let go of: handed out again
    del held
    again = [pool.empty((4, 8), kind) for _ in range(2)]
    assert sorted(address(array) for array in again) == sorted([first_at, second_at])
    assert len(pool.held[((4, 8), kind.str)]) == 2
    assert address(pool.empty((4, 8), kind)) not in (first_at, second_at)  # both held by `again`


def test_a_store_behind_another_zarr_store_reads_the_same_bits_and_checks_them(tmp_path):
    """Stores that are not local folders (fsspec's, as s3:// would be) are asked for all objects
    of a read in one concurrent call; the bits and the checksum refusal are the same."""
    import warnings

    import zarr
    from zarr.storage import FsspecStore

    local = trainable_store(tmp_path / "store")

    def through_fsspec() -> CacheStore:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fsspec's local filesystem is wrapped to be asynchronous
            store = FsspecStore.from_url(f"file://{local.path}", read_only=True)
        return CacheStore(local.path, zarr.open_group(store, mode="r"), local.layout)

    remote = through_fsspec()
    assert type(remote.group.store).__name__ == "FsspecStore"
    rows, dropped = np.array([3, 17, 9, 30, 17]), np.array([False, True, False, False, True])
    for objective in ("inpo", "diffusion-dpo"):
        expected, got = read_micro_batch(local, rows, dropped, objective), read_micro_batch(remote, rows, dropped, objective)
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    shard_file = local.path / "rows" / "latent_rejected" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[7] ^= 0x10
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="rows/latent_rejected/c/2/0/0/0 fails its crc32c checksum"):
        read_micro_batch(through_fsspec(), np.array([16]), np.zeros(1, dtype=bool))

"""The inpo cache store: a Zarr v3 group whose layout only this module knows.

Layout (schema ``inpo.cache`` v3; v1 stores, which lack the two v2 plan arrays, and v2 stores,
which lack the v3 baseline arrays, stay readable)::

    STORE/
      zarr.json                     group attributes: schema, state, layout, settings, provenance
      rows/latent_chosen            (N, C, h, w)  x_t of the preferred image     storage dtype
      rows/latent_rejected          (N, C, h, w)  x_t of the rejected image      storage dtype
      rows/target_chosen            (N, C, h, w)  τ_t of the preferred image     storage dtype
      rows/target_rejected          (N, C, h, w)  τ_t of the rejected image      storage dtype
      rows/reference_error_chosen   (N, 2) f32    e_ref [caption, empty prompt]
      rows/reference_error_rejected (N, 2) f32
      rows/clean_chosen             (N, C, h, w)  v3, baselines: x0 of the preferred image   storage dtype
      rows/clean_rejected           (N, C, h, w)  v3, baselines: x0 of the rejected image    storage dtype
      rows/forward_error_chosen     (N, 2) f32    v3, baselines: mean‖ε_ref(x_fwd, t, c) − ε‖² [caption, empty]
      rows/forward_error_rejected   (N, 2) f32    v3, baselines (x_fwd = √ā·x0 + √(1−ā)·ε, ε regenerated from the seed)
      rows/time_ids_chosen          (N, 6) f32    SDXL only: orig h, w, crop top, left, target h, w
      rows/time_ids_rejected        (N, 6) f32    SDXL only
      rows/sigma                    (N,) f32      plan, flow stores only: σ (timestep holds round(1000·σ))
      rows/valid                    (N,) u1       0 = the pair's image could not be decoded
      rows/inversion_steps          (N,) i2       UNet steps the inversion took
      rows/timestep                 (N,) i4       plan: t (written at creation)
      rows/prompt_index             (N,) i4       plan: index into prompts/ (0 = empty prompt)
      rows/source_row               (N,) i8       plan: row of the source data set
      rows/draw                     (N,) i2       plan: which of the pair's K timestep draws
      rows/caption_index            (N,) i4       plan (v2): the pair's caption (prompt_index is 0 for
                                                  rows dropped to "" before inversion)
      rows/flip                     (N, 2) u1     plan (v2): chosen/rejected image flipped horizontally
      prompts/text                  (P,) str      prompt 0 is the empty prompt
      prompts/embedding             (P, L, D)     text-encoder hidden states, storage dtype
      prompts/pooled_embedding      (P, D2)       SDXL, SD3, FLUX (pooled text embedding)
      done/shards                   (S,) u1       1 = row shard complete (one object per shard)
      done/prompt_chunks            (Q,) u1       1 = prompt chunk complete
      done/shard_stats              (S, 3) f8     UNet row-evaluations, padded evaluations, seconds
                                                  (a diagnostic: the only array that is not data; its
                                                  seconds differ between runs, so "bit-identical"
                                                  stores are identical in every other array)

Chunking: each row array keeps one object per row shard; inside it a chunk holds
``layout.rows_per_chunk`` rows (new stores: the whole shard, so a block of rows costs one
request and one checksum per array; stores of an earlier layout: one row per chunk). New stores
keep latents and text embeddings uncompressed (zstd saves ≈ 8 % on fp16 latents and costs ≈ 10×
the read CPU): such an object is its raw little-endian bytes and their crc32c, which the reader
fetches and checks itself (`_read_objects`); every other array goes through zarr's codecs.

Write discipline (several processes, one store): every array is created at its final size
before any writer starts; a writer owns whole shards and writes each one in a single
assignment per array; the shard's ``done`` flag, which lives in its own object, is set only
after all of its data is written. Group attributes are written by the creating process, and
the completion time by a process that finds the store complete. Uncoordinated creators build in
their own hidden siblings (`create(creator=…)`); the first rename wins.
Every chunk carries a crc32c checksum, so a flipped byte fails on read.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncio
import google_crc32c  # zarr's own crc32c implementation, used here to check raw objects
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from cache_schema.locations import ROOT_METADATA, LocalFolder, ObjectPrefix, StoreError, attributes_of, locate

SCHEMA_NAME = "inpo.cache"
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

LATENT_ARRAYS = ("latent_chosen", "latent_rejected", "target_chosen", "target_rejected")
ERROR_ARRAYS = ("reference_error_chosen", "reference_error_rejected")
TIME_ID_ARRAYS = ("time_ids_chosen", "time_ids_rejected")
PLAN_ARRAYS = ("timestep", "prompt_index", "source_row", "draw")
PLAN_ARRAYS_V2 = ("caption_index", "flip")
CLEAN_ARRAYS = ("clean_chosen", "clean_rejected")
FORWARD_ERROR_ARRAYS = ("forward_error_chosen", "forward_error_rejected")
ROW_INPUTS = ("inversion", "forward", "all")
STORAGE_DTYPES = ("float16", "float32", "bfloat16")
TIME_IDS_WIDTH = 6
SHARD_STATS_WIDTH = 3
# zarr skips chunks equal to the fill value; every chunk is written instead, so that a missing
# object can only mean a lost one (stores with the attribute below were written this way)
EVERY_CHUNK = {"array.write_empty_chunks": True}
EVERY_CHUNK_ATTRIBUTE = "every_chunk_written"
DIAGNOSTIC_ARRAYS = ("done/shard_stats",)  # measurements of the run (seconds), not data
PROMPT_CACHE_BYTES = 256 * 2**20  # per open store (each loader worker opens its own)
ROW_BY_ROW_BYTES = 4096  # rows at least this large are gathered one copy each (see `_scatter`)


@dataclass(frozen=True)
class StoreLayout:
    """The geometry of a store: fixed at creation, recorded in its attributes."""

    num_rows: int
    latent_shape: tuple[int, int, int]
    num_prompts: int
    text_shape: tuple[int, int]
    pooled_dim: int | None
    storage_dtype: str = "float16"
    forward_arrays: bool = False  # x0 and forward-noised e_ref for the baselines (DESIGN §1.7)
    size_conditioning: bool | None = None  # SDXL time ids per image; None (older stores): = pooled_dim is set
    sigma: bool = False  # a flow store: σ per row (DESIGN §1.8)
    rows_per_shard: int = 64
    shards_per_window: int = 16
    prompts_per_chunk: int = 256
    # rows per stored chunk of the per-row arrays; None: a whole shard, so a reader decodes and
    # checksums a shard's rows in one codec call per array (stores of an earlier layout: 1)
    rows_per_chunk: int | None = None
    # prompt embeddings: one object per prompt (new stores: zarr reads one prompt of a shard
    # 3–20× slower than one object, measured in docs/benchmarks.md) or one per prompt chunk
    prompt_shards: bool = False

    def __post_init__(self) -> None:
        if self.size_conditioning is None:
            object.__setattr__(self, "size_conditioning", self.pooled_dim is not None)
        if self.rows_per_chunk is None:
            object.__setattr__(self, "rows_per_chunk", self.rows_per_shard)
        if self.storage_dtype not in STORAGE_DTYPES:
            raise StoreError(f"storage dtype {self.storage_dtype!r} is not one of {STORAGE_DTYPES}")
        if self.num_rows < 1:
            raise StoreError("a store needs at least one row")
        for name in ("rows_per_shard", "shards_per_window", "prompts_per_chunk", "rows_per_chunk"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be at least 1")
        if self.rows_per_shard % int(self.rows_per_chunk) != 0:
            # a chunk shared by two shards would be written by two writers
            raise StoreError(f"rows_per_chunk {self.rows_per_chunk} must divide rows_per_shard {self.rows_per_shard}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    @property
    def num_windows(self) -> int:
        return -(-self.num_shards // self.shards_per_window)

    @property
    def num_prompt_chunks(self) -> int:
        return -(-self.num_prompts // self.prompts_per_chunk)

    @property
    def rows_per_window(self) -> int:
        return self.rows_per_shard * self.shards_per_window

    def shard_rows(self, shard: int) -> slice:
        start = shard * self.rows_per_shard
        return slice(start, min(start + self.rows_per_shard, self.num_rows))

    def window_shards(self, window: int) -> range:
        start = window * self.shards_per_window
        return range(start, min(start + self.shards_per_window, self.num_shards))

    def prompt_chunk(self, chunk: int) -> slice:
        start = chunk * self.prompts_per_chunk
        return slice(start, min(start + self.prompts_per_chunk, self.num_prompts))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        data["text_shape"] = list(self.text_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreLayout:
        values = dict(data)
        values["latent_shape"] = tuple(values["latent_shape"])
        values["text_shape"] = tuple(values["text_shape"])
        values.setdefault("rows_per_chunk", 1)  # stores written before the fields kept one row per chunk
        values.setdefault("prompt_shards", True)  # and one shard object per prompt chunk
        return cls(**values)


@dataclass
class RowPlan:
    """What every row will hold before any inversion runs, in store row order."""

    timestep: np.ndarray
    prompt_index: np.ndarray
    source_row: np.ndarray
    draw: np.ndarray
    caption_index: np.ndarray | None = None  # None: the prompt_index (no prompt was dropped)
    flip: np.ndarray | None = None  # (rows, 2) uint8; None: no image flipped
    sigma: np.ndarray | None = None  # (rows,) float32 σ of a flow store; None: a DDPM store

    def __post_init__(self) -> None:
        if self.caption_index is None:
            self.caption_index = np.asarray(self.prompt_index).copy()
        if self.flip is None:
            self.flip = np.zeros((len(self.timestep), 2), dtype=np.uint8)
        lengths = {len(self.timestep), len(self.prompt_index), len(self.source_row), len(self.draw),
                   len(self.caption_index), len(self.flip)}
        if len(lengths) != 1:
            raise StoreError("row plan arrays differ in length")


@dataclass
class ShardResult:
    """Everything a writer computes for one shard, in that shard's row order."""

    latent_chosen: np.ndarray
    latent_rejected: np.ndarray
    target_chosen: np.ndarray
    target_rejected: np.ndarray
    reference_error_chosen: np.ndarray
    reference_error_rejected: np.ndarray
    valid: np.ndarray
    inversion_steps: np.ndarray
    time_ids_chosen: np.ndarray | None = None
    time_ids_rejected: np.ndarray | None = None
    clean_chosen: np.ndarray | None = None
    clean_rejected: np.ndarray | None = None
    forward_error_chosen: np.ndarray | None = None
    forward_error_rejected: np.ndarray | None = None
    stats: np.ndarray = field(default_factory=lambda: np.zeros(SHARD_STATS_WIDTH))


@dataclass
class RowBatch:
    """Rows read back for training or checking (float32 tensors' worth of numpy arrays)."""

    indices: np.ndarray
    latent_chosen: np.ndarray | None
    latent_rejected: np.ndarray | None
    target_chosen: np.ndarray | None
    target_rejected: np.ndarray | None
    reference_error_chosen: np.ndarray | None
    reference_error_rejected: np.ndarray | None
    timestep: np.ndarray
    prompt_index: np.ndarray
    valid: np.ndarray
    time_ids_chosen: np.ndarray | None
    time_ids_rejected: np.ndarray | None
    source_row: np.ndarray | None = None
    draw: np.ndarray | None = None
    clean_chosen: np.ndarray | None = None
    clean_rejected: np.ndarray | None = None
    forward_error_chosen: np.ndarray | None = None
    forward_error_rejected: np.ndarray | None = None
    sigma: np.ndarray | None = None  # flow stores: σ per row

    def subset(self, positions: np.ndarray) -> RowBatch:
        """The rows at `positions` of this batch (a block read once, handed out in micro-batches)."""
        picked = {name: None if value is None else value[positions] for name, value in vars(self).items()}
        return RowBatch(**picked)


def _zarr_dtype(storage_dtype: str) -> str:
    # numpy has no bfloat16: such stores keep the raw 16 bits in uint16.
    return "uint16" if storage_dtype == "bfloat16" else storage_dtype


def encode_storage(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 values -> the array stored on disk (bfloat16 is kept as its 16 raw bits)."""
    values = np.asarray(values, dtype=np.float32)
    if storage_dtype == "bfloat16":
        bits = values.view(np.uint32)
        # round to nearest even, as torch does when casting to bfloat16
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # a NaN must stay a NaN: rounding its payload could carry into the exponent
        quiet_nan = (bits >> 16) | 0x0040
        return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)
    return values.astype(storage_dtype)


def decode_storage(stored: np.ndarray, storage_dtype: str) -> np.ndarray:
    """The array on disk -> float32 values."""
    if storage_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def round_to_storage(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 values exactly as they will read back from the store."""
    return decode_storage(encode_storage(values, storage_dtype), storage_dtype)


def _codecs(compress: bool) -> list[Any]:
    # crc32c goes last so the checksum covers the bytes as written to disk
    return ([ZstdCodec(level=1)] if compress else []) + [Crc32cCodec()]


def _check_bounds(path: str, indices: np.ndarray, length: int) -> None:
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= length):
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise StoreError(f"{path} has {length} entries; index {bad} is outside them (a damaged plan array?): "
                         "run `inpo cache verify` on the store")


def _scatter(out: np.ndarray | Sequence[np.ndarray], positions: np.ndarray, values: np.ndarray,
             rows: np.ndarray | None = None) -> None:
    """out[positions[j]] = values[rows[j]] (rows default 0, 1, …), where `out` is one array or a
    list of equally long ones read as their concatenation."""
    if len(positions) == 0:
        return
    parts = [out] if isinstance(out, np.ndarray) else list(out)
    length = len(parts[0])
    rows = np.arange(len(positions)) if rows is None else rows
    if parts[0][0].nbytes >= ROW_BY_ROW_BYTES:
        # a fancy-indexed assignment copies twice (into a temporary, then into out); rows of
        # kilobytes are cheaper copied once each
        for position, row in zip(positions.tolist(), rows.tolist()):
            parts[position // length][position % length] = values[row]
        return
    if len(parts) == 1:
        parts[0][positions] = values[rows]
        return
    part_of = positions // length
    for part in np.unique(part_of).tolist():
        mine = part_of == part
        parts[part][positions[mine] % length] = values[rows[mine]]


def _store_objects(memory: MemoryStore) -> dict[str, bytes]:
    """Every object of an in-memory zarr store, key -> bytes (a new object-store store's upload)."""
    prototype = default_buffer_prototype()

    async def collect() -> dict[str, bytes]:
        keys = [key async for key in memory.list()]
        values = await asyncio.gather(*[memory.get(key, prototype=prototype) for key in keys])
        return {key: value.to_bytes() for key, value in zip(keys, values) if value is not None}

    return sync(collect())


class CacheStore:
    """An open inpo cache store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: str | Path | LocalFolder | ObjectPrefix, group: zarr.Group, layout: StoreLayout) -> None:
        self.location = path if isinstance(path, (LocalFolder, ObjectPrefix)) else locate(path)
        # where the store is: a local store's Path, an object store's URL
        self.path: Path | str = self.location.url if self.location.remote else self.location.path
        self.group = group
        self.layout = layout
        self._arrays: dict[str, Any] = {}  # opened array handles (opening one reads its metadata)
        self._whole: dict[str, np.ndarray] = {}  # small row arrays held whole (see _small_row_array)
        self._frozen: bool | None = None
        # decoded prompt embeddings kept by a reader of a complete store (a prompt is one object,
        # ≈ 0.5 ms each through zarr): prompt index -> (text, pooled), least recently used first
        self.prompt_cache_bytes = PROMPT_CACHE_BYTES
        # prompt index -> slot of the arrays below, least recently used first
        self._prompt_cache: OrderedDict[int, int] = OrderedDict()
        self._prompt_slots: tuple[np.ndarray, np.ndarray | None] | None = None
        self._plain: dict[str, bool] = {}  # array path -> its objects are raw bytes + crc32c
        self._object_buffer: np.ndarray | None = None  # one local object at a time (`_read_objects`)

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            group, name = path.split("/")
            self._arrays[path] = self.group[group][name]
        return self._arrays[path]

    def _is_frozen(self) -> bool:
        """Open read-only on a complete store: nothing it reads can change any more."""
        if self._frozen is None:
            self._frozen = bool(self.group.read_only) and self.is_complete()
        return self._frozen

    def _small_row_array(self, name: str) -> np.ndarray | None:
        """A small per-row array (plan, flags, errors: a few bytes per row) held whole in memory,
        once the store is complete and open read-only — nothing can change it then; a reader of
        blocks would otherwise pay a codec call per chunk for a few bytes. None otherwise."""
        if not self._is_frozen():
            return None
        if name not in self._whole:
            self._whole[name] = np.asarray(self._array(f"rows/{name}")[...])
        return self._whole[name]

    # ------------------------------------------------------------------ creation / opening
    @staticmethod
    def exists(path: str | Path) -> bool:
        return locate(path).exists(ROOT_METADATA)

    @staticmethod
    def occupied(path: str | Path) -> bool:
        """Anything at all at `path` (a store, a leftover, or something else)."""
        return locate(path).occupied()

    @staticmethod
    def interrupted_creation(path: str | Path) -> bool:
        """An object-store prefix holding only a store's objects without its root: a creation that
        was killed before it finished (creating again uploads the same objects over them)."""
        location = locate(path)
        return location.remote and not location.exists(ROOT_METADATA) and location.only_store_objects()

    @staticmethod
    def target_problem(path: str | Path) -> str | None:
        """Why no store can be made at `path` as it is now (a file, a URL with keys in it); None
        where one can. Asks no server."""
        try:
            return locate(path).problem_as_target()
        except StoreError as error:
            return str(error)

    @staticmethod
    def prepare_target(path: str | Path) -> None:
        """Make a local store's parent folders (OSError for the caller) or reach an object store's
        bucket; refuse, in one line, an unwritable folder or a missing bucket."""
        locate(path).prepare()

    @staticmethod
    def identity(path: str | Path) -> str:
        """The store's place as a run records it: an absolute local path, or the URL."""
        return locate(path).identity

    @staticmethod
    def remove(path: str | Path) -> None:
        """Delete a store, but only something that is recognisably an inpo store (or empty, or an
        interrupted creation on an object store)."""
        location = locate(path)
        if not location.occupied():
            location.remove()
            return
        if attributes_of(location).get("schema") != SCHEMA_NAME and not location.only_store_objects():
            raise StoreError(f"refusing to delete {location}: it is not an inpo cache store; choose another --out")
        location.remove()

    @classmethod
    def create(
        cls,
        path: str | Path,
        layout: StoreLayout,
        settings: dict[str, Any],
        provenance: dict[str, Any],
        plan: RowPlan,
        prompts: Sequence[str],
        *,
        compress_latents: bool = False,
        creator: str | None = None,
    ) -> CacheStore:
        """Create every array at its final size and write the row plan; one process only.

        A local store is built in a hidden sibling folder and renamed into place when complete,
        so a creation killed at any moment leaves either no store or a whole one (a leftover
        sibling is removed by the next creation). An object store has no rename: the store is
        built in memory and uploaded with its root metadata last, so a killed creation leaves
        objects without a root, which the next creation uploads over. Uncoordinated creators of
        the same store (the workers of `inpo invert --worker`) each pass their own `creator` name;
        a whole store another creator put in place first is returned instead (its settings are
        the caller's to compare). On an object store two creators may upload at once: they
        upload the same objects, and neither ever writes a shard's data or done flag, so a
        worker already filling the store loses nothing. `compress_latents` zstd-compresses the
        latents and text embeddings as earlier stores did (≈ 8 % smaller, ≈ 10× the read CPU).
        """
        location = locate(path)
        if len(plan.timestep) != layout.num_rows or len(prompts) != layout.num_prompts:
            raise StoreError("row plan or prompt list does not match the layout")
        if (plan.sigma is not None) != layout.sigma:
            raise StoreError("a flow store's plan needs σ per row, and only a flow store's plan has it")
        if prompts[0] != "":
            raise StoreError("prompt 0 must be the empty prompt")
        if not cls.interrupted_creation(path) and location.occupied():
            if creator is not None and cls._whole_store_at(path):
                return cls.open(path, mode="r+")  # put in place by another creator
            raise StoreError(f"{location} exists; remove it first (only an inpo store may be removed)")
        attributes = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "state": "creating",
            "layout": layout.to_json(),
            "settings": settings,
            "provenance": provenance,
            EVERY_CHUNK_ATTRIBUTE: True,
        }
        if isinstance(location, ObjectPrefix):
            memory = MemoryStore()
            cls._build(zarr.open_group(memory, mode="w"), attributes, layout, plan, prompts, compress_latents)
            location.upload(_store_objects(memory))
            return cls.open(path, mode="r+")
        folder = location.path
        building = folder.with_name(f".{folder.name}.creating" + (f"-{creator}" if creator is not None else ""))
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(building, ignore_errors=True)
            cls._build(zarr.open_group(str(building), mode="w"), attributes, layout, plan, prompts, compress_latents)
            os.replace(building, folder)
        except OSError as error:
            shutil.rmtree(building, ignore_errors=True)
            if creator is not None and cls._whole_store_at(path):
                return cls.open(path, mode="r+")  # another creator renamed its store into place first
            raise StoreError(f"cannot create the store at {folder}: {error.strerror or error}") from error
        return cls(folder, zarr.open_group(str(folder), mode="r+"), layout)

    @classmethod
    def _build(cls, group: zarr.Group, attributes: dict[str, Any], layout: StoreLayout, plan: RowPlan,
               prompts: Sequence[str], compress_latents: bool) -> None:
        """Every array of a new store in `group`, the plan written, the state set to ready last."""
        group.attrs.update(attributes)
        cls._create_arrays(group, layout, compress_latents)
        with zarr.config.set(EVERY_CHUNK):
            rows = group["rows"]
            rows["timestep"][:] = plan.timestep.astype(np.int32)
            rows["prompt_index"][:] = plan.prompt_index.astype(np.int32)
            rows["source_row"][:] = plan.source_row.astype(np.int64)
            rows["draw"][:] = plan.draw.astype(np.int16)
            rows["caption_index"][:] = np.asarray(plan.caption_index).astype(np.int32)
            rows["flip"][:] = np.asarray(plan.flip).astype(np.uint8)
            if layout.sigma:
                rows["sigma"][:] = np.asarray(plan.sigma).astype(np.float32)
            group["prompts"]["text"][:] = np.array(list(prompts), dtype=object)
        group.attrs["state"] = "ready"

    @classmethod
    def _whole_store_at(cls, path: str | Path) -> bool:
        return cls.exists(path) and cls.read_attributes(path).get("state") == "ready"

    @classmethod
    def remove_stale_builds(cls, path: str | Path) -> None:
        """Remove the build siblings of killed local creators once a whole store is in place. Safe
        even while another creator still builds: its rename then fails and `create` returns this
        store. (An object store's creation leaves no sibling.)"""
        location = locate(path)
        if isinstance(location, LocalFolder) and cls._whole_store_at(path):
            for sibling in location.path.parent.glob(f".{location.path.name}.creating*"):
                shutil.rmtree(sibling, ignore_errors=True)

    @staticmethod
    def _create_arrays(group: zarr.Group, layout: StoreLayout, compress_latents: bool) -> None:
        n, r = layout.num_rows, layout.rows_per_shard
        latent = layout.latent_shape
        dtype = _zarr_dtype(layout.storage_dtype)
        rows = group.create_group("rows")

        k = int(layout.rows_per_chunk)

        def row_array(name: str, tail: tuple[int, ...], array_dtype: str, zipped: bool) -> None:
            # one object per row shard either way (a writer's unit); inside it, chunks of k rows:
            # the trainer reads blocks of rows, so one chunk per shard is one codec call per read
            grid: dict[str, Any] = {"chunks": (r, *tail)} if k == r else {"chunks": (k, *tail), "shards": (r, *tail)}
            rows.create_array(
                name,
                shape=(n, *tail),
                **grid,
                dtype=array_dtype,
                compressors=_codecs(zipped),
                fill_value=0,
            )

        for name in LATENT_ARRAYS:
            row_array(name, latent, dtype, compress_latents)
        for name in ERROR_ARRAYS:
            row_array(name, (2,), "float32", False)
        if layout.forward_arrays:
            for name in CLEAN_ARRAYS:
                row_array(name, latent, dtype, compress_latents)
            for name in FORWARD_ERROR_ARRAYS:
                row_array(name, (2,), "float32", False)
        if layout.size_conditioning:
            for name in TIME_ID_ARRAYS:
                row_array(name, (TIME_IDS_WIDTH,), "float32", False)
        for name, array_dtype in (
            ("valid", "uint8"),
            ("inversion_steps", "int16"),
            ("timestep", "int32"),
            ("prompt_index", "int32"),
            ("source_row", "int64"),
            ("draw", "int16"),
            ("caption_index", "int32"),
        ):
            rows.create_array(
                name, shape=(n,), chunks=(r,), dtype=array_dtype, compressors=_codecs(True), fill_value=0
            )
        rows.create_array("flip", shape=(n, 2), chunks=(r, 2), dtype="uint8", compressors=_codecs(True), fill_value=0)
        if layout.sigma:
            rows.create_array("sigma", shape=(n,), chunks=(r,), dtype="float32", compressors=_codecs(True),
                              fill_value=0)

        prompts = group.create_group("prompts")
        p, q = layout.num_prompts, layout.prompts_per_chunk
        prompts.create_array("text", shape=(p,), chunks=(p,), dtype=str)

        def prompt_grid(tail: tuple[int, ...]) -> dict[str, Any]:
            # prompts are read one at a time, in any order: one chunk per prompt
            return {"chunks": (1, *tail), "shards": (q, *tail)} if layout.prompt_shards else {"chunks": (1, *tail)}

        prompts.create_array(
            "embedding",
            shape=(p, *layout.text_shape),
            **prompt_grid(layout.text_shape),
            dtype=dtype,
            compressors=_codecs(compress_latents),
            fill_value=0,
        )
        if layout.pooled_dim is not None:
            prompts.create_array(
                "pooled_embedding",
                shape=(p, layout.pooled_dim),
                **prompt_grid((layout.pooled_dim,)),
                dtype=dtype,
                compressors=_codecs(False),
                fill_value=0,
            )

        done = group.create_group("done")
        # chunk size 1: every flag is its own object, so writers never share one
        done.create_array("shards", shape=(layout.num_shards,), chunks=(1,), dtype="uint8",
                          compressors=_codecs(False), fill_value=0)
        done.create_array("prompt_chunks", shape=(layout.num_prompt_chunks,), chunks=(1,),
                          dtype="uint8", compressors=_codecs(False), fill_value=0)
        done.create_array("shard_stats", shape=(layout.num_shards, SHARD_STATS_WIDTH),
                          chunks=(1, SHARD_STATS_WIDTH), dtype="float64",
                          compressors=_codecs(False), fill_value=0)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> CacheStore:
        """Open an existing store, checking that it is a complete-at-creation inpo store."""
        location = locate(path)
        if not location.exists(ROOT_METADATA):
            raise StoreError(f"no inpo cache store at {location}; create one with `inpo invert`")
        try:
            group = zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode)
            attrs = dict(group.attrs)
        except StoreError:
            raise
        except Exception as error:  # zarr raises several types for unreadable metadata
            raise StoreError(f"cannot read the store at {location}: {error}") from error
        if attrs.get("schema") != SCHEMA_NAME:
            raise StoreError(f"{location} is a Zarr group but not an inpo cache store")
        version = attrs.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{location} has cache schema version {version}; this inpo reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: re-create it with `inpo invert --overwrite`"
            )
        if attrs.get("state") != "ready":
            raise StoreError(
                f"{location} was not fully created (its creation was interrupted); "
                "run the same `inpo invert` command again to redo it"
            )
        return cls(location, group, StoreLayout.from_json(attrs["layout"]))

    @staticmethod
    def read_attributes(path: str | Path) -> dict[str, Any]:
        """The group attributes, without any validation (for deciding whether to resume)."""
        return attributes_of(locate(path))

    # ------------------------------------------------------------------ attributes
    @property
    def attributes(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["settings"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.group.attrs["provenance"])

    def update_provenance(self, **values: Any) -> None:
        """Add facts to the provenance; only the creating (rank-0) process may call this."""
        provenance = self.provenance
        provenance.update(values)
        self.group.attrs["provenance"] = provenance

    # ------------------------------------------------------------------ plan and prompts
    @property
    def schema_version(self) -> int:
        return int(self.group.attrs["schema_version"])

    def read_plan(self, rows: slice | np.ndarray) -> RowPlan:
        arrays = self.group["rows"]
        v2 = "caption_index" in arrays
        return RowPlan(
            timestep=np.asarray(arrays["timestep"][rows]),
            prompt_index=np.asarray(arrays["prompt_index"][rows]),
            source_row=np.asarray(arrays["source_row"][rows]),
            draw=np.asarray(arrays["draw"][rows]),
            caption_index=np.asarray(arrays["caption_index"][rows]) if v2 else None,
            flip=np.asarray(arrays["flip"][rows]) if v2 else None,
            sigma=np.asarray(arrays["sigma"][rows]) if self.layout.sigma else None,
        )

    def prompt_texts(self, indices: slice | np.ndarray | None = None) -> list[str]:
        texts = self.group["prompts"]["text"]
        selected = texts[:] if indices is None else texts[indices]
        return [str(text) for text in np.atleast_1d(selected)]

    def write_prompt_chunk(self, chunk: int, embedding: np.ndarray, pooled: np.ndarray | None) -> None:
        """Write one prompt chunk's embeddings (float32 in), then mark the chunk done."""
        with zarr.config.set(EVERY_CHUNK):
            prompts = self.group["prompts"]
            span = self.layout.prompt_chunk(chunk)
            prompts["embedding"][span] = encode_storage(embedding, self.layout.storage_dtype)
            if self.layout.pooled_dim is not None:
                assert pooled is not None
                prompts["pooled_embedding"][span] = encode_storage(pooled, self.layout.storage_dtype)
            self.group["done"]["prompt_chunks"][chunk] = 1

    def read_prompt_embeddings(self, indices: np.ndarray, decode: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 text (and SDXL pooled) embeddings of prompts `indices`, as stored (`decode=False`:
        in the storage dtype, for `decode_storage`).

        A read-only open of a complete store keeps up to `prompt_cache_bytes` of them (stored
        dtype) and reads only the others.
        """
        indices = np.asarray(indices, dtype=np.int64)
        text = np.empty((len(indices), *self.layout.text_shape), dtype=self._array("prompts/embedding").dtype)
        pooled = None
        if self.layout.pooled_dim is not None:
            pooled = np.empty((len(indices), self.layout.pooled_dim), dtype=self._array("prompts/pooled_embedding").dtype)
        self.gather_prompt_embeddings(indices, text, pooled)
        if not decode:
            return text, pooled
        dtype = self.layout.storage_dtype
        return decode_storage(text, dtype), None if pooled is None else decode_storage(pooled, dtype)

    def gather_prompt_embeddings(self, indices: np.ndarray, text: np.ndarray | Sequence[np.ndarray],
                                 pooled: np.ndarray | Sequence[np.ndarray] | None) -> None:
        """Fill text[j] (and pooled[j]) with the stored embeddings of prompt indices[j] (any order,
        repeats allowed), in the storage dtype: one copy into the caller's arrays (each may be a
        list of equally long arrays, as in `gather_rows`)."""
        indices = np.asarray(indices, dtype=np.int64)
        _check_bounds("prompts", indices, self.layout.num_prompts)
        unique, inverse = np.unique(indices, return_inverse=True)
        self._require_prompt_objects(np.unique(unique // self.layout.prompts_per_chunk))
        names = ["embedding"] + (["pooled_embedding"] if pooled is not None else [])
        outputs = [text] + ([pooled] if pooled is not None else [])
        # the cache keeps every stored embedding of a prompt: a call that asks for fewer reads past it
        capacity = self._prompt_cache_capacity() if (pooled is not None) == (self.layout.pooled_dim is not None) else 0
        if capacity == 0:
            for name, out in zip(names, outputs):
                self._gather(f"prompts/{name}", indices, out)
            return
        cache = self._prompt_cache
        slots = self._prompt_slots
        assert slots is not None
        hit = np.fromiter((index in cache for index in unique.tolist()), dtype=bool, count=len(unique))
        for index in unique[hit].tolist():
            cache.move_to_end(index)
        missing = unique[~hit]
        shapes = [self.prompt_spec(name) for name in names]
        fresh = [np.empty((len(missing), *shape), dtype=dtype) for shape, dtype in shapes]
        for name, values in zip(names, fresh):
            self._gather(f"prompts/{name}", missing, values)
        slot_of = np.zeros(len(unique), dtype=np.int64)
        slot_of[hit] = [cache[index] for index in unique[hit].tolist()]
        row_hit = hit[inverse]
        if row_hit.all():
            for out, held in zip(outputs, slots):
                parts = [out] if isinstance(out, np.ndarray) else list(out)
                length, wanted = len(parts[0]), slot_of[inverse]
                for k, part in enumerate(parts):
                    # mode="clip" (the slots are valid): with mode="raise", numpy copies through a buffer
                    np.take(held, wanted[k * length:(k + 1) * length], axis=0, out=part, mode="clip")
            return
        positions = np.arange(len(indices))
        position_in_fresh = np.cumsum(~hit) - 1
        for out, held, values in zip(outputs, slots, fresh):
            _scatter(out, positions[row_hit], held, slot_of[inverse[row_hit]])
            _scatter(out, positions[~row_hit], values, position_in_fresh[inverse[~row_hit]])
        # keep the newest of the fresh prompts, evicting the least recently used
        for k in range(max(0, len(missing) - capacity), len(missing)):
            if len(cache) < capacity:
                slot = len(cache)
            else:
                _evicted, slot = cache.popitem(last=False)
            cache[int(missing[k])] = slot
            for held, values in zip(slots, fresh):
                held[slot] = values[k]

    def _prompt_cache_capacity(self) -> int:
        """Prompts the cache holds (0: no cache — the store may still change, or no budget);
        allocates the cache's slots on first use."""
        if self.prompt_cache_bytes <= 0 or not self._is_frozen():
            return 0
        text = self._array("prompts/embedding")
        pooled = self._array("prompts/pooled_embedding") if self.layout.pooled_dim is not None else None
        per_prompt = self.raw_bytes_per_prompt()
        capacity = min(self.layout.num_prompts, self.prompt_cache_bytes // max(1, per_prompt))
        if capacity == 0:
            return 0
        if self._prompt_slots is None or len(self._prompt_slots[0]) != capacity:
            self._prompt_cache.clear()
            self._prompt_slots = (np.empty((capacity, *self.layout.text_shape), dtype=text.dtype),
                                  None if pooled is None else np.empty((capacity, self.layout.pooled_dim), dtype=pooled.dtype))
        return capacity

    @property
    def _prompt_cache_used(self) -> int:
        """Bytes of the prompts the cache holds now."""
        return len(self._prompt_cache) * self.raw_bytes_per_prompt()

    # ------------------------------------------------------------------ completion flags
    def shards_done(self) -> np.ndarray:
        return np.asarray(self.group["done"]["shards"][:]).astype(bool)

    def prompt_chunk_done(self, chunk: int) -> bool:
        """One prompt chunk's flag, read now (another process may have set it since)."""
        return bool(self.group["done"]["prompt_chunks"][chunk])

    def prompt_chunks_done(self) -> np.ndarray:
        return np.asarray(self.group["done"]["prompt_chunks"][:]).astype(bool)

    def is_complete(self) -> bool:
        return bool(self.shards_done().all() and self.prompt_chunks_done().all())

    # ------------------------------------------------------------------ shard writes
    def write_shard(self, shard: int, result: ShardResult) -> None:
        """Write one whole shard (one assignment per array), then set its done flag."""
        with zarr.config.set(EVERY_CHUNK):
            self._write_shard(shard, result)

    def _write_shard(self, shard: int, result: ShardResult) -> None:
        span = self.layout.shard_rows(shard)
        expected = span.stop - span.start
        rows = self.group["rows"]
        dtype = self.layout.storage_dtype
        for name in LATENT_ARRAYS:
            values = getattr(result, name)
            if len(values) != expected:
                raise StoreError(f"shard {shard}: {name} has {len(values)} rows, expected {expected}")
            rows[name][span] = encode_storage(values, dtype)
        for name in ERROR_ARRAYS:
            rows[name][span] = np.asarray(getattr(result, name), dtype=np.float32)
        if self.layout.forward_arrays:
            for name in CLEAN_ARRAYS:
                values = getattr(result, name)
                if values is None or len(values) != expected:
                    raise StoreError(f"shard {shard}: {name} is required by this store's layout")
                rows[name][span] = encode_storage(values, dtype)
            for name in FORWARD_ERROR_ARRAYS:
                rows[name][span] = np.asarray(getattr(result, name), dtype=np.float32)
        if self.layout.size_conditioning:
            for name in TIME_ID_ARRAYS:
                values = getattr(result, name)
                assert values is not None, f"{name} is required for SDXL stores"
                rows[name][span] = np.asarray(values, dtype=np.float32)
        rows["valid"][span] = np.asarray(result.valid, dtype=np.uint8)
        rows["inversion_steps"][span] = np.asarray(result.inversion_steps, dtype=np.int16)
        done = self.group["done"]
        done["shard_stats"][shard] = np.asarray(result.stats, dtype=np.float64)
        done["shards"][shard] = 1

    # ------------------------------------------------------------------ reads
    def read_rows(self, indices: np.ndarray | slice, inputs: str = "inversion", decode: bool = True) -> RowBatch:
        """Rows by index (any order); float32 values exactly as the trainer will see them.

        `inputs` says which training inputs to read: "inversion" (x_t, τ, e_ref: InPO),
        "forward" (x0 and the forward-noised e_ref: Diffusion-DPO, SFT) or "all". With
        `decode=False` the latent arrays come as stored (`decode_storage` makes them float32).
        """
        if inputs not in ROW_INPUTS:
            raise ValueError(f"inputs must be one of {ROW_INPUTS}")
        if inputs != "inversion" and not self.layout.forward_arrays:
            raise StoreError(
                f"{self.path} holds no clean latents or forward-noised reference errors (made with "
                "`--objectives inpo` or by an earlier inpo); re-invert it with `inpo invert --objectives all`"
            )
        if isinstance(indices, slice):
            indices = np.arange(*indices.indices(self.layout.num_rows))
        indices = np.asarray(indices, dtype=np.int64)
        _check_bounds("rows", indices, self.layout.num_rows)
        self._require_objects(np.unique(indices // self.layout.rows_per_shard), inputs)
        dtype = self.layout.storage_dtype

        def take(name: str) -> np.ndarray:
            array = self._array(f"rows/{name}")
            values = np.empty((len(indices), *array.shape[1:]), dtype=array.dtype)
            self.gather_rows(name, indices, values)
            return values

        def take_latent(name: str) -> np.ndarray:
            return decode_storage(take(name), dtype) if decode else take(name)

        sdxl = bool(self.layout.size_conditioning)
        inversion = inputs in ("inversion", "all")
        forward = inputs in ("forward", "all")
        return RowBatch(
            indices=indices,
            latent_chosen=take_latent("latent_chosen") if inversion else None,
            latent_rejected=take_latent("latent_rejected") if inversion else None,
            target_chosen=take_latent("target_chosen") if inversion else None,
            target_rejected=take_latent("target_rejected") if inversion else None,
            reference_error_chosen=take("reference_error_chosen") if inversion else None,
            reference_error_rejected=take("reference_error_rejected") if inversion else None,
            timestep=take("timestep"),
            sigma=take("sigma") if self.layout.sigma else None,
            prompt_index=take("prompt_index"),
            valid=take("valid").astype(bool),
            time_ids_chosen=take("time_ids_chosen") if sdxl else None,
            time_ids_rejected=take("time_ids_rejected") if sdxl else None,
            source_row=take("source_row") if forward else None,
            draw=take("draw") if forward else None,
            clean_chosen=take_latent("clean_chosen") if forward else None,
            clean_rejected=take_latent("clean_rejected") if forward else None,
            forward_error_chosen=take("forward_error_chosen") if forward else None,
            forward_error_rejected=take("forward_error_rejected") if forward else None,
        )

    def gather_rows(self, name: str, indices: np.ndarray, out: np.ndarray | Sequence[np.ndarray],
                    positions: np.ndarray | None = None) -> None:
        """out[positions[j]] = row indices[j] of rows/`name` as stored (any order, repeats allowed;
        positions default to 0, 1, …). `out` may be a list of equally long arrays, read as their
        concatenation (the trainer gathers a group straight into its micro-batches' own arrays:
        one copy per row). Call `read_rows` first, or `require_rows`, for the lost-object check."""
        indices = np.asarray(indices, dtype=np.int64)
        if name not in LATENT_ARRAYS + CLEAN_ARRAYS:
            whole = self._small_row_array(name)
            if whole is not None:
                _check_bounds(f"rows/{name}", indices, len(whole))
                _scatter(out, np.arange(len(indices)) if positions is None else np.asarray(positions), whole, indices)
                return
        self._gather(f"rows/{name}", indices, out, positions)

    def row_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape of one row, stored dtype) of row array `name`, for a caller's `gather_rows` output."""
        array = self._array(f"rows/{name}")
        return tuple(array.shape[1:]), np.dtype(array.dtype)

    def prompt_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape of one prompt's, stored dtype) of prompt array `name` ("embedding", "pooled_embedding")."""
        array = self._array(f"prompts/{name}")
        return tuple(array.shape[1:]), np.dtype(array.dtype)

    def require_rows(self, indices: np.ndarray, inputs: str = "inversion") -> None:
        """Refuse (one line) to read rows of finished shards whose objects are gone."""
        if inputs not in ROW_INPUTS:
            raise ValueError(f"inputs must be one of {ROW_INPUTS}")
        indices = np.asarray(indices, dtype=np.int64)
        _check_bounds("rows", indices, self.layout.num_rows)
        self._require_objects(np.unique(indices // self.layout.rows_per_shard), inputs)

    def _gather(self, path: str, indices: np.ndarray, out: np.ndarray | Sequence[np.ndarray],
                positions: np.ndarray | None = None) -> None:
        """out[positions[j]] = element indices[j] (leading axis) of array `path`, as stored (`out`
        as in `gather_rows`)."""
        positions = np.arange(len(indices)) if positions is None else np.asarray(positions)
        if len(indices) == 0:
            return
        array = self._array(path)
        _check_bounds(path, indices, array.shape[0])
        if not self._plain_objects(array):
            order = np.argsort(indices, kind="stable")
            _scatter(out, positions[order], np.asarray(array.get_orthogonal_selection(indices[order])))
            return
        per_object = array.chunks[0]
        objects, inverse = np.unique(indices // per_object, return_inverse=True)
        by_object = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[by_object], np.arange(len(objects) + 1))
        for k, values in enumerate(self._read_objects(array, objects.tolist())):
            picked = by_object[bounds[k]:bounds[k + 1]]
            _scatter(out, positions[picked], values, indices[picked] - objects[k] * per_object)

    def _plain_objects(self, array: Any) -> bool:
        """True when each object of `array` is one chunk's raw little-endian bytes followed by
        their crc32c (no compression, no inner chunks): `_read_objects` reads those without
        zarr's per-chunk codec pipeline."""
        if array.path not in self._plain:
            codecs = array.metadata.codecs
            self._plain[array.path] = (
                array.shards is None and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
                and (codecs[0].endian is None or codecs[0].endian.value == "little")
                and isinstance(codecs[1], Crc32cCodec)
            )
        return self._plain[array.path]

    def _read_objects(self, array: Any, objects: list[int]) -> Iterator[np.ndarray]:
        """Leading-axis chunks `objects` of a plain array (`_plain_objects`), in order, each checked
        against its crc32c; a chunk never written reads as the fill value, as through zarr
        (finished shards were checked for lost objects before). A local store's objects are
        files, each read into one reused buffer, which the caller copies from before asking for
        the next one (checksum and copy then run on bytes still in the CPU's cache; zarr's store
        would hand each file to a thread, ≈ 0.1–0.3 ms per object); other stores are asked for
        all of them concurrently, in one call."""
        keys = [self._object_key(array, index) for index in objects]
        dtype = np.dtype(array.dtype).newbyteorder("<")
        shape = tuple(array.chunks)
        size = int(np.prod(shape)) * dtype.itemsize + 4
        store = array.store_path.store
        if isinstance(store, LocalStore):
            folder = os.path.join(str(store.root), array.path)
            if self._object_buffer is None or len(self._object_buffer) < size:
                self._object_buffer = np.empty(size, dtype=np.uint8)
            buffer = self._object_buffer[:size]
            for key in keys:
                try:
                    with open(os.path.join(folder, key), "rb", buffering=0) as handle:
                        found = os.fstat(handle.fileno()).st_size
                        self._check_size(array, key, found, size)
                        view, read = memoryview(buffer), 0
                        while read < size:  # a regular file's read returns all of it, unless interrupted
                            count = handle.readinto(view[read:])
                            if not count:
                                self._check_size(array, key, read, size)
                            read += count
                except FileNotFoundError:
                    yield np.full(shape, array.fill_value, dtype=dtype)
                    continue
                yield self._checked(array, key, buffer, dtype, shape)
            return
        prototype = default_buffer_prototype()

        async def fetch() -> list[Any]:
            return await asyncio.gather(*[(array.store_path / key).get(prototype=prototype) for key in keys])

        for key, found in zip(keys, sync(fetch())):
            if found is None:
                yield np.full(shape, array.fill_value, dtype=dtype)
                continue
            data = found.as_numpy_array()
            self._check_size(array, key, len(data), size)
            yield self._checked(array, key, data, dtype, shape)

    def _check_size(self, array: Any, key: str, found: int, size: int) -> None:
        if found != size:
            raise StoreError(f"{self.path}/{array.path}/{key} holds {found} bytes, expected {size} (a truncated or "
                             "foreign object): run `inpo cache verify` on the store and redo what it reports")

    def _checked(self, array: Any, key: str, data: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The chunk in `data` (its bytes, then their crc32c), once the checksum matches."""
        if google_crc32c.value(data[:-4]) != int(data[-4:].view("<u4")[0]):
            raise StoreError(f"{self.path}/{array.path}/{key} fails its crc32c checksum (the object was changed or "
                             "damaged): run `inpo cache verify` on the store and redo what it reports")
        return data[:-4].view(dtype).reshape(shape)

    def valid_rows(self) -> np.ndarray:
        """Indices of rows that are finished and hold a usable pair."""
        done_rows = np.repeat(self.shards_done(), self.layout.rows_per_shard)[: self.layout.num_rows]
        valid = np.asarray(self.group["rows"]["valid"][:]).astype(bool)
        return np.flatnonzero(done_rows & valid)

    # ------------------------------------------------------------------ data and diagnostics
    def data_arrays(self) -> dict[str, np.ndarray]:
        """Every array that is data, as stored (bit-identical across process counts and resumes),
        keyed by path; the diagnostics (DIAGNOSTIC_ARRAYS) are left out."""
        arrays: dict[str, np.ndarray] = {}
        for group_name in ("rows", "prompts", "done"):
            group = self.group[group_name]
            for name in sorted(group.array_keys()):
                path = f"{group_name}/{name}"
                if path not in DIAGNOSTIC_ARRAYS:
                    arrays[path] = np.asarray(group[name][...])
        return arrays

    # ------------------------------------------------------------------ lost objects
    @property
    def every_chunk_written(self) -> bool:
        """True for stores that write every chunk (a missing object is always a lost one)."""
        return bool(self.attributes.get(EVERY_CHUNK_ATTRIBUTE, False))

    def row_array_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every row array this store's layout and schema version hold, with its shape."""
        layout = self.layout
        shapes: dict[str, tuple[int, ...]] = {name: (layout.num_rows, *layout.latent_shape) for name in LATENT_ARRAYS}
        shapes.update({name: (layout.num_rows, 2) for name in ERROR_ARRAYS})
        if layout.forward_arrays:
            shapes.update({name: (layout.num_rows, *layout.latent_shape) for name in CLEAN_ARRAYS})
            shapes.update({name: (layout.num_rows, 2) for name in FORWARD_ERROR_ARRAYS})
        if layout.size_conditioning:
            shapes.update({name: (layout.num_rows, TIME_IDS_WIDTH) for name in TIME_ID_ARRAYS})
        if layout.sigma:
            shapes["sigma"] = (layout.num_rows,)
        shapes.update({name: (layout.num_rows,) for name in ("valid", "inversion_steps", *PLAN_ARRAYS)})
        if self.schema_version >= 2:
            shapes.update({"caption_index": (layout.num_rows,), "flip": (layout.num_rows, 2)})
        return shapes

    @staticmethod
    def _object_key(array: Any, index: int) -> str:
        """The key of the object holding leading-axis chunk (or shard) `index` of `array`."""
        return array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))

    def _objects_exist(self, objects: Sequence[tuple[Any, int]]) -> list[bool]:
        """Whether each (array, leading-axis chunk) object is in the store, asked all at once (on
        an object store each is a request)."""
        async def check() -> list[bool]:
            return await asyncio.gather(*[(array.store_path / self._object_key(array, index)).exists()
                                          for array, index in objects])

        return [bool(found) for found in sync(check())]

    def missing_shard_objects(self, shard: int, names: Sequence[str] | None = None) -> list[str]:
        """Paths of the objects of a finished shard that are not in the store.

        Stores that write every chunk are checked array by array. Earlier stores skipped chunks
        equal to the fill value (0), so there only the latents, which are never all zero, can
        be checked, and only in shards with a usable row.
        """
        rows = self.group["rows"]
        if names is None:
            names = list(self.row_array_shapes())
        if not self.every_chunk_written:
            valid = np.asarray(rows["valid"][self.layout.shard_rows(shard)]).astype(bool)
            names = [n for n in names if n in LATENT_ARRAYS + CLEAN_ARRAYS] if valid.any() else []
        arrays = [self._array(f"rows/{name}") for name in names]
        found = self._objects_exist([(array, shard) for array in arrays])
        return [f"rows/{name}/{self._object_key(array, shard)}"
                for name, array, present in zip(names, arrays, found) if not present]

    def missing_prompt_objects(self, chunk: int) -> list[str]:
        prompts = self.group["prompts"]
        names = [name for name in ("embedding", "pooled_embedding") if name in prompts]
        span = self.layout.prompt_chunk(chunk)
        objects = [chunk] if self.layout.prompt_shards else range(span.start, span.stop)
        wanted = [(name, index) for name in names for index in objects]
        found = self._objects_exist([(prompts[name], index) for name, index in wanted])
        return [f"prompts/{name}/{self._object_key(prompts[name], index)}"
                for (name, index), present in zip(wanted, found) if not present]

    def _lost(self, missing: list[str]) -> StoreError:
        return StoreError(
            f"{self.path} is missing {missing[0]}" + (f" and {len(missing) - 1} more objects" if len(missing) > 1 else "")
            + ", which its done flags say were written (an interrupted copy?): copy the store again, "
            "or run `inpo cache verify` for the full list"
        )

    def _require_objects(self, shards: np.ndarray, inputs: str) -> None:
        """Refuse to read a finished shard whose objects are gone (zarr would return zeros)."""
        checked = self.__dict__.setdefault("_checked_shards", set())
        # read once per open store: done/shards is one object per flag, too many to read per batch
        done = self.__dict__.get("_done_at_first_read")
        if done is None:
            done = self.__dict__["_done_at_first_read"] = self.shards_done()
        names = [name for name in self.row_array_shapes()
                 if inputs == "all" or (inputs == "inversion" and name not in CLEAN_ARRAYS + FORWARD_ERROR_ARRAYS)
                 or (inputs == "forward" and name not in LATENT_ARRAYS + ERROR_ARRAYS)]
        for shard in (int(s) for s in shards):
            if (shard, inputs) in checked or not done[shard]:
                continue
            missing = self.missing_shard_objects(shard, names)
            if missing:
                raise self._lost(missing)
            checked.add((shard, inputs))

    def _require_prompt_objects(self, chunks: np.ndarray) -> None:
        checked = self.__dict__.setdefault("_checked_prompt_chunks", set())
        done = self.__dict__.get("_prompt_chunks_done_at_first_read")
        if done is None:
            done = self.__dict__["_prompt_chunks_done_at_first_read"] = self.prompt_chunks_done()
        for chunk in (int(c) for c in chunks):
            if chunk in checked or not done[chunk]:
                continue
            missing = self.missing_prompt_objects(chunk)
            if missing:
                raise self._lost(missing)
            checked.add(chunk)

    def unmark_lost(self) -> tuple[list[int], list[int]]:
        """Clear the done flag of every finished shard and prompt chunk with a lost object, so that
        the store's `inpo invert` command redoes exactly those; returns (shards, prompt chunks)."""
        done, chunks_done = self.shards_done(), self.prompt_chunks_done()
        shards = [s for s in range(self.layout.num_shards) if done[s] and self.missing_shard_objects(s)]
        chunks = [c for c in range(self.layout.num_prompt_chunks) if chunks_done[c] and self.missing_prompt_objects(c)]
        with zarr.config.set(EVERY_CHUNK):
            for shard in shards:
                self.group["done"]["shards"][shard] = 0
            for chunk in chunks:
                self.group["done"]["prompt_chunks"][chunk] = 0
        return shards, chunks

    # ------------------------------------------------------------------ summaries
    def bytes_on_disk(self) -> int:
        """Bytes of every object of the store (an object store lists them: one request per 1000)."""
        return self.location.size()

    def raw_bytes_per_row(self) -> int:
        """Uncompressed bytes of one row's arrays (the latents dominate)."""
        c, h, w = self.layout.latent_shape
        item = 4 if self.layout.storage_dtype == "float32" else 2
        total = len(LATENT_ARRAYS) * c * h * w * item + len(ERROR_ARRAYS) * 2 * 4
        if self.layout.forward_arrays:
            total += len(CLEAN_ARRAYS) * c * h * w * item + len(FORWARD_ERROR_ARRAYS) * 2 * 4
        if self.layout.size_conditioning:
            total += len(TIME_ID_ARRAYS) * TIME_IDS_WIDTH * 4
        if self.layout.sigma:
            total += 4
        return total + 1 + 2 + 4 + 4 + 8 + 2 + (4 + 2 if self.schema_version >= 2 else 0)

    def raw_bytes_per_prompt(self) -> int:
        """Uncompressed bytes of one prompt's stored embeddings (T5's hundreds of tokens dominate)."""
        item = 4 if self.layout.storage_dtype == "float32" else 2
        length, width = self.layout.text_shape
        return (length * width + (self.layout.pooled_dim or 0)) * item

    def summary(self) -> dict[str, Any]:
        """Facts for `inpo cache info`: progress, sizes, dropped pairs by reason."""
        layout = self.layout
        done = self.shards_done()
        done_rows = np.repeat(done, layout.rows_per_shard)[: layout.num_rows]
        rows = self.group["rows"]
        valid = np.asarray(rows["valid"][:]).astype(bool)
        source_row = np.asarray(rows["source_row"][:])
        broken_sources = np.unique(source_row[done_rows & ~valid])
        stats = np.asarray(self.group["done"]["shard_stats"][:])[done]
        unet_rows, padded_rows, seconds = stats.sum(axis=0) if len(stats) else (0.0, 0.0, 0.0)
        disk = self.bytes_on_disk()
        finished_rows = int(done_rows.sum())
        return {
            "path": str(self.path),
            "schema": f"{SCHEMA_NAME} v{self.schema_version}",
            "rows": layout.num_rows,
            "rows_done": finished_rows,
            "rows_valid": int((done_rows & valid).sum()),
            "shards_done": int(done.sum()),
            "shards": layout.num_shards,
            "prompt_chunks_done": int(self.prompt_chunks_done().sum()),
            "prompt_chunks": layout.num_prompt_chunks,
            "prompts": layout.num_prompts,
            "complete": bool(done.all() and self.prompt_chunks_done().all()),
            "bytes_on_disk": disk,
            "bytes_per_row": disk / max(layout.num_rows, 1),
            "raw_bytes_per_row": self.raw_bytes_per_row(),
            "raw_bytes_per_prompt": self.raw_bytes_per_prompt(),
            "broken_pairs": int(len(broken_sources)),
            "broken_source_rows": broken_sources.tolist(),
            "unet_row_evaluations": float(unet_rows),
            "padded_row_evaluations": float(padded_rows),
            "inversion_seconds": float(seconds),
            "layout": layout.to_json(),
            "settings": self.settings,
            "provenance": self.provenance,
        }

    def check_integrity(self, progress: Any = None) -> list[str]:
        """Read every chunk of every array (crc32c checked on decode); one line per problem.

        Checks completeness, array shapes against the layout, NaN/Inf in finished rows, and
        that no finished, valid row has a negative step count. A chunk that fails its checksum
        is reported, never raised.
        """
        problems: list[str] = []
        layout = self.layout

        def read(label: str, array: Any, selection: Any = slice(None)) -> np.ndarray | None:
            try:
                return np.asarray(array[selection])
            except Exception as error:  # a checksum mismatch surfaces as a codec error
                problems.append(f"{label} unreadable ({type(error).__name__}: {error})")
                return None

        done_group = self.group["done"]
        flags = read("done/shards", done_group["shards"])
        done = flags.astype(bool) if flags is not None else np.zeros(layout.num_shards, dtype=bool)
        chunk_flags = read("done/prompt_chunks", done_group["prompt_chunks"])
        chunks_done = chunk_flags.astype(bool) if chunk_flags is not None else np.zeros(layout.num_prompt_chunks, dtype=bool)
        read("done/shard_stats", done_group["shard_stats"])
        if not done.all():
            problems.append(f"incomplete: {int((~done).sum())} of {layout.num_shards} shards not done")
        if not chunks_done.all():
            problems.append(
                f"incomplete: {int((~chunks_done).sum())} of {layout.num_prompt_chunks} prompt chunks not done"
            )
        rows = self.group["rows"]
        expected_shapes = self.row_array_shapes()
        shape_problems = [
            f"missing array rows/{name}" if name not in rows
            else f"rows/{name} has shape {tuple(rows[name].shape)}, expected {shape}"
            for name, shape in expected_shapes.items()
            if name not in rows or tuple(rows[name].shape) != shape
        ]
        if shape_problems:
            return problems + shape_problems
        for shard in range(layout.num_shards):
            span = layout.shard_rows(shard)
            if done[shard]:
                problems.extend(f"shard {shard}: {key} is missing (lost in a copy?)"
                                for key in self.missing_shard_objects(shard))
            valid = read(f"shard {shard}: rows/valid", rows["valid"], span)
            for name in expected_shapes:
                if name == "valid":
                    continue
                values = read(f"shard {shard}: rows/{name}", rows[name], span)
                if values is None or not done[shard]:
                    continue
                if name in LATENT_ARRAYS or name in CLEAN_ARRAYS:
                    values = decode_storage(values, layout.storage_dtype)
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    problems.append(f"shard {shard}: rows/{name} holds NaN or Inf")
                if name == "inversion_steps" and valid is not None and (values[valid.astype(bool)] < 0).any():
                    problems.append(f"shard {shard}: negative inversion step count")
            if progress is not None:
                progress(shard)
        prompts = self.group["prompts"]
        read("prompts/text", prompts["text"])
        for chunk in range(layout.num_prompt_chunks):
            span = layout.prompt_chunk(chunk)
            if chunks_done[chunk]:
                problems.extend(f"prompt chunk {chunk}: {key} is missing (lost in a copy?)"
                                for key in self.missing_prompt_objects(chunk))
            for name in ("embedding", "pooled_embedding"):
                if name not in prompts:
                    continue
                values = read(f"prompt chunk {chunk}: prompts/{name}", prompts[name], span)
                if values is None:
                    continue
                if chunks_done[chunk] and not np.isfinite(decode_storage(values, layout.storage_dtype)).all():
                    problems.append(f"prompt chunk {chunk}: prompts/{name} holds NaN or Inf")
        return problems


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

"""Preference-pair sources: Pick-a-Pic parquet, a hub dataset, or a JSONL/CSV manifest.

A source answers two questions, both streamed:

* :meth:`PairSource.scan` — the cheap columns (caption, labels) of every source row, in order,
  so that stage one can drop ties and plan the store without touching an image;
* :meth:`PairSource.read` — the image bytes of a sorted list of source rows, read group by
  group so that memory holds one parquet row group (or one window of pairs) at a time.

Image decoding and the resize/crop live here too, so that a pair whose image cannot be
decoded is recognised in one place and dropped as a pair.
"""

from __future__ import annotations

import csv
import glob as globlib
import io
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLUMN_ROLES = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "chosen", "rejected")
COLUMN_ALIASES = {"prompt": "caption"}
MANIFEST_PROMPT_COLUMNS = ("prompt", "caption")
MANIFEST_COLUMNS = ("chosen", "rejected")
HPDV3_COLUMNS = ("path1", "path2")
"""HPDv3's layout (MizzenAI/HPDv3: a JSON array or JSONL of prompt, path1, path2, model1, model2,
confidence, …): path1 is the preferred image, path2 the rejected one, both relative to the file."""


class DataError(Exception):
    """Input data that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class ScannedRow:
    """The cheap facts of one source row."""

    source_row: int
    caption: str
    is_tie: bool


@dataclass(frozen=True)
class PairRecord:
    """One preference pair's raw material: undecoded image bytes (None = unreadable file)."""

    source_row: int
    caption: str
    chosen: bytes | None
    rejected: bytes | None


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a parquet or hub dataset play the pair's roles (`--columns`).

    Either Pick-a-Pic's labelled layout (two images and a label each; equal labels are a tie)
    or a chosen/rejected layout (the chosen image is preferred; no ties). The default is
    Pick-a-Pic's own column names.
    """

    caption: str = "caption"
    jpg_0: str | None = "jpg_0"
    jpg_1: str | None = "jpg_1"
    label_0: str | None = "label_0"
    label_1: str | None = "label_1"
    chosen: str | None = None
    rejected: str | None = None

    @property
    def labelled(self) -> bool:
        return self.chosen is None

    @property
    def image_columns(self) -> tuple[str, str]:
        first, second = (self.jpg_0, self.jpg_1) if self.labelled else (self.chosen, self.rejected)
        assert first is not None and second is not None
        return first, second

    @property
    def label_columns(self) -> tuple[str, ...]:
        return (self.label_0, self.label_1) if self.labelled else ()  # type: ignore[return-value]

    @property
    def scan_columns(self) -> list[str]:
        return [self.caption, *self.label_columns]

    @property
    def columns(self) -> list[str]:
        return [self.caption, *self.image_columns, *self.label_columns]

    def preferred(self, labels: Sequence[Any]) -> int | None:
        """0 or 1 (which image column holds the preferred image), None for a tie."""
        return _preference(*labels) if self.labelled else 0

    def to_json(self) -> dict[str, Any]:
        """The mapping as recorded in a store; empty for Pick-a-Pic's own names."""
        return {} if self == ColumnMap() else {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def chosen_rejected(cls, caption: str, chosen: str, rejected: str) -> ColumnMap:
        return cls(caption=caption, jpg_0=None, jpg_1=None, label_0=None, label_1=None, chosen=chosen, rejected=rejected)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ColumnMap:
        if not data:
            return cls()
        if "chosen" in data:
            return cls.chosen_rejected(data.get("caption", "caption"), data["chosen"], data["rejected"])
        return cls(**data)


def parse_columns(text: str | None) -> ColumnMap:
    """`prompt=COL,chosen=COL,rejected=COL` or `caption=…,jpg_0=…,jpg_1=…,label_0=…,label_1=…`
    (any role left out keeps Pick-a-Pic's name)."""
    if not text:
        return ColumnMap()
    given: dict[str, str] = {}
    for part in text.split(","):
        role, sep, column = (piece.strip() for piece in part.partition("="))
        role = COLUMN_ALIASES.get(role, role)
        if not sep or not column or role not in COLUMN_ROLES:
            raise DataError(f"--columns {text!r}: each entry is ROLE=COLUMN with ROLE one of prompt, "
                            f"{', '.join(COLUMN_ROLES[1:])} (e.g. prompt=text,chosen=win,rejected=lose)")
        if role in given:
            raise DataError(f"--columns {text!r} names {role} twice")
        given[role] = column
    chosen_layout = "chosen" in given or "rejected" in given
    if chosen_layout:
        if not ("chosen" in given and "rejected" in given):
            raise DataError(f"--columns {text!r}: chosen and rejected go together")
        if any(role in given for role in ("jpg_0", "jpg_1", "label_0", "label_1")):
            raise DataError(f"--columns {text!r}: give either chosen/rejected or jpg_0/jpg_1/label_0/label_1, not both")
        return ColumnMap.chosen_rejected(given.get("caption", "caption"), given["chosen"], given["rejected"])
    return ColumnMap(**given)


def _missing_columns(columns: ColumnMap, names: Iterable[str], where: str) -> DataError | None:
    missing = [c for c in columns.columns if c not in set(names)]
    if not missing:
        return None
    return DataError(
        f"{where} lacks column(s) {', '.join(missing)}; map the pair's roles with --columns "
        "(e.g. --columns prompt=text,chosen=win,rejected=lose), or give a JSONL/CSV manifest"
    )


def _preference(label_0: Any, label_1: Any) -> int | None:
    """Which image is preferred: 0, 1, or None for a tie (Pick-a-Pic's label_0 = 0.5)."""
    first, second = float(label_0), float(label_1)
    if first == second:
        return None
    return 0 if first > second else 1


class PairSource(ABC):
    """Interface of a preference data source."""

    kind: str = ""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies the data (recorded in the store, compared on resume)."""

    @abstractmethod
    def scan(self) -> Iterator[ScannedRow]:
        """The cheap facts of every source row, in order."""

    @abstractmethod
    def read(self, source_rows: Sequence[int]) -> Iterator[PairRecord]:
        """Records of `source_rows` (sorted ascending, unique), in that order."""


# ---------------------------------------------------------------------------- parquet
class ParquetSource(PairSource):
    """Parquet files: Pick-a-Pic v2's columns caption, jpg_0, jpg_1 (bytes), label_0, label_1,
    or others mapped to those roles (`ColumnMap`); images as bytes or {"bytes", "path"} structs."""

    kind = "parquet"

    def __init__(self, files: Sequence[Path], split: str | None, columns: ColumnMap | None = None) -> None:
        import pyarrow.parquet as pq

        self.files = [Path(f) for f in files]
        self.split = split
        self.columns = columns or ColumnMap()
        self._row_groups: list[tuple[int, int, int, int]] = []  # (start, stop, file, group)
        start = 0
        for file_index, path in enumerate(self.files):
            try:
                parquet = pq.ParquetFile(path)
                metadata = parquet.metadata
            except Exception as error:
                raise DataError(f"{path} is not a readable parquet file ({error})") from error
            # top-level fields (an image struct {bytes, path} is one column; the parquet schema lists its leaves)
            missing = _missing_columns(self.columns, parquet.schema_arrow.names, str(path))
            if missing:
                raise missing
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                self._row_groups.append((start, start + rows, file_index, group))
                start += rows
        self.num_rows = start

    def identity(self) -> dict[str, Any]:
        identity = {
            "kind": self.kind,
            "split": self.split,
            "files": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in self.files],
            "rows": self.num_rows,
        }
        if self.columns.to_json():  # Pick-a-Pic's own names leave the identity as it always was
            identity["columns"] = self.columns.to_json()
        return identity

    def scan(self) -> Iterator[ScannedRow]:
        import pyarrow.parquet as pq

        source_row = 0
        for path in self.files:
            reader = pq.ParquetFile(path)
            for batch in reader.iter_batches(batch_size=8192, columns=self.columns.scan_columns):
                captions = batch.column(self.columns.caption).to_pylist()
                labels = [batch.column(name).to_pylist() for name in self.columns.label_columns]
                for offset, caption in enumerate(captions):
                    preferred = self.columns.preferred([column[offset] for column in labels])
                    yield ScannedRow(source_row, caption or "", preferred is None)
                    source_row += 1

    def read(self, source_rows: Sequence[int]) -> Iterator[PairRecord]:
        import pyarrow.parquet as pq

        wanted = np.asarray(source_rows, dtype=np.int64)
        if len(wanted) == 0:
            return
        starts = np.array([group[0] for group in self._row_groups], dtype=np.int64)
        group_of = np.searchsorted(starts, wanted, side="right") - 1
        readers: dict[int, Any] = {}
        for group_index in np.unique(group_of):
            start, _stop, file_index, group = self._row_groups[int(group_index)]
            reader = readers.setdefault(file_index, pq.ParquetFile(self.files[file_index]))
            local = wanted[group_of == group_index] - start
            mapping = self.columns
            table = reader.read_row_group(group, columns=mapping.columns).take(local)
            columns = {name: table.column(name).to_pylist() for name in mapping.columns}
            for offset, source_row in enumerate(wanted[group_of == group_index]):
                preferred = mapping.preferred([columns[name][offset] for name in mapping.label_columns])
                if preferred is None:
                    raise DataError(f"source row {source_row} is a tie; the data changed since the store was planned")
                images = tuple(_as_bytes(columns[name][offset]) for name in mapping.image_columns)
                yield PairRecord(
                    int(source_row),
                    columns[mapping.caption][offset] or "",
                    images[preferred],
                    images[1 - preferred],
                )
            del table, columns


# ---------------------------------------------------------------------------- hub dataset
class HubSource(PairSource):
    """A dataset loaded through `datasets` (hub id or local dataset folder), Pick-a-Pic columns."""

    kind = "hub"

    def __init__(self, dataset_id: str, split: str, columns: ColumnMap | None = None) -> None:
        self.columns = columns or ColumnMap()
        try:
            import datasets
        except ImportError as error:
            raise DataError(
                "reading a hub dataset needs the `datasets` package: pip install 'inpo[hub]'"
            ) from error
        self.dataset_id = dataset_id
        self.split = split
        try:
            dataset = datasets.load_dataset(dataset_id, split=split)
        except Exception as error:
            raise DataError(f"cannot load dataset {dataset_id!r} split {split!r}: {error}") from error
        missing = _missing_columns(self.columns, dataset.column_names, f"dataset {dataset_id}")
        if missing:
            raise missing
        for column in self.columns.image_columns:
            feature = dataset.features[column]
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.fingerprint = getattr(dataset, "_fingerprint", None)

    def identity(self) -> dict[str, Any]:
        identity = {"kind": self.kind, "dataset": self.dataset_id, "split": self.split,
                    "rows": len(self.dataset), "fingerprint": self.fingerprint}
        if self.columns.to_json():
            identity["columns"] = self.columns.to_json()
        return identity

    def scan(self) -> Iterator[ScannedRow]:
        mapping = self.columns
        cheap = self.dataset.select_columns(mapping.scan_columns)
        source_row = 0
        for batch in cheap.iter(batch_size=8192):
            for offset, caption in enumerate(batch[mapping.caption]):
                preferred = mapping.preferred([batch[name][offset] for name in mapping.label_columns])
                yield ScannedRow(source_row, caption or "", preferred is None)
                source_row += 1

    def read(self, source_rows: Sequence[int]) -> Iterator[PairRecord]:
        for start in range(0, len(source_rows), 256):
            block = [int(r) for r in source_rows[start : start + 256]]
            batch = self.dataset.select(block)[:]
            mapping = self.columns
            for offset, source_row in enumerate(block):
                preferred = mapping.preferred([batch[name][offset] for name in mapping.label_columns])
                if preferred is None:
                    raise DataError(f"source row {source_row} is a tie; the data changed since the store was planned")
                images = tuple(_as_bytes(batch[c][offset]) for c in mapping.image_columns)
                yield PairRecord(source_row, batch[mapping.caption][offset] or "", images[preferred],
                                 images[1 - preferred])


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        return _read_file(value.get("path"))
    return value


# ---------------------------------------------------------------------------- manifest
class ManifestSource(PairSource):
    """A JSONL, JSON-array or CSV manifest: prompt (or caption), chosen, rejected (image paths), or
    HPDv3's prompt, path1 (preferred), path2 (rejected).

    Relative paths are resolved against the manifest's folder. The manifest's text (not its
    images) is held in memory: a few hundred bytes per pair; a JSON array is decoded element by
    element, never read whole.
    """

    kind = "manifest"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = list(self._parse())
        if not self.entries:
            raise DataError(f"{path} holds no rows")

    def _parse(self) -> Iterator[tuple[str, str, str]]:
        base = self.path.parent
        if self.path.suffix.lower() in (".jsonl", ".json"):
            with self.path.open(encoding="utf-8") as handle:
                first = handle.read(1)
                while first.isspace():
                    first = handle.read(1)
                if first == "[":
                    yield from (self._entry(self._json_row(row, f"element {number}"), base)
                                for number, row in enumerate(_json_array_items(handle, self.path), 1))
                    return
                handle.seek(0)
                rows: Iterable[dict[str, Any]] = (
                    self._json_line(line, number) for number, line in enumerate(handle, 1) if line.strip()
                )
                yield from (self._entry(row, base) for row in rows)
        else:
            with self.path.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                self._check_columns(reader.fieldnames or [])
                yield from (self._entry(row, base) for row in reader)

    def _json_line(self, line: str, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{self.path}:{number} is not valid JSON ({error.args[0]})") from error
        return self._json_row(row, f"line {number}")

    def _json_row(self, row: Any, where: str) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise DataError(f"{self.path} {where} is not a JSON object with prompt, chosen, rejected")
        self._check_columns(list(row))
        return row

    def _check_columns(self, names: Sequence[str]) -> None:
        prompt_ok = any(c in names for c in MANIFEST_PROMPT_COLUMNS)
        images_ok = all(c in names for c in MANIFEST_COLUMNS) or all(c in names for c in HPDV3_COLUMNS)
        missing = ([] if prompt_ok else ["prompt"]) + ([] if images_ok else [c for c in MANIFEST_COLUMNS if c not in names])
        if missing:
            raise DataError(
                f"{self.path} lacks column(s) {', '.join(missing)}; a manifest needs prompt, chosen, rejected "
                "(or HPDv3's prompt, path1, path2)"
            )

    @staticmethod
    def _entry(row: dict[str, Any], base: Path) -> tuple[str, str, str]:
        prompt = row.get("prompt", row.get("caption")) or ""
        chosen, rejected = ("chosen", "rejected") if "chosen" in row else HPDV3_COLUMNS
        return str(prompt), str(base / str(row[chosen])), str(base / str(row[rejected]))

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()),
                "bytes": self.path.stat().st_size, "rows": len(self.entries)}

    def scan(self) -> Iterator[ScannedRow]:
        for source_row, (prompt, _chosen, _rejected) in enumerate(self.entries):
            yield ScannedRow(source_row, prompt, False)

    def read(self, source_rows: Sequence[int]) -> Iterator[PairRecord]:
        for source_row in source_rows:
            prompt, chosen, rejected = self.entries[int(source_row)]
            yield PairRecord(int(source_row), prompt, _read_file(chosen), _read_file(rejected))


_NUMBER_CHARACTERS = frozenset("0123456789+-.eE")


def _json_array_items(handle: Any, path: Path, block: int = 1 << 20,
                      longest_element: int = 1 << 26) -> Iterator[Any]:
    """The elements of a JSON array whose opening "[" was just read, decoded one at a time from
    blocks of `block` characters (an HPDv3 train.json is far larger than it needs to be in memory).

    Strict about the array's shape: elements separated by single commas, no trailing comma, the
    closing "]" required; an element longer than `longest_element` characters is refused rather
    than read to the end of the file. Error positions count characters from the file's start."""
    decoder = json.JSONDecoder()
    buffer, position, offset, done = "", 0, 1, False  # offset: the file position of buffer[0]

    def refill() -> bool:
        nonlocal buffer, position, offset, done
        more = handle.read(block)
        offset += position
        buffer, position, done = buffer[position:] + more, 0, not more
        return bool(more)

    def next_character() -> str | None:
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position].isspace():
                position += 1
            if position < len(buffer):
                return buffer[position]
            if done or not refill():
                return None

    character = next_character()
    if character == "]":
        return
    while True:
        if character is None:
            raise DataError(f"{path} ends inside its JSON array (a truncated file?)")
        try:
            item, end = decoder.raw_decode(buffer, position)
        except ValueError:
            if len(buffer) - position > longest_element:
                raise DataError(f"{path}: the array element at character {offset + position} is not valid JSON "
                                f"within {longest_element} characters") from None
            if done or not refill():
                raise DataError(f"{path} is not a valid JSON array (near character {offset + position})") from None
            continue
        if isinstance(item, (int, float)) and not done and all(c in _NUMBER_CHARACTERS for c in buffer[end:]) \
                and refill():
            continue  # a number that reaches the end of the buffer ("-9.5" of "-9.5e3") may go on in the next block
        yield item
        position = end
        character = next_character()
        if character == "]":
            return
        if character is None:
            raise DataError(f"{path} ends inside its JSON array (a truncated file?)")
        if character != ",":
            raise DataError(f"{path}: expected , or ] after an array element at character {offset + position}")
        position += 1
        character = next_character()


def _read_file(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


# ---------------------------------------------------------------------------- opening
HUB_PREFIX = "hf:"


def open_source(data: str, split: str | None = None, columns: str | ColumnMap | None = None) -> PairSource:
    """Pick the source for DATA: `hf:ID`, a .jsonl/.csv manifest, or parquet file/folder/glob;
    `columns` (`--columns`) maps a parquet or hub dataset's columns to the pair's roles."""
    mapping = columns if isinstance(columns, ColumnMap) else parse_columns(columns)
    if data.startswith(HUB_PREFIX):
        return HubSource(data[len(HUB_PREFIX) :], split or "train", mapping)
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".csv"):
        if mapping != ColumnMap():
            raise DataError("--columns maps parquet and hub datasets; a manifest names its columns prompt, chosen, rejected")
        return ManifestSource(path)
    if path.is_file():
        return ParquetSource([path], split, mapping)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path} holds no .parquet files")
        wanted = split or "train"
        matching = [f for f in files if f.name.split("-")[0] == wanted]
        if matching:
            return ParquetSource(matching, wanted, mapping)
        if split is not None:
            raise DataError(f"{path} holds no parquet files of split {split!r} (names like {split}-00000-of-N.parquet)")
        return ParquetSource(files, None, mapping)
    matches = sorted(Path(p) for p in globlib.glob(data, recursive=True) if p.endswith(".parquet"))
    if matches:
        return ParquetSource(matches, split, mapping)
    if any(ch in data for ch in "*?["):
        raise DataError(f"no parquet files match {data!r}")
    raise DataError(
        f"data {data!r} not found: give a parquet file, folder or glob, a .jsonl/.csv manifest, or hf:DATASET_ID"
    )


# ---------------------------------------------------------------------------- images
@dataclass(frozen=True)
class PreparedImage:
    """An image resized and centre-cropped for the VAE, and the SDXL size conditioning."""

    pixels: np.ndarray  # (3, R, R) float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]


def prepare_image(data: bytes | None, resolution: int) -> PreparedImage | None:
    """Decode, convert to RGB, resize the short side to R (bilinear), centre-crop to R×R.

    Returns None when the bytes are not a fully decodable image, so the caller can drop the
    pair as a whole.
    """
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                image = opened.convert("RGB")
    except Exception:  # PIL raises many types for bad bytes; every one means "broken image"
        return None
    width, height = image.size
    if width < 1 or height < 1:
        return None
    new_width = resolution if width <= height else int(resolution * width / height)
    new_height = resolution if height <= width else int(resolution * height / width)
    resized = image.resize((new_width, new_height), Image.BILINEAR)
    top = int(round((new_height - resolution) / 2.0))
    left = int(round((new_width - resolution) / 2.0))
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(cropped, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return PreparedImage(np.ascontiguousarray(pixels), (height, width), (top, left))


def reopen_source(identity: dict[str, Any]) -> PairSource:
    """The source that `identity()` recorded (for redoing rows of an existing store)."""
    columns = ColumnMap.from_json(identity.get("columns"))
    if identity["kind"] == "parquet":
        return ParquetSource([Path(f["path"]) for f in identity["files"]], identity.get("split"), columns)
    if identity["kind"] == "manifest":
        return ManifestSource(Path(identity["path"]))
    return HubSource(identity["dataset"], identity["split"], columns)


def describe_source(source: PairSource) -> str:
    identity = source.identity()
    if identity["kind"] == "parquet":
        files = identity["files"]
        where = files[0]["path"] if len(files) == 1 else f"{len(files)} files under {os.path.commonpath([f['path'] for f in files])}"
        return f"parquet: {where}"
    if identity["kind"] == "hub":
        return f"hub dataset {identity['dataset']} [{identity['split']}]"
    return f"manifest: {identity['path']}"

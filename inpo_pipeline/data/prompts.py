"""Evaluation prompt sets: a text file, Pick-a-Pic captions, Parti-Prompts, the HPSv2 benchmark.

Every reader returns a :class:`PromptSet`: the prompts in a fixed order (their index names the
sampled images) and, where the benchmark has one, each prompt's group — Parti-Prompts'
``Category`` or the HPSv2 benchmark's style — so that win rates can be broken down by it.

* ``*.txt`` (or any other file): one prompt per line; blank lines are skipped.
* ``*.parquet``, a folder or a glob: Pick-a-Pic's ``caption`` column, deduplicated in order of
  first appearance, empty captions dropped (``test_unique`` holds 500 distinct captions; the
  plain ``test`` split repeats them). A folder means its ``test_unique-*.parquet`` files.
* ``*.tsv``: Parti-Prompts (``Prompt``, ``Category``, ``Challenge``, ``Note``; tab-separated,
  unquoted); group = Category.
* ``*.json``: the HPSv2 benchmark: a list of prompts (group = the file's stem, e.g. ``anime``),
  or an object ``{style: [prompts]}``; a folder of such files gives all styles.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo_pipeline.errors import UserError

PICKAPIC_EVAL_SPLIT = "test_unique"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    group: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """Prompts in order; `group_key` names what `Prompt.group` is ("category", "style" or None)."""

    kind: str
    source: str
    prompts: tuple[Prompt, ...]
    group_key: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """Identifies the prompts themselves (text, order, groups), not the file they came from."""
        content = [[p.text, p.group] for p in self.prompts]
        return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a sampling protocol records: equal for the same prompts read from any copy."""
        return {"kind": self.kind, "count": len(self.prompts), "group_key": self.group_key, "sha256": self.sha256}


def _make(kind: str, source: Path | str, entries: Iterable[tuple[str, str | None]], group_key: str | None) -> PromptSet:
    prompts = tuple(Prompt(i, text, group) for i, (text, group) in enumerate(entries))
    if not prompts:
        raise UserError(f"{source} holds no prompts")
    return PromptSet(kind, str(source), prompts, group_key)


def read_text_prompts(path: Path) -> PromptSet:
    lines = _read_text(path).splitlines()
    return _make("text", path, ((line.strip(), None) for line in lines if line.strip()), None)


def read_pickapic_prompts(files: list[Path], source: str) -> PromptSet:
    """Distinct non-empty captions of Pick-a-Pic parquet files, in order of first appearance."""
    import pyarrow.parquet as pq

    seen: dict[str, None] = {}
    for path in files:
        try:
            reader = pq.ParquetFile(path)
            if "caption" not in reader.schema_arrow.names:
                raise UserError(f"{path} has no 'caption' column; not a Pick-a-Pic parquet file")
            for batch in reader.iter_batches(batch_size=8192, columns=["caption"]):
                for caption in batch.column("caption").to_pylist():
                    if caption and caption.strip():
                        seen.setdefault(caption.strip(), None)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"{path} is not a readable parquet file ({type(error).__name__}: {error})") from error
    return _make("pickapic", source, ((caption, None) for caption in seen), None)


def _unquote(field: str) -> str:
    """A field wrapped in double quotes (as spreadsheet exports write them) loses the quoting."""
    field = field.strip()
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def read_parti_prompts(path: Path) -> PromptSet:
    rows = list(csv.reader(_read_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UserError(f"{path} is empty")
    header = [_unquote(name) for name in rows[0]]
    if "Prompt" not in header:
        raise UserError(f"{path} has no 'Prompt' column; Parti-Prompts TSV has Prompt, Category, Challenge, Note")
    column = header.index("Prompt")
    category = header.index("Category") if "Category" in header else None
    entries = []
    for number, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        if len(row) <= column:
            raise UserError(f"{path}:{number} has {len(row)} fields, fewer than the header's Prompt column")
        group = _unquote(row[category]) if category is not None and category < len(row) else None
        entries.append((_unquote(row[column]), group or None))
    return _make("parti", path, entries, "category" if category is not None else None)


def read_hps_prompts(files: list[Path], source: str) -> PromptSet:
    """HPSv2 benchmark JSON: each file a list of prompts (style = stem) or a {style: list} object."""
    entries: list[tuple[str, str | None]] = []
    for path in files:
        try:
            content = json.loads(_read_text(path))
        except ValueError as error:
            raise UserError(f"{path} is not valid JSON ({error.args[0]})") from error
        groups = content if isinstance(content, dict) else {path.stem: content}
        for style, prompts in groups.items():
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise UserError(f"{path}: style {style!r} is not a list of prompt strings (HPSv2 benchmark format)")
            entries.extend((p.strip(), str(style)) for p in prompts)
    return _make("hpsv2", source, entries, "style")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} as UTF-8 text ({type(error).__name__})") from error


def read_prompts(source: str) -> PromptSet:
    """The prompt set at SOURCE, chosen by suffix (file) or contents (folder) or as a glob."""
    path = Path(source)
    if path.is_dir():
        parquet = sorted(path.glob(f"{PICKAPIC_EVAL_SPLIT}-*.parquet"))
        if parquet:
            return read_pickapic_prompts(parquet, source)
        json_files = sorted(path.glob("*.json"))
        if json_files:
            return read_hps_prompts(json_files, source)
        raise UserError(
            f"{path} holds neither Pick-a-Pic {PICKAPIC_EVAL_SPLIT}-*.parquet files nor HPSv2 benchmark *.json files"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return read_pickapic_prompts([path], source)
        if suffix == ".tsv":
            return read_parti_prompts(path)
        if suffix == ".json":
            return read_hps_prompts([path], source)
        return read_text_prompts(path)
    matches = sorted(Path(p) for p in globlib.glob(source) if p.endswith(".parquet"))
    if matches:
        return read_pickapic_prompts(matches, source)
    raise UserError(f"prompt set {source!r} not found: give a text file, a Pick-a-Pic parquet file/folder/glob, "
                    "the Parti-Prompts TSV, or HPSv2 benchmark JSON")

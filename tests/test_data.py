"""Tests of ``inpo_pipeline.data.sources``: choosing a source, scanning and reading pairs, preparing images."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inpo_pipeline.data.sources import (
    DataError,
    HubSource,
    ManifestSource,
    ParquetSource,
    PreparedImage,
    open_source,
    parse_columns,
    prepare_image,
    reopen_source,
)
from inpo_pipeline.worlds.example import CAPTIONS, write_manifest, write_pickapic_folder, write_pickapic_parquet


# --------------------------------------------------------------------------------- helpers


def expected_pairs(files: list[Path]) -> list[dict]:
    """The raw parquet rows of `files`, concatenated, with the winner/loser worked out by hand."""
    rows = []
    for path in files:
        table = pq.read_table(path, columns=["caption", "jpg_0", "jpg_1", "label_0", "label_1"]).to_pylist()
        for row in table:
            tie = row["label_0"] == row["label_1"]
            winner = None if tie else (0 if row["label_0"] == 1.0 else 1)
            rows.append(
                {
                    "caption": row["caption"],
                    "tie": tie,
                    "chosen": None if tie else row[f"jpg_{winner}"],
                    "rejected": None if tie else row[f"jpg_{1 - winner}"],
                }
            )
    return rows


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_table(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Three train shards of 12 rows (row groups of 5, 5, 2) and one validation_unique shard."""
    root = tmp_path_factory.mktemp("folder")
    written = write_pickapic_folder(root, num_files=3, pairs_per_file=12, seed=10, row_group_size=5)
    write_pickapic_parquet(root / "validation_unique-00000-of-00001.parquet", num_pairs=6, seed=99, ties=1, broken=0)
    return root, written


# --------------------------------------------------------------------------------- open_source


def test_open_source_single_parquet_file(pickapic):
    source = open_source(str(pickapic["path"]))
    assert isinstance(source, ParquetSource)
    assert source.files == [pickapic["path"]]
    assert source.num_rows == 24
    identity = source.identity()
    assert identity["kind"] == "parquet"
    assert identity["rows"] == 24
    assert identity["files"] == [{"path": str(pickapic["path"].resolve()), "bytes": pickapic["path"].stat().st_size}]


def test_open_source_folder_defaults_to_train_split(folder):
    root, written = folder
    source = open_source(str(root))
    assert isinstance(source, ParquetSource)
    assert source.split == "train"
    assert [f.name for f in source.files] == [
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
    ]
    assert source.num_rows == 36


def test_open_source_folder_with_named_split(folder):
    root, _ = folder
    source = open_source(str(root), "validation_unique")
    assert isinstance(source, ParquetSource)
    assert source.split == "validation_unique"
    assert [f.name for f in source.files] == ["validation_unique-00000-of-00001.parquet"]
    assert source.num_rows == 6
    assert sum(row.is_tie for row in source.scan()) == 1


def test_open_source_folder_with_unknown_split_names_it(folder):
    root, _ = folder
    with pytest.raises(DataError, match="'test'"):
        open_source(str(root), "test")


def test_open_source_folder_without_split_names_uses_every_file(tmp_path):
    write_pickapic_parquet(tmp_path / "b.parquet", num_pairs=5, seed=1, ties=0, broken=0)
    write_pickapic_parquet(tmp_path / "sub" / "a.parquet", num_pairs=4, seed=2, ties=0, broken=0)
    source = open_source(str(tmp_path))
    assert isinstance(source, ParquetSource)
    assert source.split is None
    assert sorted(f.name for f in source.files) == ["a.parquet", "b.parquet"]
    assert source.num_rows == 9


def test_open_source_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no parquet here")
    with pytest.raises(DataError, match="no .parquet files"):
        open_source(str(tmp_path))


def test_open_source_glob(folder):
    root, _ = folder
    source = open_source(str(root / "train-0000[02]-*.parquet"))
    assert isinstance(source, ParquetSource)
    assert [f.name for f in source.files] == ["train-00000-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert source.num_rows == 24
    everything = open_source(str(root / "*.parquet"))
    assert len(everything.files) == 4
    assert everything.num_rows == 42


def test_open_source_glob_without_matches(tmp_path):
    with pytest.raises(DataError, match="no parquet files match"):
        open_source(str(tmp_path / "nothing-*.parquet"))


def test_open_source_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "absent.parquet"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_open_source_manifest(tmp_path, fmt):
    written = write_manifest(tmp_path / f"pairs.{fmt}", num_pairs=6, seed=4, fmt=fmt)
    source = open_source(str(written["path"]))
    assert isinstance(source, ManifestSource)
    assert len(source.entries) == 6
    assert source.identity()["kind"] == "manifest"
    assert source.identity()["rows"] == 6


def test_open_source_hub_without_datasets_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(DataError) as error:
        open_source("hf:yuvalkirstain/pickapic_v2")
    assert "pip install 'inpo[hub]'" in str(error.value)


def test_open_source_hub_reads_a_local_parquet_folder(tmp_path):
    pytest.importorskip("datasets")
    root = tmp_path / "hub"
    written = write_pickapic_folder(root, num_files=3, pairs_per_file=12, seed=10, row_group_size=5)
    source = open_source(f"hf:{root}", "train")
    assert isinstance(source, HubSource)
    expected = expected_pairs([w["path"] for w in written])
    scanned = list(source.scan())
    assert [r.source_row for r in scanned] == list(range(36))
    assert [r.is_tie for r in scanned] == [e["tie"] for e in expected]
    wanted = [r for r in range(36) if not expected[r]["tie"]][::3]
    records = list(source.read(wanted))
    assert [r.source_row for r in records] == wanted
    for record in records:
        assert record.chosen == expected[record.source_row]["chosen"]
        assert record.rejected == expected[record.source_row]["rejected"]


# --------------------------------------------------------------------------------- parquet


def test_parquet_scan_yields_every_row_in_order(pickapic):
    source = ParquetSource([pickapic["path"]], None)
    rows = list(source.scan())
    expected = expected_pairs([pickapic["path"]])
    assert [r.source_row for r in rows] == list(range(24))
    assert [r.caption for r in rows] == [e["caption"] for e in expected]
    assert [i for i, r in enumerate(rows) if r.is_tie] == pickapic["tie_rows"]
    assert len(pickapic["tie_rows"]) == 3
    assert "" in {r.caption for r in rows}


def test_parquet_scan_numbers_rows_across_files(folder):
    _, written = folder
    source = ParquetSource([w["path"] for w in written], "train")
    rows = list(source.scan())
    assert [r.source_row for r in rows] == list(range(36))
    expected_ties = [12 * i + t for i, w in enumerate(written) for t in w["tie_rows"]]
    assert [r.source_row for r in rows if r.is_tie] == expected_ties
    assert len(expected_ties) == 9
    assert [r.caption for r in rows] == [e["caption"] for e in expected_pairs([w["path"] for w in written])]
    # row groups of 5, 5, 2 per file, numbered globally
    assert source._row_groups[:4] == [(0, 5, 0, 0), (5, 10, 0, 1), (10, 12, 0, 2), (12, 17, 1, 0)]
    assert source._row_groups[-1] == (34, 36, 2, 2)


def test_parquet_read_subset_across_groups_and_files(folder):
    _, written = folder
    files = [w["path"] for w in written]
    source = ParquetSource(files, "train")
    expected = expected_pairs(files)
    non_ties = [r for r in range(36) if not expected[r]["tie"]]
    # first and last rows, rows at group borders, two rows of one group, rows in every file
    candidates = [0, 4, 5, 9, 11, 12, 13, 22, 23, 24, 30, 33, 34, 35]
    wanted = [r for r in candidates if r in non_ties]
    assert len(wanted) >= 10
    assert {r // 12 for r in wanted} == {0, 1, 2}
    records = list(source.read(wanted))
    assert [r.source_row for r in records] == wanted
    for record in records:
        row = expected[record.source_row]
        assert record.caption == row["caption"]
        assert record.chosen == row["chosen"]
        assert record.rejected == row["rejected"]
        assert record.chosen != record.rejected
    # both labellings occur, so "chosen = jpg of the label 1" is really tested both ways
    labels = pq.read_table(files[0], columns=["label_0"]).column("label_0").to_pylist()
    assert {1.0, 0.0} <= set(labels)


def test_parquet_read_chosen_is_the_image_labelled_1(tmp_path):
    path = write_table(
        tmp_path / "labels.parquet",
        {
            "caption": ["a", "b", "c"],
            "jpg_0": [b"A0", b"B0", b"C0"],
            "jpg_1": [b"A1", b"B1", b"C1"],
            "label_0": [1.0, 0.0, 1.0],
            "label_1": [0.0, 1.0, 0.0],
        },
    )
    records = list(open_source(str(path)).read([0, 1, 2]))
    assert [(r.chosen, r.rejected) for r in records] == [(b"A0", b"A1"), (b"B1", b"B0"), (b"C0", b"C1")]


def test_parquet_read_empty_selection(pickapic):
    assert list(ParquetSource([pickapic["path"]], None).read([])) == []


def test_parquet_read_of_a_tie_raises(pickapic):
    source = ParquetSource([pickapic["path"]], None)
    tie = pickapic["tie_rows"][0]
    with pytest.raises(DataError, match=f"source row {tie} is a tie"):
        list(source.read([tie]))


def test_parquet_missing_columns_are_named(tmp_path):
    path = write_table(tmp_path / "partial.parquet", {"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0]})
    with pytest.raises(DataError) as error:
        open_source(str(path))
    message = str(error.value)
    assert "jpg_1" in message and "label_1" in message
    assert "caption," not in message.split("lacks")[1].split(";")[0]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"PAR1 this is not really parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        open_source(str(path))
    text = tmp_path / "pairs.txt"
    text.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="not a readable parquet file"):
        open_source(str(text))


_MEMORY_PROBE = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from inpo_pipeline.data.sources import ParquetSource

def bytes_read():
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("rchar"))
    except OSError:
        return None

source = ParquetSource([Path(sys.argv[1])], None)
pool = pa.default_memory_pool()
before = bytes_read()
tracemalloc.start()
rows = list(source.scan())
python_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
after = bytes_read()
scan_arrow_peak = pool.max_memory()
records = list(source.read(json.loads(sys.argv[2])))
print(json.dumps({
    "rows": len(rows), "ties": [r.source_row for r in rows if r.is_tie],
    "python_peak": python_peak, "arrow_peak": scan_arrow_peak,
    "read_bytes": None if before is None else after - before,
    "read_rows": [r.source_row for r in records], "read_sizes": [len(r.chosen) for r in records],
    "read_arrow_peak": pool.max_memory(),
}))
"""


def test_parquet_scan_does_not_read_image_columns(tmp_path):
    """Scanning 80 MB of images allocates (and reads) only the caption and label columns."""
    rows, image_size, group = 400, 100_000, 20
    blob = np.random.default_rng(0).bytes(2 * rows * image_size)
    images = [blob[i * image_size : (i + 1) * image_size] for i in range(2 * rows)]
    ties = [r for r in range(rows) if r % 10 == 5]
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table(
            {
                "caption": [f"prompt {r}" for r in range(rows)],
                "jpg_0": pa.array(images[:rows], pa.binary()),
                "jpg_1": pa.array(images[rows:], pa.binary()),
                "label_0": [0.5 if r in ties else float(r % 2) for r in range(rows)],
                "label_1": [0.5 if r in ties else float(1 - r % 2) for r in range(rows)],
            }
        ),
        path,
        row_group_size=group,
        compression="none",
    )
    image_bytes = 2 * rows * image_size
    group_bytes = 2 * group * image_size
    assert path.stat().st_size > image_bytes
    wanted = [1 + group * g for g in range(rows // group)] + [rows - 1]  # one row from every group
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), json.dumps(wanted)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == rows
    assert report["ties"] == ties
    assert report["python_peak"] < image_bytes / 10
    assert report["arrow_peak"] < image_bytes / 10
    if report["read_bytes"] is not None:
        assert report["read_bytes"] < image_bytes / 10
    # read() holds about one row group at a time, not the file
    assert report["read_rows"] == wanted
    assert report["read_sizes"] == [image_size] * len(wanted)
    assert report["read_arrow_peak"] < 5 * group_bytes <= image_bytes / 4, report["read_arrow_peak"]


# --------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_scan_and_read(tmp_path, monkeypatch, fmt):
    written = write_manifest(tmp_path / "data" / f"pairs.{fmt}", num_pairs=8, seed=5, fmt=fmt)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative image paths resolve against the manifest's folder
    source = open_source(str(Path("..") / "data" / f"pairs.{fmt}"))
    if fmt == "jsonl":
        lines = [json.loads(line) for line in written["path"].read_text(encoding="utf-8").splitlines()]
    else:
        with written["path"].open(encoding="utf-8", newline="") as handle:
            lines = list(csv.DictReader(handle))
    scanned = list(source.scan())
    assert [r.source_row for r in scanned] == list(range(8))
    assert [r.caption for r in scanned] == [line["prompt"] for line in lines]
    assert not any(r.is_tie for r in scanned)
    missing_row, corrupt_row = written["broken_rows"][0], written["broken_rows"][1]
    records = list(source.read(range(8)))
    assert [r.source_row for r in records] == list(range(8))
    images = tmp_path / "data"
    for record, line in zip(records, lines):
        assert record.caption == line["prompt"]
        chosen = images / line["chosen"]
        assert record.chosen == (chosen.read_bytes() if chosen.exists() else None)
        assert record.rejected == (images / line["rejected"]).read_bytes()
    nones = [r.source_row for r in records if r.chosen is None]
    assert len(nones) == 1 and nones[0] in (missing_row, corrupt_row)
    broken = {r.source_row for r in records
              if prepare_image(r.chosen, 16) is None or prepare_image(r.rejected, 16) is None}
    assert broken == set(written["broken_rows"])
    subset = list(source.read([6, 2]))
    assert [r.source_row for r in subset] == [6, 2]


def test_manifest_absolute_paths_and_caption_column(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(encode(Image.new("RGB", (4, 4))))
    manifest = tmp_path / "sub" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"caption": "cap", "chosen": str(image), "rejected": "../img.png"}) + "\n")
    (record,) = open_source(str(manifest)).read([0])
    assert record.caption == "cap"
    assert record.chosen == record.rejected == image.read_bytes()


def test_manifest_missing_column_jsonl(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"prompt": "a", "chosen": "x.png", "rejected": "y.png"}) + "\n"
        + json.dumps({"prompt": "b", "chosen": "x.png"}) + "\n"
    )
    with pytest.raises(DataError, match="lacks column.*rejected"):
        open_source(str(manifest))


def test_manifest_missing_columns_csv(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("text,rejected\nhello,y.png\n")
    with pytest.raises(DataError) as error:
        open_source(str(manifest))
    assert "prompt" in str(error.value) and "chosen" in str(error.value)
    assert "rejected" not in str(error.value).split("lacks")[1].split(";")[0]


def test_manifest_invalid_json_names_the_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "x.png", "rejected": "y.png"})
    manifest.write_text(good + "\n\n" + '{"prompt": "b", "chosen": ' + "\n" + good + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:3 is not valid JSON"):
        open_source(str(manifest))


def test_manifest_json_line_that_is_not_an_object(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "a", "chosen": "x.png", "rejected": "y.png"}) + "\n42\n")
    with pytest.raises(DataError):
        open_source(str(manifest))


def test_manifest_empty(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        open_source(str(manifest))


def test_manifest_csv_with_quoted_commas(tmp_path):
    prompt = 'a sign that says "hello, world", twice'
    (tmp_path / "a, b.png").write_bytes(b"chosen bytes")
    (tmp_path / "c.png").write_bytes(b"rejected bytes")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected", "extra"])
        writer.writerow([prompt, "a, b.png", "c.png", "ignored, too"])
        writer.writerow([CAPTIONS[4], "c.png", "a, b.png", ""])
    raw = manifest.read_text(encoding="utf-8")
    assert '"a sign that says ""hello, world"", twice"' in raw
    source = open_source(str(manifest))
    assert [r.caption for r in source.scan()] == [prompt, CAPTIONS[4]]
    first, second = source.read([0, 1])
    assert (first.chosen, first.rejected) == (b"chosen bytes", b"rejected bytes")
    assert (second.chosen, second.rejected) == (b"rejected bytes", b"chosen bytes")
    assert second.caption == CAPTIONS[4]


# --------------------------------------------------------------------------------- images


def test_prepare_image_shape_range_dtype(pickapic):
    (record,) = ParquetSource([pickapic["path"]], None).read([pickapic["kept_rows"][0]])
    prepared = prepare_image(record.chosen, 24)
    assert isinstance(prepared, PreparedImage)
    assert prepared.pixels.shape == (3, 24, 24)
    assert prepared.pixels.dtype == np.float32
    assert prepared.pixels.flags["C_CONTIGUOUS"]
    assert prepared.pixels.min() >= -1.0 and prepared.pixels.max() <= 1.0
    assert prepared.pixels.std() > 0


def test_prepare_image_resize_and_centre_crop_wide():
    """97 wide × 61 high, R = 32: the short side becomes 32, the long int(32·97/61) = 50, crop 9 px from the left."""
    width, height, resolution = 97, 61, 32
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (48, 0, width, height))  # right 49 columns blue
    prepared = prepare_image(encode(image), resolution)
    assert prepared.original_size == (61, 97)
    new_width = int(resolution * width / height)
    assert new_width == 50
    assert prepared.crop_top_left == (0, round((new_width - resolution) / 2)) == (0, 9)
    pixels = prepared.pixels
    assert pixels.shape == (3, 32, 32)
    # the red/blue border sits at 48/97·50 − 9 ≈ 15.7 in the crop (uncropped: 24.7, right crop: 6.7)
    red = pixels[0].mean(axis=0)
    assert np.all(red[:14] == 1.0)
    assert np.all(red[18:] == -1.0)
    assert np.all(pixels[2][:, 18:] == 1.0)
    assert np.all(pixels[1] == -1.0)


def test_prepare_image_resize_and_centre_crop_tall():
    width, height, resolution = 40, 91, 32
    image = Image.new("L", (width, height), 0)
    image.paste(255, (0, 0, width, 45))  # top 45 rows white
    prepared = prepare_image(encode(image), resolution)
    assert prepared.original_size == (91, 40)
    new_height = int(resolution * height / width)
    assert new_height == 72
    assert prepared.crop_top_left == (round((new_height - resolution) / 2), 0) == (20, 0)
    # the border at 45/91·72 − 20 ≈ 15.6
    column = prepared.pixels[0][:, 16]
    assert np.all(column[:14] == 1.0) and np.all(column[18:] == -1.0)
    assert np.array_equal(prepared.pixels[0], prepared.pixels[1])
    assert np.array_equal(prepared.pixels[0], prepared.pixels[2])


def test_prepare_image_square_upscale():
    prepared = prepare_image(encode(Image.new("RGB", (10, 10), (0, 255, 0))), 32)
    assert prepared.original_size == (10, 10)
    assert prepared.crop_top_left == (0, 0)
    assert np.all(prepared.pixels[1] == 1.0)
    assert np.all(prepared.pixels[[0, 2]] == -1.0)


@pytest.mark.parametrize(
    ("colour", "expected"),
    [((255, 0, 0), (1.0, -1.0, -1.0)), ((0, 0, 255), (-1.0, -1.0, 1.0)), ((51, 102, 255), (51 / 127.5 - 1, 102 / 127.5 - 1, 1.0))],
)
def test_prepare_image_solid_colour_values(colour, expected):
    prepared = prepare_image(encode(Image.new("RGB", (50, 30), colour)), 16)
    for channel, value in enumerate(expected):
        assert np.allclose(prepared.pixels[channel], np.float32(value), rtol=0, atol=1e-6)
    assert prepared.pixels[0, 0, 0] == np.float32(expected[0])


def test_prepare_image_grayscale_and_rgba():
    gray = prepare_image(encode(Image.new("L", (20, 30), 255)), 8)
    assert gray.pixels.shape == (3, 8, 8)
    assert np.all(gray.pixels == 1.0)
    rgba = prepare_image(encode(Image.new("RGBA", (30, 20), (0, 255, 0, 128))), 8)
    assert rgba.pixels.shape == (3, 8, 8)
    assert np.all(rgba.pixels[1] == 1.0) and np.all(rgba.pixels[[0, 2]] == -1.0)
    palette = prepare_image(encode(Image.new("RGB", (12, 12), (255, 0, 0)).convert("P")), 8)
    assert palette.pixels.shape == (3, 8, 8)
    assert np.all(palette.pixels[0] == 1.0)


def test_prepare_image_jpeg():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    data = encode(noise, "JPEG", quality=90)
    prepared = prepare_image(data, 32)
    assert prepared.pixels.shape == (3, 32, 32)
    assert prepared.original_size == (64, 80)
    assert prepared.crop_top_left == (0, 4)  # new width int(32·80/64) = 40


@pytest.mark.parametrize("case", ["truncated_jpeg", "truncated_png", "header_only", "garbage", "empty", "none"])
def test_prepare_image_undecodable(case):
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg, png = encode(noise, "JPEG", quality=90), encode(noise)
    data = {
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 2],
        "header_only": jpeg[:40],
        "garbage": b"not an image",
        "empty": b"",
        "none": None,
    }[case]
    assert prepare_image(data, 16) is None


def test_prepare_image_drops_the_broken_fixture_pairs(pickapic):
    source = ParquetSource([pickapic["path"]], None)
    non_ties = sorted(set(range(24)) - set(pickapic["tie_rows"]))
    assert sorted(pickapic["kept_rows"] + pickapic["broken_rows"]) == non_ties
    records = list(source.read(non_ties))
    broken = [r.source_row for r in records
              if prepare_image(r.chosen, 16) is None or prepare_image(r.rejected, 16) is None]
    assert broken == pickapic["broken_rows"]


# --------------------------------------------------------------------------------- column mapping


def _renamed(source: Path, target: Path, chosen_layout: bool, struct_images: bool = False) -> Path:
    """`source`'s pairs under other column names: text/win/lose (chosen first) or text/a/b/sa/sb."""
    table = pq.read_table(source, columns=["caption", "jpg_0", "jpg_1", "label_0", "label_1"]).to_pylist()
    rows = [row for row in table if not chosen_layout or row["label_0"] != row["label_1"]]

    def image(data: bytes):
        return {"bytes": data, "path": None} if struct_images else data

    if chosen_layout:
        columns = {"text": [r["caption"] for r in rows],
                   "win": [image(r["jpg_0"] if r["label_0"] > r["label_1"] else r["jpg_1"]) for r in rows],
                   "lose": [image(r["jpg_1"] if r["label_0"] > r["label_1"] else r["jpg_0"]) for r in rows]}
    else:
        columns = {"text": [r["caption"] for r in rows], "a": [image(r["jpg_0"]) for r in rows],
                   "b": [image(r["jpg_1"]) for r in rows], "sa": [r["label_0"] for r in rows],
                   "sb": [r["label_1"] for r in rows]}
    return write_table(target, columns)


@pytest.mark.parametrize("struct_images", [False, True])
def test_a_chosen_rejected_dataset_through_a_column_mapping(pickapic, tmp_path, struct_images):
    path = _renamed(pickapic["path"], tmp_path / "mapped.parquet", chosen_layout=True, struct_images=struct_images)
    with pytest.raises(DataError, match="lacks column.*--columns"):
        open_source(str(path))
    source = open_source(str(path), columns="prompt=text,chosen=win,rejected=lose")
    expected = [row for row in expected_pairs([pickapic["path"]]) if not row["tie"]]
    scanned = list(source.scan())
    assert [row.caption for row in scanned] == [row["caption"] for row in expected] and not any(r.is_tie for r in scanned)
    records = list(source.read(list(range(len(expected)))))
    assert [(r.chosen, r.rejected) for r in records] == [(row["chosen"], row["rejected"]) for row in expected]
    assert source.identity()["columns"] == {"caption": "text", "chosen": "win", "rejected": "lose"}
    reopened = reopen_source(source.identity())
    assert [r.chosen for r in reopened.read([0, 2])] == [records[0].chosen, records[2].chosen]


def test_a_labelled_dataset_under_other_names_keeps_its_ties(pickapic, tmp_path):
    path = _renamed(pickapic["path"], tmp_path / "labelled.parquet", chosen_layout=False)
    source = open_source(str(path), columns="caption=text,jpg_0=a,jpg_1=b,label_0=sa,label_1=sb")
    expected = expected_pairs([pickapic["path"]])
    assert [r.is_tie for r in source.scan()] == [row["tie"] for row in expected]
    usable = [i for i, row in enumerate(expected) if not row["tie"]]
    assert [r.chosen for r in source.read(usable)] == [expected[i]["chosen"] for i in usable]
    assert "columns" not in open_source(str(pickapic["path"])).identity()  # Pick-a-Pic's names: identity as before


@pytest.mark.parametrize("text, message", [
    ("prompt=text,chosen=win", "chosen and rejected go together"),
    ("prompt=text,winner=win", "ROLE=COLUMN"),
    ("chosen=a,rejected=b,jpg_0=c", "not both"),
    ("prompt=a,caption=b", "twice"),
])
def test_column_mapping_errors_are_one_line(text, message):
    with pytest.raises(DataError, match=message):
        parse_columns(text)


def test_invert_reads_a_mapped_dataset_and_verify_recomputes_from_it(tiny_sd15, pickapic, tmp_path):
    from typer.testing import CliRunner

    from cache_schema import CacheStore
    from inpo_pipeline.cli.app import app

    path = _renamed(pickapic["path"], tmp_path / "mapped.parquet", chosen_layout=True)
    out = tmp_path / "mapped.zarr"
    result = CliRunner().invoke(app, ["invert", "--model", str(tiny_sd15), "--data", str(path), "--out", str(out),
                                      "--columns", "prompt=text,chosen=win,rejected=lose", "--resolution", "32",
                                      "--rows-per-shard", "4", "--shards-per-window", "2", "--max-pairs", "6"])
    assert result.exit_code == 0, result.output
    assert CacheStore.open(out).settings["data"]["columns"]["chosen"] == "win"
    verify = CliRunner().invoke(app, ["cache", "verify", str(out), "--recompute", "2"])
    assert verify.exit_code == 0, verify.output


@pytest.mark.parametrize("layout", ["array", "jsonl"])
def test_hpdv3_layout_path1_is_preferred_and_arrays_stream(tmp_path, monkeypatch, layout):
    import inpo_pipeline.data.sources as data_module

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for index in range(5):
        (images / f"{index}-a.png").write_bytes(f"preferred {index}".encode())
        (images / f"{index}-b.png").write_bytes(f"rejected {index}".encode())
        rows.append({"prompt": f"prompt, \"{index}\" [x]", "path1": f"images/{index}-a.png",
                     "path2": f"images/{index}-b.png", "model1": "m1", "model2": "m2", "confidence": 0.5 + index / 100,
                     "choice_dist": [3, index], "source": "hpdv3"})
    path = tmp_path / ("train.json" if layout == "array" else "train.jsonl")
    if layout == "array":
        path.write_text(" \n" + json.dumps(rows, indent=1), encoding="utf-8")
        original = data_module._json_array_items
        # tiny blocks: every element, number and string straddles a block boundary somewhere
        monkeypatch.setattr(data_module, "_json_array_items", lambda handle, p: original(handle, p, block=7))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    source = open_source(str(path))
    assert [r.caption for r in source.scan()] == [row["prompt"] for row in rows]
    records = list(source.read([4, 0]))
    assert [(r.chosen, r.rejected) for r in records] == [(b"preferred 4", b"rejected 4"), (b"preferred 0", b"rejected 0")]


def test_a_truncated_or_invalid_json_array_is_one_line(tmp_path):
    truncated = tmp_path / "cut.json"
    truncated.write_text('[{"prompt": "a", "path1": "x.png", "path2": "y.png"}, {"prompt": "b", "pa')
    with pytest.raises(DataError, match="not a valid JSON array|ends inside"):
        open_source(str(truncated))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('[{"prompt": "a", "image": "x.png"}]')
    with pytest.raises(DataError, match="path1, path2"):
        open_source(str(wrong))


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_json_array_elements_at_every_block_size(block):
    import io

    from inpo_pipeline.data.sources import _json_array_items

    def items(text: str) -> list:
        handle = io.StringIO(text)
        assert handle.read(1) == "["
        return list(_json_array_items(handle, Path("a.json"), block=block))

    assert items('[12345, 678 ,\n-9.5e3,"x,]",[1,[2]],{"k":[]}]') == [12345, 678, -9.5e3, "x,]", [1, [2]], {"k": []}]
    assert items("[ ]") == [] and items("[0]") == [0]
    with pytest.raises(DataError, match=r"expected , or \] after an array element at character 9"):
        items('[{"a":1} {"b":2}]')
    with pytest.raises(DataError, match="not a valid JSON array"):
        items("[1,]")
    with pytest.raises(DataError, match="near character 7"):
        items("[1, 2, x, 4]")
    with pytest.raises(DataError, match="ends inside"):
        items("[1, 2")
    with pytest.raises(DataError, match="ends inside"):
        items("[1, 2,")


def test_an_overlong_json_array_element_is_refused_without_reading_on():
    import io

    from inpo_pipeline.data.sources import _json_array_items

    handle = io.StringIO('["' + "x" * 1000)
    handle.read(1)
    with pytest.raises(DataError, match="at character 1 is not valid JSON within 100 characters"):
        list(_json_array_items(handle, Path("a.json"), block=10, longest_element=100))
    assert handle.tell() < 200

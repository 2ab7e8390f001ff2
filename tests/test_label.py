"""`inpo label`: labels follow the scorer, ties by the margin, metadata, and the dataset feeds stage one."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.cli.app import app
from inpo_pipeline.data.sources import open_source
from inpo_pipeline.errors import UserError
from inpo_pipeline.data.labels import pair_by_seed, preference_label
from stages.label import LabelOptions, read_label_metadata, run_label
from stages.sample import SampleOptions, run_sample

PROMPTS = world.TRAIN_PROMPTS[:4]
SEEDS = 3  # odd: each prompt leaves its last seed without a partner


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("label")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = folder / "samples"
    run_sample(SampleOptions(model=str(world.DEFAULT_WORLD), prompts=str(prompts), out=str(out), seeds=SEEDS,
                             steps=4, guidance=3.0, batch_size=16))
    return out


def _decoded_reward(table, side: int) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    images = np.stack([np.asarray(Image.open(BytesIO(data)).convert("RGB")) for data in table[f"jpg_{side}"].to_pylist()])
    return world.reward(images, table["caption"].to_pylist())


def test_preference_label_rule():
    assert preference_label(0.3, 0.1) == 1.0
    assert preference_label(0.1, 0.3) == 0.0
    assert preference_label(0.2, 0.2) == 0.5
    assert preference_label(0.30, 0.25, tie_margin=0.05) == 0.5  # a gap equal to the margin is a tie
    assert preference_label(0.31, 0.25, tie_margin=0.05) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        preference_label(float("nan"), 0.1)


def test_pairs_are_consecutive_seeds_within_a_prompt():
    class Image:
        def __init__(self, prompt_index, seed):
            self.prompt, self.prompt_index, self.seed = f"p{prompt_index}", prompt_index, seed

    images = [Image(p, s) for s in (4, 0, 3, 1, 2) for p in (7, 2)]
    pairs, unpaired = pair_by_seed(images, lambda i: i.prompt_index, lambda i: i.seed)
    assert unpaired == 2
    assert [(pair.prompt_index, pair.first.seed, pair.second.seed) for pair in pairs] == \
        [(7, 0, 1), (7, 2, 3), (2, 0, 1), (2, 2, 3)]


def test_labels_follow_the_shapes_reward(samples, tmp_path):
    out = tmp_path / "labelled.parquet"
    summary = run_label(LabelOptions(samples=str(samples), out=str(out), scorer="shapes"))
    table = pq.read_table(out)
    assert summary["pairs"] == table.num_rows == len(PROMPTS) * (SEEDS // 2)
    assert summary["unpaired_images"] == len(PROMPTS)
    assert table["seed_0"].to_pylist() == [0] * len(PROMPTS) and table["seed_1"].to_pylist() == [1] * len(PROMPTS)
    score_0, score_1 = np.array(table["score_0"].to_pylist()), np.array(table["score_1"].to_pylist())
    # the scores are the world's reward of the very bytes in the dataset
    np.testing.assert_allclose(score_0, _decoded_reward(table, 0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(score_1, _decoded_reward(table, 1), rtol=0, atol=1e-12)
    label_0 = np.array(table["label_0"].to_pylist())
    np.testing.assert_array_equal(label_0, np.where(score_0 > score_1, 1.0, 0.0))
    np.testing.assert_array_equal(np.array(table["label_1"].to_pylist()), 1.0 - label_0)
    assert summary["first_preferred"] == int(label_0.sum())
    assert len(set(label_0)) == 2, "four pairs of a random model should not all agree on one side"


def test_ties_by_margin_and_stage_one_drops_them(samples, tmp_path):
    plain = pq.read_table(run_label(LabelOptions(samples=str(samples), out=str(tmp_path / "a.parquet"),
                                                 scorer="shapes"))["out"])
    gaps = np.abs(np.array(plain["score_0"].to_pylist()) - np.array(plain["score_1"].to_pylist()))
    margin = float(np.sort(gaps)[1])  # the two smallest gaps become ties
    out = tmp_path / "ties.parquet"
    summary = run_label(LabelOptions(samples=str(samples), out=str(out), scorer="shapes", tie_margin=margin))
    table = pq.read_table(out)
    label_0 = np.array(table["label_0"].to_pylist())
    np.testing.assert_array_equal(label_0 == 0.5, gaps <= margin)
    assert summary["ties"] == int((gaps <= margin).sum()) == 2
    assert all(uid == "" for uid, label in zip(table["best_image_uid"].to_pylist(), label_0) if label == 0.5)
    rows = list(open_source(str(out)).scan())
    assert [row.is_tie for row in rows] == list(label_0 == 0.5)


def test_metadata_records_scorer_margin_and_source(samples, tmp_path):
    out = tmp_path / "meta.parquet"
    run_label(LabelOptions(samples=str(samples), out=str(out), scorer="shapes", scorer_model="brightness",
                           tie_margin=0.25))
    metadata = read_label_metadata(out)
    assert metadata["scorer"]["scorer"] == "shapes" and metadata["scorer"]["model"] == "brightness"
    assert metadata["tie_margin"] == 0.25
    assert metadata["score_columns"] == ["score_0", "score_1"]
    assert metadata["source"]["folder"] == str(samples.resolve())
    assert metadata["source"]["model"]["model"] == str(world.DEFAULT_WORLD)
    assert metadata["source"]["protocol"]["steps"] == 4
    table = pq.read_table(out)
    np.testing.assert_allclose(table["score_0"].to_pylist(), world.brightness_reward(
        np.stack([np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(samples / f).convert("RGB"))
                  for f in table["image_0_uid"].to_pylist()])), atol=1e-12)


def test_cli_label_and_its_errors(samples, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    result = runner.invoke(app, ["label", str(samples), "--scorer", "shapes", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "inpo label" in result.output and out.exists()
    again = runner.invoke(app, ["label", str(samples), "--scorer", "shapes", "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    wrong = runner.invoke(app, ["label", str(samples), "--scorer", "shapes", "--scorer-model", "smell",
                                "--out", str(tmp_path / "x.parquet")])
    assert wrong.exit_code == 2 and "not a shapes-world reward" in wrong.output


def test_one_seed_per_prompt_is_refused(samples, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    records = [json.loads(line) for line in (samples / "manifest.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["seed"] == 0]
    for record in kept:
        (single / record["file"]).write_bytes((samples / record["file"]).read_bytes())
    (single / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    with pytest.raises(UserError, match="--seeds 2"):
        run_label(LabelOptions(samples=str(single), out=str(tmp_path / "none.parquet"), scorer="shapes"))


def test_a_failed_labelling_leaves_nothing(samples, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    records = [json.loads(line) for line in (samples / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        (foreign / record["file"]).write_bytes((samples / record["file"]).read_bytes())
        record["prompt"] = "a photograph of a dog"  # no colour: the shapes reward cannot score it
    (foreign / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "failed.parquet"
    with pytest.raises(UserError, match="names none of the colours"):
        run_label(LabelOptions(samples=str(foreign), out=str(out), scorer="shapes"))
    assert list(tmp_path.glob("*failed*")) == [] and list(tmp_path.glob(".*labelling")) == []


def test_negated_and_random_shapes_scorers_give_mirror_and_coin_labels(samples, tmp_path):
    plain = pq.read_table(run_label(LabelOptions(samples=str(samples), out=str(tmp_path / "plain.parquet"),
                                                 scorer="shapes"))["out"])
    negated = pq.read_table(run_label(LabelOptions(samples=str(samples), out=str(tmp_path / "neg.parquet"),
                                                   scorer="shapes", scorer_model="-colour"))["out"])
    np.testing.assert_array_equal(np.array(negated["label_0"].to_pylist()), 1.0 - np.array(plain["label_0"].to_pylist()))
    np.testing.assert_array_equal(np.array(negated["score_0"].to_pylist()), -np.array(plain["score_0"].to_pylist()))
    coin = [pq.read_table(run_label(LabelOptions(samples=str(samples), out=str(tmp_path / f"r{seed}-{i}.parquet"),
                                                 scorer="shapes", scorer_model=f"random@{seed}"))["out"])
            for i, seed in enumerate((0, 0, 1))]
    assert coin[0]["score_0"].to_pylist() == coin[1]["score_0"].to_pylist() != coin[2]["score_0"].to_pylist()
    assert all(0 <= value < 1 for value in coin[0]["score_0"].to_pylist())
    with pytest.raises(UserError, match="not a shapes-world reward"):
        run_label(LabelOptions(samples=str(samples), out=str(tmp_path / "bad.parquet"), scorer="shapes",
                               scorer_model="random@x"))


def test_a_read_error_is_reported_as_a_read_error(samples, tmp_path, monkeypatch):
    from inpo_pipeline.evaluation import report as evaluation

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(evaluation, "load_rgb", unreadable)
    out = tmp_path / "labels.parquet"
    with pytest.raises(UserError, match=r"^cannot read .*\.png: Permission denied"):
        run_label(LabelOptions(samples=str(samples), out=str(out), scorer="shapes"))
    assert list(tmp_path.iterdir()) == []

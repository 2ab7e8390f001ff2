"""`inpo eval` on folders sampled from the tiny SD1.5 pipeline (base vs a perturbed UNet), scored by
tiny random CLIP scorers: report numbers against direct computations, ties, groups, the markdown
and the PNG, unavailable scorers and the errors a user can hit."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from inpo_pipeline.evaluation.plots import COLOURS, PANEL, value_range
from inpo_pipeline.reporting import Reporter
from inpo_pipeline.evaluation.sampling import MANIFEST, read_manifest
from inpo_pipeline.evaluation.stats import compare_scores
from stages.evaluate import assign_to_scorers, report_paths
from stages.sample import SampleOptions, run_sample
from inpo_pipeline.cli.app import app
from tests.sampling_helpers import perturbed_unet
from tests.tiny_scorers import scorer_files  # noqa: F401  (a fixture)
from tests.tiny_scorers import direct_aesthetic, direct_embeddings, direct_hps

runner = CliRunner()
PARTI = ("Prompt\tCategory\tChallenge\tNote\n"
         "a red fox in a snowy forest\tAnimals\tBasic\t\n"
         "an astronaut cat, oil painting\tAnimals\tImagination\t\n"
         "a lighthouse at dusk\tOutdoor Scenes\tBasic\t\n")
IMAGEREWARD_MISSING = __import__("importlib.util").util.find_spec("ImageReward") is None


def evaluate(*args: str):
    return runner.invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_sd15) -> tuple[Path, Path]:
    """Base and 'aligned' (perturbed UNet) images of 3 Parti-style prompts × 2 seeds."""
    root = tmp_path_factory.mktemp("eval")
    (root / "parti.tsv").write_text(PARTI, encoding="utf-8")
    perturbed_unet(tiny_sd15, root / "run" / "unet", seed=5)
    common = dict(model=str(tiny_sd15), prompts=str(root / "parti.tsv"), seeds=2, steps=2, resolution=32, batch_size=6)
    run_sample(SampleOptions(out=str(root / "base"), **common), Reporter(enabled=False))
    run_sample(SampleOptions(out=str(root / "aligned"), unet=str(root / "run" / "unet"), **common), Reporter(enabled=False))
    return root / "base", root / "aligned"


def direct_pickscores(folder: Path, clip: Path) -> dict[str, float]:
    records = read_manifest(folder)
    pictures = [Image.open(folder / r["file"]) for r in records]
    model, _pixels, _tokens, image, text = direct_embeddings(clip, pictures, [r["prompt"] for r in records])
    scores = ((image * text).sum(-1) * model.logit_scale.exp()).tolist()
    return {r["file"]: s for r, s in zip(records, scores)}


def test_two_folders_pickscore_report(folders, scorer_files, tmp_path):
    base, aligned = folders
    out = tmp_path / "report"
    result = evaluate(str(base), str(aligned), "--scorer", "pickscore", "--scorer-model", str(scorer_files.clip),
                      "--processor", str(scorer_files.clip), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["pairs"], report["unpaired"], report["group_key"]) == (6, {"A": 0, "B": 0}, "category")
    direct_a, direct_b = direct_pickscores(base, scorer_files.clip), direct_pickscores(aligned, scorer_files.clip)
    images = report["images"]
    assert [i["file"] for i in images] == [r["file"] for r in read_manifest(base)]
    for image in images:
        assert image["scores"]["pickscore"]["A"] == pytest.approx(direct_a[image["file"]], abs=1e-4)
        assert image["scores"]["pickscore"]["B"] == pytest.approx(direct_b[image["file"]], abs=1e-4)
    a = [i["scores"]["pickscore"]["A"] for i in images]
    b = [i["scores"]["pickscore"]["B"] for i in images]
    assert len(set(a) | set(b)) == 12  # twelve different images: no accidental ties
    section = report["scorers"]["pickscore"]
    assert section["identity"] == {"scorer": "pickscore", "model": str(scorer_files.clip), "processor": str(scorer_files.clip),
                                   "backbone": None}
    assert section["A"] == {"n": 6, "mean": statistics.fmean(a), "median": statistics.median(a),
                            "std": pytest.approx(statistics.stdev(a))}
    assert section["B"]["mean"] == statistics.fmean(b) and section["B"]["median"] == statistics.median(b)
    wins = sum(y > x for x, y in zip(a, b))
    rate = section["win_rate"]
    assert (rate["wins"], rate["ties"], rate["losses"], rate["n"]) == (wins, 0, 6 - wins, 6)
    assert rate["rate"] == pytest.approx(wins / 6)
    prompts = [i["prompt"] for i in images]
    expected = compare_scores(a, b, prompts).win_rate  # prompts are the clusters of the interval and the test
    assert (rate["low"], rate["high"], rate["p_value"]) == pytest.approx((expected.low, expected.high, expected.p_value))
    assert rate["prompts"] == len(set(prompts)) and 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1
    assert rate["mean_difference"]["estimate"] == pytest.approx(statistics.fmean(b) - statistics.fmean(a))
    groups = section["by_group"]
    assert list(groups) == ["Animals", "Outdoor Scenes"]
    assert [groups[g]["win_rate"]["n"] for g in groups] == [4, 2]
    assert groups["Animals"]["win_rate"]["wins"] == sum(y > x for x, y in zip(a[:4], b[:4]))
    assert groups["Outdoor Scenes"]["A"]["mean"] == pytest.approx(statistics.fmean(a[4:]))
    assert [i["category"] for i in images] == ["Animals"] * 4 + ["Outdoor Scenes"] * 2

    markdown = (tmp_path / "report.md").read_text()
    assert f"| pickscore | {statistics.fmean(a):.4f} | {statistics.median(a):.4f} | {statistics.fmean(b):.4f} |" in markdown
    assert (f"{wins} / 0 / {6 - wins} | {wins / 6:.1%} [{rate['low']:.1%}, {rate['high']:.1%}], "
            f"p = {rate['p_value']:.3g} |") in markdown
    assert "## pickscore by category" in markdown and "| Outdoor Scenes | 2 |" in markdown
    assert "ties" in markdown and "cluster bootstrap" in markdown and "sign-flip permutation" in markdown

    plot = Image.open(tmp_path / "report.png").convert("RGB")
    assert plot.size == PANEL
    colours = {tuple(c) for c in np.asarray(plot).reshape(-1, 3)}
    assert COLOURS["A"] in colours and COLOURS["B"] in colours
    assert report["plot"] == str(tmp_path / "report.png")


def test_a_folder_against_itself_is_all_ties(folders, scorer_files, tmp_path):
    base, _ = folders
    result = evaluate(str(base), str(base), "--scorer", "clip", "--scorer-model", str(scorer_files.clip),
                      "--out", str(tmp_path / "same.json"))
    assert result.exit_code == 0, result.output
    rate = json.loads((tmp_path / "same.json").read_text())["scorers"]["clip"]["win_rate"]
    assert (rate["wins"], rate["ties"], rate["losses"], rate["rate"]) == (0, 6, 0, 0.5)
    # identical images: every prompt's difference is 0, so the interval is the point and nothing is significant
    assert (rate["low"], rate["high"], rate["p_value"]) == (0.5, 0.5, 1.0)


def test_one_folder_with_every_scorer(folders, scorer_files, tmp_path):
    base, _ = folders
    clip = str(scorer_files.clip)
    result = evaluate(
        str(base), "--out", str(tmp_path / "all"),
        "--scorer", "pickscore", "--scorer", "clip", "--scorer", "aesthetic", "--scorer", "hps", "--scorer", "imagereward",
        "--scorer-model", f"pickscore={clip}", "--processor", f"pickscore={clip}", "--scorer-model", f"clip={clip}",
        "--scorer-model", f"aesthetic={scorer_files.aesthetic}", "--backbone", f"aesthetic={clip}",
        "--scorer-model", f"hps={scorer_files.hps}", "--backbone", f"hps={clip}", "--batch-size", "4",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "all.json").read_text())
    assert "pairs" not in report and list(report["directories"]) == ["A"]
    records = read_manifest(base)
    pictures = [Image.open(base / r["file"]) for r in records]
    _model, pixels, tokens, image, _text = direct_embeddings(scorer_files.clip, pictures, [r["prompt"] for r in records])
    scores = {name: [i["scores"][name]["A"] for i in report["images"]] for name in ("pickscore", "clip", "aesthetic", "hps")}
    np.testing.assert_allclose(scores["aesthetic"], direct_aesthetic(scorer_files.aesthetic, image), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores["hps"], direct_hps(pixels, tokens.input_ids), rtol=0, atol=1e-5)
    for name, values in scores.items():
        section = report["scorers"][name]
        assert section["A"]["mean"] == statistics.fmean(values) and section["A"]["median"] == statistics.median(values)
        assert "win_rate" not in section and list(section["by_group"]) == ["Animals", "Outdoor Scenes"]
    assert min(scores["clip"]) >= 0
    markdown = (tmp_path / "all.md").read_text()
    assert "| scorer | n | mean | median | std |" in markdown and "## hps by category" in markdown
    assert Image.open(tmp_path / "all.png").size == (PANEL[0], 4 * PANEL[1])
    if IMAGEREWARD_MISSING:
        assert report["scorers"]["imagereward"]["available"] is False
        assert "ImageReward package does not import" in report["scorers"]["imagereward"]["reason"]
        assert "- imagereward: the ImageReward package does not import" in markdown


@pytest.mark.skipif(not IMAGEREWARD_MISSING, reason="ImageReward is installed here")
def test_only_an_unavailable_scorer_exits_1(folders, tmp_path):
    result = evaluate(str(folders[0]), "--scorer", "imagereward", "--out", str(tmp_path / "ir"))
    assert result.exit_code == 1
    report = json.loads((tmp_path / "ir.json").read_text())
    assert report["scorers"] == {"imagereward": {"available": False, "reason": report["scorers"]["imagereward"]["reason"]}}
    assert "plot" not in report and not (tmp_path / "ir.png").exists()


def test_unpaired_images_and_protocol_mismatch(folders, scorer_files, tmp_path):
    base, aligned = folders
    partial = tmp_path / "partial"
    shutil.copytree(aligned, partial)
    lines = (partial / MANIFEST).read_text(encoding="utf-8").splitlines()
    (partial / MANIFEST).write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    (partial / "p00002_s1.png").unlink()
    result = evaluate(str(base), str(partial), "--scorer", "clip", "--scorer-model", str(scorer_files.clip), "--out",
                      str(tmp_path / "partial-report"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "partial-report.json").read_text())
    assert (report["pairs"], report["unpaired"]) == (5, {"A": 1, "B": 0})
    assert report["scorers"]["clip"]["by_group"]["Outdoor Scenes"]["win_rate"]["n"] == 1

    other = tmp_path / "other"
    shutil.copytree(aligned, other)
    records = read_manifest(other)
    for record in records:
        record["protocol"]["steps"] = 3
    (other / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = evaluate(str(base), str(other), "--scorer", "clip", "--scorer-model", str(scorer_files.clip), "--out",
                      str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "error:" in result.output and "different protocols (steps)" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--scorer", "fid"], "unknown scorer 'fid'"),
    (["--scorer", "aesthetic"], "--scorer aesthetic needs --scorer-model aesthetic=PATH"),
    (["--scorer", "clip", "--scorer", "hps", "--scorer-model", "x"], "--scorer-model x: with several scorers write NAME=PATH"),
    (["--scorer", "clip", "--scorer-model", "hps=x"], "--scorer-model hps=x: --scorer hps is not requested"),
])
def test_option_errors(folders, tmp_path, args, message):
    result = evaluate(str(folders[0]), *args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert f"error: {message}" in result.output


def test_folder_without_manifest_is_an_error(tmp_path):
    result = evaluate(str(tmp_path), "--scorer", "clip", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "has no manifest.jsonl" in result.output


def test_option_assignment_and_report_paths():
    assert assign_to_scorers(["/m"], ["clip"], "--scorer-model") == {"clip": "/m"}
    assert assign_to_scorers(["hps=/a=b.pt", "clip=/c"], ["clip", "hps"], "--x") == {"hps": "/a=b.pt", "clip": "/c"}
    assert assign_to_scorers(None, ["clip"], "--x") == {}
    assert {k: p.name for k, p in report_paths("out/eval.json").items()} == \
        {"json": "eval.json", "md": "eval.md", "png": "eval.png"}
    assert report_paths("out/eval")["md"] == Path("out/eval.md")


def test_value_range_widens_a_single_value():
    assert value_range([2.0, 2.0]) == (1.5, 2.5)
    assert value_range([3.0, -1.0, 0.5]) == (-1.0, 3.0)

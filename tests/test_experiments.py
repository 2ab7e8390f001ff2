"""scripts/experiments.py: the mirror protocol's labels, the report's generated blocks, and (slow)
the reduced form of every sweep end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.experiments import KINDS, fill_block, labels_for
from stages.demo import PreferencePool

ROOT = Path(__file__).resolve().parents[1]


def _pool(pairs: int = 200, seed: int = 0) -> PreferencePool:
    rng = np.random.default_rng(seed)
    reward_0, reward_1 = rng.random(pairs), rng.random(pairs)
    reward_1[:5] = reward_0[:5]  # five exact ties
    empty = np.zeros((pairs, 1, 1, 3), np.uint8)
    return PreferencePool(["a red circle"] * pairs, np.arange(pairs), np.arange(pairs), empty, empty, reward_0, reward_1)


def test_mirror_labels_reverse_every_decided_pair_and_keep_ties():
    pool = _pool()
    truth = labels_for(pool, "labels", seed=0)
    np.testing.assert_array_equal(truth, np.where(pool.reward_0 > pool.reward_1, 1.0,
                                                  np.where(pool.reward_0 < pool.reward_1, 0.0, 0.5)))
    mirror = labels_for(pool, "mirror", seed=0)
    np.testing.assert_array_equal(mirror[truth != 0.5], 1.0 - truth[truth != 0.5])
    np.testing.assert_array_equal(mirror[truth == 0.5], 0.5)
    coin, coin_mirror = labels_for(pool, "shuffled", seed=3), labels_for(pool, "shuffled-mirror", seed=3)
    np.testing.assert_array_equal(coin_mirror, 1.0 - coin)
    assert not np.array_equal(coin, labels_for(pool, "shuffled", seed=4)), "each training seed draws its own coins"
    assert set(KINDS) == {"labels", "mirror", "shuffled", "shuffled-mirror"}


def test_flipped_labels_flip_exactly_the_fraction_asked():
    pool = _pool()
    truth = labels_for(pool, "labels", seed=0)
    decided = truth != 0.5
    for flip in (0.1, 0.3, 0.5):
        flipped = labels_for(pool, "labels", seed=1, flip=flip)
        chosen = np.random.default_rng(10_001).permutation(len(truth))[: round(flip * len(truth))]
        assert int((flipped != truth).sum()) == int(decided[chosen].sum())  # a drawn tie stays a tie
        assert set(np.flatnonzero(flipped != truth)) <= set(chosen)
        assert not np.array_equal(flipped, labels_for(pool, "labels", seed=2, flip=flip))
        np.testing.assert_array_equal(labels_for(pool, "mirror", seed=1, flip=flip)[decided], 1.0 - flipped[decided])


def test_generated_blocks_replace_in_place_and_keep_the_prose():
    text = "# Experiments\n\nHand-written intro.\n"
    once = fill_block(text, "flips", ["| a |"])
    assert once.startswith(text.rstrip("\n")) and "| a |" in once
    twice = fill_block(once + "\nMore prose after.\n", "flips", ["| b |"])
    assert "| a |" not in twice and "| b |" in twice and "More prose after." in twice and "Hand-written intro." in twice
    assert twice.count("<!-- generated: flips") == 1


@pytest.mark.slow
def test_reduced_experiments_run_every_sweep_and_write_the_page(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    out, docs = tmp_path / "out", tmp_path / "docs"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiments.py"), "--reduced", "--out", str(out),
                           "--docs", str(docs)], env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for sweep in ("flips", "steps", "guidance"):
        rows = results[sweep]["rows"]
        assert len(rows) == len(results[sweep]["values"]) == 2
        for row in rows:
            for key in ("mirror", "control_mirror", "labels_vs_base", "control_vs_base"):
                entry = row[key]
                assert entry["runs"] == 2 and entry["samples"] == 12
                assert entry["win_interval"][0] <= entry["win_rate"] <= entry["win_interval"][1]
                assert 0 < entry["win_p_value"] <= 1
    assert {(r["mode"], r["n"], r["w"]) for r in results["reconstruction"]} == \
        {(m, n, w) for m in ("exact", "authors") for n in (3, 5) for w in (0.0, 1.0)}
    assert all(15 < r["mean"] < r["vae_only"] + 1 for r in results["reconstruction"])
    assert [r["round"] for r in results["rounds_same_data"]["rounds"]] == [1, 2]
    assert results["rounds_same_data"]["one_round_same_steps"]["steps"] == 12
    assert [r["round"] for r in results["rounds_on_policy"]["rounds"]] == [1, 2]
    page = (docs / "experiments.md").read_text()
    for block in ("command", "flips", "steps", "guidance", "reconstruction", "rounds_same_data", "rounds_on_policy"):
        assert f"<!-- generated: {block} " in page
    for figure in ("flips", "steps", "guidance", "reconstruction", "rounds_same_data", "rounds_on_policy"):
        assert (docs / "experiments" / f"{figure}.png").stat().st_size > 5000
    # the chains of inpo rounds are on disk and record their lineage
    chain = json.loads((out / "rounds-on-policy" / "labels-seed0" / "chain.json").read_text())
    assert chain["mode"] == "on-policy" and chain["rounds"][1]["reference"] == "round-1/pipeline"
    # each prompt once with 2 × pairs seeds: distinct pairs, never one prompt's images twice
    assert chain["rounds"][0]["labels"]["pairs"] == 12 * 4 and chain["rounds"][0]["labels"]["unpaired_images"] == 0

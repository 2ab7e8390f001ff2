"""Tests of ``inpo_pipeline.method.plan``: filtering, prompt table, timesteps, seeds and the row order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from inpo_pipeline.data.sources import ParquetSource, ScannedRow
from inpo_pipeline.method.plan import (
    build_plan,
    latent_sample_seed,
    noise_seed,
    row_keys,
    sample_flips,
    sample_prompt_drops,
    sample_timesteps,
    splitmix64,
    window_permutation,
)

T = 1000


def synthetic_rows(num_rows: int, tie_every: int = 0, captions: int = 7) -> list[ScannedRow]:
    """Rows whose caption is `p{i % captions}` (row 0's caption empty), every `tie_every`-th a tie."""
    return [
        ScannedRow(i, "" if i % captions == 0 else f"p{i % captions}", bool(tie_every) and i % tie_every == tie_every - 1)
        for i in range(num_rows)
    ]


def plan_of(rows, **overrides):
    settings = dict(seed=0, timesteps_per_pair=1, num_train_timesteps=T, rows_per_window=16)
    settings.update(overrides)
    return build_plan(iter(rows), **settings)


def source_order(kept: list[int], k: int) -> list[tuple[int, int]]:
    """(source row, draw) of every row before the permutation: pair-major, draws 0..K-1."""
    return [(row, draw) for row in kept for draw in range(k)]


# --------------------------------------------------------------------------------- hashing


def test_splitmix64_known_values():
    # reference values of the splitmix64 generator seeded with 0 (state += golden gamma, then mix)
    assert splitmix64(np.array([0], dtype=np.uint64))[0] == np.uint64(0xE220A8397B1DCDAF)
    out = splitmix64(np.arange(1000, dtype=np.uint64))
    assert out.dtype == np.uint64
    assert len(np.unique(out)) == 1000


def test_row_keys_depend_on_every_input():
    rows, draws = np.arange(100), np.zeros(100, dtype=np.int64)
    base = row_keys(0, rows, draws)
    assert len(np.unique(base)) == 100
    assert np.array_equal(base, row_keys(0, rows, draws))
    assert not np.any(base == row_keys(1, rows, draws))
    assert not np.any(base == row_keys(0, rows, draws + 1))
    assert not np.any(base == row_keys(0, rows, draws, salt=1))
    assert not np.any(base == row_keys(0, rows + 1, draws))


# --------------------------------------------------------------------------------- filtering


def test_build_plan_from_pickapic_drops_ties(pickapic):
    source = ParquetSource([pickapic["path"]], None)
    plan = build_plan(source.scan(), seed=3, timesteps_per_pair=2, num_train_timesteps=T, rows_per_window=8)
    non_ties = sorted(set(range(24)) - set(pickapic["tie_rows"]))
    assert plan.counts.source_rows_scanned == 24
    assert plan.counts.ties == 3
    assert plan.counts.kept_pairs == 21
    assert plan.counts.stopped_at_max_pairs is False
    assert plan.num_rows == 42
    assert sorted(Counter(plan.source_row.tolist()).items()) == [(r, 2) for r in non_ties]
    # broken images are not a planning matter: they are dropped later, when decoded
    assert set(pickapic["broken_rows"]) <= set(plan.source_row.tolist())
    captions = {r.source_row: r.caption for r in source.scan()}
    assert [plan.prompts[i] for i in plan.prompt_index] == [captions[int(r)] for r in plan.source_row]


def test_build_plan_prompt_table():
    rows = [ScannedRow(0, "b", False), ScannedRow(1, "a", False), ScannedRow(2, "", False),
            ScannedRow(3, "b", False), ScannedRow(4, "c", True), ScannedRow(5, "a", False)]
    plan = plan_of(rows, timesteps_per_pair=3)
    assert plan.prompts == ["", "b", "a"]  # "" is always index 0; the tie's caption is not indexed
    by_row = {int(r): int(p) for r, p in zip(plan.source_row, plan.prompt_index)}
    assert by_row == {0: 1, 1: 2, 2: 0, 3: 1, 5: 2}
    assert plan.prompt_index.dtype == np.int32


def test_build_plan_prompt_table_without_empty_caption():
    rows = [ScannedRow(i, f"x{i % 3}", False) for i in range(9)]
    plan = plan_of(rows)
    assert plan.prompts == ["", "x0", "x1", "x2"]
    assert 0 not in plan.prompt_index.tolist()
    assert len(set(plan.prompts)) == len(plan.prompts)


def test_build_plan_all_ties():
    plan = plan_of([ScannedRow(i, "x", True) for i in range(5)])
    assert plan.num_rows == 0
    assert plan.counts.ties == 5 and plan.counts.kept_pairs == 0
    assert plan.prompts == [""]
    assert len(plan.timestep) == len(plan.draw) == len(plan.prompt_index) == 0


@pytest.mark.parametrize("max_pairs", [0, 1, 10, 26])
def test_build_plan_max_pairs_stops_scanning(max_pairs):
    rows = synthetic_rows(60, tie_every=3)  # rows 2, 5, 8, ... are ties
    non_ties = [r.source_row for r in rows if not r.is_tie]
    consumed = []

    def scanned():
        for row in rows:
            consumed.append(row.source_row)
            yield row

    plan = build_plan(scanned(), seed=1, timesteps_per_pair=2, num_train_timesteps=T,
                      rows_per_window=8, max_pairs=max_pairs)
    kept = non_ties[:max_pairs]
    assert plan.counts.kept_pairs == max_pairs
    assert sorted(set(plan.source_row.tolist())) == kept
    assert plan.num_rows == 2 * max_pairs
    assert plan.counts.stopped_at_max_pairs is True
    stop = non_ties[max_pairs]  # the first pair beyond the limit ends the scan
    assert consumed == list(range(stop + 1))
    assert plan.counts.ties == sum(1 for r in rows[:stop] if r.is_tie)
    assert plan.counts.source_rows_scanned == stop == plan.counts.ties + plan.counts.kept_pairs


def test_build_plan_max_pairs_not_reached():
    rows = synthetic_rows(30, tie_every=5)
    plan = plan_of(rows, max_pairs=24)
    assert plan.counts.kept_pairs == 24
    assert plan.counts.stopped_at_max_pairs is False
    assert plan.counts.source_rows_scanned == 30
    plan = plan_of(rows, max_pairs=100)
    assert plan.counts.kept_pairs == 24
    assert plan.counts.stopped_at_max_pairs is False


@pytest.mark.parametrize("k", [1, 3])
def test_build_plan_k_rows_per_pair(k):
    rows = synthetic_rows(40, tie_every=4)
    plan = plan_of(rows, timesteps_per_pair=k, seed=5)
    kept = [r.source_row for r in rows if not r.is_tie]
    assert plan.num_rows == k * len(kept)
    assert sorted(zip(plan.source_row.tolist(), plan.draw.tolist())) == source_order(kept, k)
    assert plan.draw.dtype == np.int16
    for row in kept:
        assert sorted(plan.draw[plan.source_row == row].tolist()) == list(range(k))
        # a pair's rows all carry the pair's prompt
        assert len(set(plan.prompt_index[plan.source_row == row].tolist())) == 1


# --------------------------------------------------------------------------------- row order


@pytest.mark.parametrize(("num_pairs", "k", "window"), [(250, 2, 32), (96, 1, 16), (10, 3, 100), (64, 1, 64)])
def test_row_order_is_a_windowed_shuffle(num_pairs, k, window):
    rows = synthetic_rows(num_pairs + num_pairs // 5, tie_every=6)
    kept = [r.source_row for r in rows if not r.is_tie][:num_pairs]
    plan = plan_of(rows, seed=11, timesteps_per_pair=k, rows_per_window=window, max_pairs=num_pairs)
    before = source_order(kept, k)
    after = list(zip(plan.source_row.tolist(), plan.draw.tolist()))
    n = len(before)
    assert sorted(after) == sorted(before)  # a permutation
    num_full, partial = divmod(n, window)
    source_windows = {frozenset(before[w * window : (w + 1) * window]): w for w in range(num_full)}
    order = []
    for position in range(num_full):
        block = frozenset(after[position * window : (position + 1) * window])
        assert block in source_windows, f"plan window {position} mixes source windows"
        order.append(source_windows[block])
    assert sorted(order) == list(range(num_full))
    if num_full >= 4:
        assert order != list(range(num_full))  # full windows are shuffled among themselves
    if partial:
        assert set(after[num_full * window :]) == set(before[num_full * window :])  # partial window last
    if window >= 16 and n >= window:
        first = after[:window]
        assert first != sorted(first)  # rows are shuffled inside a window


def test_window_permutation_edge_cases():
    assert window_permutation(0, 8, 0).tolist() == []
    for num_rows, window in [(1, 8), (5, 8), (8, 8), (9, 8), (100, 7)]:
        order = window_permutation(num_rows, window, seed=2)
        assert sorted(order.tolist()) == list(range(num_rows))
        assert np.array_equal(order, window_permutation(num_rows, window, seed=2))
        last = num_rows - num_rows % window if num_rows % window else None
        if last is not None:
            assert sorted(order[last:].tolist()) == list(range(last, num_rows))


def test_same_seed_same_plan_other_seed_other_plan():
    rows = synthetic_rows(800, tie_every=9)
    settings = dict(timesteps_per_pair=2, rows_per_window=64)
    first, again, other = plan_of(rows, seed=7, **settings), plan_of(rows, seed=7, **settings), plan_of(rows, seed=8, **settings)
    for name in ("source_row", "draw", "prompt_index", "timestep"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert first.prompts == again.prompts == other.prompts
    assert first.num_rows == other.num_rows
    assert np.mean(first.source_row != other.source_row) > 0.9
    by_row = lambda plan: dict(zip(zip(plan.source_row.tolist(), plan.draw.tolist()), plan.timestep.tolist()))
    first_t, other_t = by_row(first), by_row(other)
    assert first_t.keys() == other_t.keys()
    assert np.mean([first_t[key] != other_t[key] for key in first_t]) > 0.9


def test_timesteps_belong_to_rows_not_positions():
    """t of (source row, draw) does not depend on the window size (so not on the row order)."""
    rows = synthetic_rows(300, tie_every=4)
    small = plan_of(rows, seed=4, timesteps_per_pair=2, rows_per_window=8)
    large = plan_of(rows, seed=4, timesteps_per_pair=2, rows_per_window=128)
    assert not np.array_equal(small.source_row, large.source_row)
    key = lambda plan: dict(zip(zip(plan.source_row.tolist(), plan.draw.tolist()), plan.timestep.tolist()))
    assert key(small) == key(large)
    assert np.array_equal(small.timestep, sample_timesteps(4, small.source_row, small.draw, T))


# --------------------------------------------------------------------------------- timesteps


def test_sample_timesteps_range_and_determinism():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 10**9, 5000)
    draws = rng.integers(0, 8, 5000)
    t = sample_timesteps(3, rows, draws, T)
    assert t.dtype == np.int32
    assert t.min() >= 0 and t.max() < T
    assert np.array_equal(t, sample_timesteps(3, rows, draws, T))
    order = rng.permutation(5000)
    assert np.array_equal(sample_timesteps(3, rows[order], draws[order], T), t[order])
    singles = [int(sample_timesteps(3, np.array([r]), np.array([d]), T)[0]) for r, d in zip(rows[:50], draws[:50])]
    assert singles == t[:50].tolist()
    small = sample_timesteps(3, rows, draws, 7)
    assert set(small.tolist()) == set(range(7))
    assert np.mean(sample_timesteps(4, rows, draws, T) != t) > 0.99
    assert np.mean(sample_timesteps(3, rows, draws + 1, T) != t) > 0.99


@pytest.mark.parametrize("layout", ["rows", "draws"])
def test_sample_timesteps_uniform(layout):
    n = 100_000
    if layout == "rows":
        rows, draws = np.arange(n), np.zeros(n, dtype=np.int16)
    else:  # 4000 pairs × 25 draws
        rows, draws = np.repeat(np.arange(4000), 25), np.tile(np.arange(25, dtype=np.int16), 4000)
    t = sample_timesteps(12, rows, draws, T)
    tenths = np.bincount(t // 100, minlength=10) / n
    assert np.all(np.abs(tenths - 0.1) < 0.003), tenths
    counts = np.bincount(t, minlength=T)
    chi2 = float(((counts - n / T) ** 2 / (n / T)).sum())
    assert chi2 < (T - 1) + 6 * np.sqrt(2 * (T - 1)), chi2  # mean 999, sd ≈ 44.7
    assert abs(t.mean() - (T - 1) / 2) < 3


def test_a_block_of_the_plan_is_a_fair_sample_in_t():
    rows = synthetic_rows(2500)
    plan = plan_of(rows, seed=21, timesteps_per_pair=2, rows_per_window=256)
    assert plan.num_rows == 5000
    assert abs(plan.timestep[:500].mean() - 499.5) < 0.08 * 499.5  # sd of the mean ≈ 12.9
    for start in range(0, 5000, 500):
        block = plan.timestep[start : start + 500]
        assert abs(block.mean() - 499.5) < 50, (start, block.mean())
        assert block.min() < 30 and block.max() > 969
    # no trend of t along the store order
    assert abs(np.corrcoef(np.arange(5000), plan.timestep)[0, 1]) < 0.05


# --------------------------------------------------------------------------------- noise seeds


def test_noise_seed_is_reproducible_and_distinct_per_row_draw_image_and_step():
    seeds = {(r, d, i, k): noise_seed(0, r, d, i, k) for r in range(30) for d in range(3) for i in (0, 1) for k in range(10)}
    assert len(set(seeds.values())) == 30 * 3 * 2 * 10
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds.values())
    assert noise_seed(0, 17, 2, 1, 4) == seeds[(17, 2, 1, 4)]
    assert noise_seed(1, 17, 2, 1, 4) != seeds[(17, 2, 1, 4)]


def test_latent_sample_seeds_flips_and_prompt_drops():
    assert latent_sample_seed(3, 5, 1, 0) == latent_sample_seed(3, 5, 1, 0) != latent_sample_seed(3, 5, 1, 1)
    rows, draws = np.arange(20000), np.zeros(20000, dtype=np.int16)
    flips = sample_flips(0, rows, draws, 0.5)
    assert flips.shape == (20000, 2) and flips.dtype == np.uint8
    assert abs(flips.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(flips[:, 0], flips[:, 1])[0, 1]) < 0.03  # each image is drawn on its own
    assert not sample_flips(0, rows, draws, 0.0).any() and sample_flips(0, rows, draws, 1.0).all()
    drops = sample_prompt_drops(0, rows, draws, 0.2)
    assert abs(drops.mean() - 0.2) < 0.01
    assert np.array_equal(drops, sample_prompt_drops(0, rows, draws, 0.2))


def test_plan_drops_prompts_before_inversion_and_keeps_the_caption():
    scanned = [ScannedRow(i, f"prompt {i % 7}", False) for i in range(2000)]
    plan = build_plan(scanned, seed=4, timesteps_per_pair=1, num_train_timesteps=1000, rows_per_window=256,
                      prompt_dropout=0.2, flip=0.5)
    dropped = plan.prompt_index == 0
    assert abs(dropped.mean() - 0.2) < 0.03
    assert (plan.caption_index > 0).all()
    assert np.array_equal(plan.prompt_index[~dropped], plan.caption_index[~dropped])
    expected = sample_prompt_drops(4, plan.source_row, plan.draw, 0.2)
    assert np.array_equal(dropped, expected)
    assert np.array_equal(plan.flip, sample_flips(4, plan.source_row, plan.draw, 0.5))
    plain = build_plan(scanned, seed=4, timesteps_per_pair=1, num_train_timesteps=1000, rows_per_window=256)
    assert np.array_equal(plain.prompt_index, plain.caption_index) and not plain.flip.any()
    assert np.array_equal(plain.timestep, plan.timestep)  # the draws do not disturb t or the order

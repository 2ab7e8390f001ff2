"""Planning a store: which pairs are kept, which t each row gets, where each row goes.

All randomness here is a pure function of (seed, source row, draw), never of the order in
which rows are processed or of the number of processes, so a store is the same whether it
was written by one process, eight, or a run that was killed and resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from inpo_pipeline.data.sources import ScannedRow

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a well-mixed 64-bit hash of each input."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_keys(seed: int, source_row: np.ndarray, draw: np.ndarray, salt: int = 0) -> np.ndarray:
    """A 64-bit key per (seed, source row, draw, salt): the root of every per-row random draw."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.full(len(source_row), seed, dtype=np.uint64) ^ np.uint64((salt * 0x5851F42D4C957F2D) & 0xFFFFFFFFFFFFFFFF))
        key = splitmix64(key ^ source_row.astype(np.uint64))
        return splitmix64(key ^ draw.astype(np.uint64))


def sample_timesteps(seed: int, source_row: np.ndarray, draw: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """t ~ U{0..T-1} per row, the same for both images of a pair (one t per row)."""
    keys = row_keys(seed, source_row, draw, salt=1)
    return (keys % np.uint64(num_train_timesteps)).astype(np.int32)


def _uniform(keys: np.ndarray) -> np.ndarray:
    """A 64-bit key -> a float64 in [0, 1) (its top 53 bits)."""
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def noise_seed(seed: int, source_row: int, draw: int, image: int, step: int) -> int:
    """Seed of the inversion noise z (`--eta`) of one image of one row at one step (DESIGN §1.5)."""
    key = row_keys(seed, np.array([source_row]), np.array([draw]), salt=2 + image)[0]
    key = splitmix64(np.array([key ^ np.uint64(step)], dtype=np.uint64))[0]
    return int(key & np.uint64(0x7FFFFFFFFFFFFFFF))


def latent_sample_seed(seed: int, source_row: int, draw: int, image: int) -> int:
    """Seed of the VAE posterior sample z of one image of one row (`--vae-latent sample`)."""
    key = row_keys(seed, np.array([source_row]), np.array([draw]), salt=5 + image)[0]
    return int(key & np.uint64(0x7FFFFFFFFFFFFFFF))


def forward_noise_seed(seed: int, source_row: int, draw: int) -> int:
    """Seed of the forward noise ε of one row, shared by its two images (DESIGN §1.7)."""
    key = row_keys(seed, np.array([source_row]), np.array([draw]), salt=40)[0]
    return int(key & np.uint64(0x7FFFFFFFFFFFFFFF))


def forward_noise(seed: int, source_rows: np.ndarray, draws: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ε ~ N(0, I) per row, float32, regenerated bit-exactly from (seed, source row, draw).

    Stage one draws it to cache the reference's errors; the trainer draws it again instead of
    reading it from the store (it costs one generator call per row and no bytes on disk).
    """
    import torch

    noise = np.empty((len(source_rows), *shape), dtype=np.float32)
    for index, (source_row, draw) in enumerate(zip(source_rows, draws)):
        generator = torch.Generator().manual_seed(forward_noise_seed(seed, int(source_row), int(draw)))
        noise[index] = torch.randn(shape, generator=generator).numpy()
    return noise


def sample_flips(seed: int, source_row: np.ndarray, draw: np.ndarray, probability: float) -> np.ndarray:
    """(rows, 2) uint8: whether each image of a row is flipped horizontally (`--flip P`)."""
    flips = [_uniform(row_keys(seed, source_row, draw, salt=20 + image)) < probability for image in (0, 1)]
    return np.stack(flips, axis=1).astype(np.uint8)


def sample_prompt_drops(seed: int, source_row: np.ndarray, draw: np.ndarray, probability: float) -> np.ndarray:
    """Whether a row is inverted, referenced and trained with "" (`--inversion-prompt-dropout P`)."""
    return _uniform(row_keys(seed, source_row, draw, salt=30)) < probability


LevelSampler = Callable[[int, np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]
"""(seed, source rows, draws) -> (integer timestep per row, σ per row or None)."""


@dataclass
class FilterCounts:
    """How the source rows were filtered."""

    source_rows_scanned: int = 0
    ties: int = 0
    kept_pairs: int = 0
    stopped_at_max_pairs: bool = False


@dataclass
class Plan:
    """The store's rows before inversion, in store order, plus the prompt table."""

    source_row: np.ndarray
    draw: np.ndarray
    prompt_index: np.ndarray  # the prompt the row is inverted and trained with (0 = "")
    timestep: np.ndarray
    prompts: list[str]
    caption_index: np.ndarray  # the pair's own caption, whatever prompt_index says
    flip: np.ndarray  # (rows, 2) uint8
    counts: FilterCounts = field(default_factory=FilterCounts)
    sigma: np.ndarray | None = None  # flow models: σ per row (DESIGN §1.8); timestep is then round(1000·σ)

    @property
    def num_rows(self) -> int:
        return len(self.source_row)


def build_plan(
    scanned: Iterable[ScannedRow],
    *,
    seed: int,
    timesteps_per_pair: int,
    num_train_timesteps: int,
    rows_per_window: int,
    max_pairs: int | None = None,
    prompt_dropout: float = 0.0,
    flip: float = 0.0,
    levels: LevelSampler | None = None,
) -> Plan:
    """Drop ties, index prompts, draw t, flips and prompt drops, and permute rows with the seed.

    A row drawn for prompt dropout (probability `prompt_dropout`, DESIGN §1.5) gets prompt 0,
    the empty prompt, *before* anything is computed, as the released code drops 20% of prompts:
    it is inverted, referenced and trained with "". Its caption stays in `caption_index`.

    Permutation: rows are cut, in source order, into windows of `rows_per_window`; rows are
    shuffled inside each window and the full windows are shuffled among themselves (a partial
    last window stays last). Any shard is then a random sample of a window of consecutive
    source pairs, any window a random place in the data, and a writer still reads the source
    sequentially, one window at a time.

    `levels` (a process's ``sample_levels``) draws each row's noise level; by default t ~ U{0..T−1}.
    """
    counts = FilterCounts()
    prompts: dict[str, int] = {"": 0}
    kept_rows: list[int] = []
    kept_prompts: list[int] = []
    for row in scanned:
        counts.source_rows_scanned += 1
        if row.is_tie:
            counts.ties += 1
            continue
        if max_pairs is not None and len(kept_rows) >= max_pairs:
            counts.stopped_at_max_pairs = True
            counts.source_rows_scanned -= 1
            break
        kept_rows.append(row.source_row)
        kept_prompts.append(prompts.setdefault(row.caption, len(prompts)))
    counts.kept_pairs = len(kept_rows)

    pair_rows = np.asarray(kept_rows, dtype=np.int64)
    pair_prompts = np.asarray(kept_prompts, dtype=np.int32)
    source_row = np.repeat(pair_rows, timesteps_per_pair)
    prompt_index = np.repeat(pair_prompts, timesteps_per_pair)
    draw = np.tile(np.arange(timesteps_per_pair, dtype=np.int16), len(pair_rows))

    order = window_permutation(len(source_row), rows_per_window, seed)
    source_row, prompt_index, draw = source_row[order], prompt_index[order], draw[order]
    sigma = None
    if levels is None:
        timestep = sample_timesteps(seed, source_row, draw, num_train_timesteps)
    else:
        timestep, sigma = levels(seed, source_row, draw)
    caption_index = prompt_index
    if prompt_dropout > 0:
        prompt_index = np.where(sample_prompt_drops(seed, source_row, draw, prompt_dropout), 0, caption_index)
    flips = sample_flips(seed, source_row, draw, flip)
    return Plan(source_row, draw, prompt_index.astype(np.int32), timestep, list(prompts),
                caption_index.astype(np.int32), flips, counts, sigma)


def window_permutation(num_rows: int, rows_per_window: int, seed: int) -> np.ndarray:
    """Store position -> source-order position (see :func:`build_plan`)."""
    num_full = num_rows // rows_per_window
    window_order = np.random.default_rng([seed, 7]).permutation(num_full)
    pieces = []
    for window in list(window_order) + ([num_full] if num_rows % rows_per_window else []):
        start = int(window) * rows_per_window
        size = min(rows_per_window, num_rows - start)
        inner = np.random.default_rng([seed, 11, int(window)]).permutation(size)
        pieces.append(start + inner)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

"""AI-feedback labels: which of two sampled images a scorer prefers, and which images are paired.

`inpo label` turns a sample folder (`inpo sample --seeds K`, K ≥ 2) into preference pairs: the
images of one prompt are paired in seed order, (seed 0, seed 1), (seed 2, seed 3), …, so every
image appears in at most one pair and a pair never crosses prompts. A pair's label follows its
scores: the higher score wins, and a gap of at most the tie margin is a tie (Pick-a-Pic's 0.5/0.5,
which stage one drops as it drops the human ties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LABEL_METADATA_KEY = b"inpo.label"
"""The parquet schema-metadata key under which `inpo label` records the scorer and the rule."""


@dataclass(frozen=True)
class SamplePair:
    """Two images of one prompt: `first` becomes jpg_0, `second` jpg_1."""

    prompt: str
    prompt_index: int
    first: Any
    second: Any


def pair_by_seed(images: Sequence[Any], prompt_index_of: Any, seed_of: Any) -> tuple[list[SamplePair], int]:
    """Disjoint pairs of consecutive seeds within each prompt, prompts in order of first appearance.

    Returns the pairs and how many images were left without a partner (a prompt with an odd
    number of seeds leaves its last one out).
    """
    by_prompt: dict[int, list[Any]] = {}
    for image in images:
        by_prompt.setdefault(int(prompt_index_of(image)), []).append(image)
    pairs: list[SamplePair] = []
    unpaired = 0
    for index, group in by_prompt.items():
        group = sorted(group, key=seed_of)
        unpaired += len(group) % 2
        for first, second in zip(group[0::2], group[1::2]):
            pairs.append(SamplePair(first.prompt, index, first, second))
    return pairs, unpaired


def preference_label(score_0: float, score_1: float, tie_margin: float = 0.0) -> float:
    """label_0 of a pair: 1.0 when image 0 scores higher by more than `tie_margin`, 0.0 when image 1
    does, 0.5 (a tie) when |score_0 − score_1| ≤ tie_margin.

    A margin of 0 makes only exactly equal scores a tie. A score that is not finite cannot order
    the pair and raises ValueError.
    """
    if not (math.isfinite(score_0) and math.isfinite(score_1)):
        raise ValueError(f"a scorer returned a non-finite score ({score_0}, {score_1})")
    gap = score_0 - score_1
    if abs(gap) <= tie_margin:
        return 0.5
    return 1.0 if gap > 0 else 0.0

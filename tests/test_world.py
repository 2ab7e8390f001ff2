"""The shapes world: reward values, data determinism, statistics, the committed model follows captions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.data.sources import open_source, prepare_image


# ------------------------------------------------------------------------------ reward
def _flat(rgb: tuple[float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.float64), (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)).copy()


def test_reward_is_one_on_the_named_colour_and_exp_minus_six_on_mid_grey() -> None:
    assert world.reward(_flat(world.COLOURS["red"]), "a red circle") == pytest.approx(1.0, abs=1e-15)
    # grey 0.5 vs red (0.9, 0.1, 0.1): ‖d‖² = 3 × 0.4² = 0.48; 0.48 / (2 × 0.2²) = 6
    assert world.reward(_flat((0.5, 0.5, 0.5)), "a red circle") == pytest.approx(math.exp(-6.0), rel=1e-12)


def test_reward_is_the_pixel_mean_and_reads_uint8() -> None:
    image = _flat((0.5, 0.5, 0.5))
    image[:, : world.IMAGE_SIZE // 2] = world.COLOURS["blue"]
    assert world.reward(image, "blue square") == pytest.approx((1 + math.exp(-((0.35**2 + 0.25**2 + 0.4**2) / 0.08))) / 2)
    as_uint8 = np.full((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), 255, dtype=np.uint8)
    # white vs yellow (0.95, 0.85, 0.10): ‖d‖² = 0.05² + 0.15² + 0.9² = 0.835
    assert world.reward(as_uint8, "a yellow triangle") == pytest.approx(math.exp(-0.835 / 0.08), rel=1e-12)


def test_reward_is_batched_per_prompt_and_refuses_unknown_colours() -> None:
    images = np.stack([_flat(world.COLOURS["green"]), _flat(world.COLOURS["green"])])
    values = world.reward(images, ["a green circle", "a purple circle"])
    assert values.shape == (2,)
    assert values[0] == pytest.approx(1.0)
    assert values[1] < 1e-3
    with pytest.raises(ValueError, match="names none of the colours"):
        world.reward(images[0], "a pink circle")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        world.reward(images, ["a green circle"])


def test_rendered_scenes_score_their_own_caption_far_above_another_colour() -> None:
    scenes = world.sample_scenes(256, seed=3)
    images = world.render(scenes)
    names = list(world.COLOURS)
    other = [f"a {names[(c + 1) % len(names)]} circle" for c in scenes.colour]
    own = world.reward(images, scenes.captions())
    assert own.mean() > 10 * world.reward(images, other).mean()
    # the caption does not fix the reward: sizes and colour jitter vary it a lot
    assert own.std() > 0.3 * own.mean()


# ------------------------------------------------------------------------------ data
def test_scenes_are_deterministic_per_seed() -> None:
    first = world.render(world.sample_scenes(64, seed=7))
    again = world.render(world.sample_scenes(64, seed=7))
    other = world.render(world.sample_scenes(64, seed=8))
    assert first.shape == (64, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.min() >= 0 and first.max() <= 1


def test_circle_coverage_is_its_area() -> None:
    coverage = world.shape_coverage(np.array([0]), np.array([8.0]), np.array([16.0]), np.array([16.0]))
    assert coverage.sum() == pytest.approx(math.pi * 64, rel=0.01)


def test_labelings() -> None:
    r0, r1 = np.array([0.3, 0.1, 0.2, 0.2]), np.array([0.1, 0.3, 0.2, 0.5])
    assert world.preference_labels(r0, r1).tolist() == [1.0, 0.0, 0.5, 0.0]
    assert world.preference_labels(r0, r1, "reversed").tolist() == [0.0, 1.0, 0.5, 1.0]
    rng = np.random.default_rng(0)
    a, b = rng.random(2000), rng.random(2000)
    shuffled = world.preference_labels(a, b, "shuffled", seed=1)
    assert np.array_equal(shuffled, world.preference_labels(a, b, "shuffled", seed=1))
    assert abs(np.mean(shuffled == world.preference_labels(a, b)) - 0.5) < 0.05


def test_preference_parquet_reads_back_through_the_projects_source(tmp_path) -> None:
    images = world.to_uint8(world.render(world.sample_scenes(6, seed=0)))
    prompts = ["a red circle", "a blue square", "a cyan triangle"]
    path = world.write_preference_parquet(tmp_path / "train.parquet", prompts, images[:3], images[3:],
                                          np.array([1.0, 0.0, 0.5]))
    source = open_source(str(path), None)
    scanned = list(source.scan())
    assert [row.caption for row in scanned] == prompts
    assert [row.is_tie for row in scanned] == [False, False, True]
    records = {r.source_row: r for r in source.read(np.array([0, 1]))}
    assert records[0].chosen is not None and records[1].chosen is not None
    chosen_pixels = prepare_image(records[1].chosen, world.IMAGE_SIZE).pixels  # row 1: image 1 preferred
    assert np.array_equal(np.round((chosen_pixels.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8), images[4])


# ------------------------------------------------------------------------------ statistics
def test_wilson_interval_known_values() -> None:
    low, high = world.wilson_interval(70, 100)
    assert (low, high) == (pytest.approx(0.6042, abs=1e-4), pytest.approx(0.7810, abs=1e-4))
    assert world.wilson_interval(0, 10)[0] == 0.0
    assert world.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_compare_counts_ties_half_and_is_seeded() -> None:
    base = np.array([0.1, 0.2, 0.3, 0.4])
    aligned = np.array([0.2, 0.2, 0.1, 0.5])
    result = world.compare(base, aligned)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.win_rate == pytest.approx(2.5 / 4)
    assert result.difference == pytest.approx(0.0)
    assert result.difference_interval == world.compare(base, aligned).difference_interval


# ------------------------------------------------------------------------------ the committed model
@pytest.fixture(scope="module")
def world_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(world.DEFAULT_WORLD), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_world_loads_as_an_sd15_ddim_pipeline(world_pipeline) -> None:
    from diffusers import DDIMScheduler

    from inpo_pipeline.models.reference import SD15, detect_family

    assert detect_family(str(world.DEFAULT_WORLD)) == SD15
    assert isinstance(world_pipeline.scheduler, DDIMScheduler)
    assert world_pipeline.unet.config.sample_size * 4 == world.IMAGE_SIZE


def test_committed_world_samples_follow_the_caption_and_vary_with_the_seed(world_pipeline) -> None:
    names = list(world.COLOURS)
    prompts = [f"a {colour} {world.SHAPES[i % 3]}" for i, colour in enumerate(names) for _ in range(4)]
    seeds = list(range(len(prompts)))
    images = world.sample(world_pipeline, prompts, seeds, world.SamplerSettings(steps=10, guidance=3.0))
    own = world.reward(images, prompts)
    shifted = world.reward(images, [f"a {names[(names.index(world.named_colour(p)) + 1) % 6]} x" for p in prompts])
    assert own.mean() > 0.05
    assert own.mean() > 5 * shifted.mean()
    # per colour, the named colour wins over every other colour on average
    for colour in names:
        rows = [i for i, p in enumerate(prompts) if world.named_colour(p) == colour]
        scores = {c: world.reward(images[rows], f"a {c} x").mean() for c in names}
        assert max(scores, key=scores.get) == colour
    # the same prompt with different seeds gives different images
    assert not np.allclose(images[0], images[1], atol=0.05)
    assert own.std() > 0.2 * own.mean()
    torch.manual_seed(0)


def _scene(**changes) -> world.Scenes:
    values = dict(colour=np.array([0]), shape=np.array([0]), radius=np.array([7.0]), centre_x=np.array([16.0]),
                  centre_y=np.array([16.0]), background=np.array([0.5]), jitter=np.zeros((1, 3)))
    values.update({k: np.array([v]) for k, v in changes.items()})
    return world.Scenes(**values)


@pytest.mark.parametrize(("reward", "change", "low", "high"), [
    ("size", "radius", 5.0, 10.0),
    ("position", "centre_x", 9.0, 23.0),
    ("height", "centre_y", 23.0, 9.0),  # image rows grow downwards: a smaller y is higher
    ("brightness", "background", 0.2, 0.8),
    ("contrast", "background", 0.25, 0.85),  # the red circle's luminance is ≈ 0.34
    ("colour", "radius", 5.0, 10.0),
])
def test_each_reward_follows_its_property_and_nothing_else_moves(reward, change, low, high) -> None:
    score = world.REWARDS[reward]
    small, large = (world.render(_scene(**{change: value})) for value in (low, high))
    assert float(score(large, ["a red circle"])[0]) > float(score(small, ["a red circle"])[0]) + 0.02


def test_object_rewards_measure_the_object() -> None:
    scenes = world.sample_scenes(300, 4)
    images = world.render(scenes)
    area = world.shape_coverage(scenes.shape, scenes.radius, scenes.centre_x, scenes.centre_y).mean(axis=(1, 2))
    assert np.corrcoef(world.size_reward(images), area)[0, 1] > 0.95
    position = world.position_reward(images)
    assert np.abs(position - scenes.centre_x / world.IMAGE_SIZE).max() < 0.05
    # horizontal flips mirror the position and leave the height alone
    flipped = images[:, :, ::-1]
    assert np.allclose(world.position_reward(flipped), 1 - position, atol=1e-9)
    assert np.allclose(world.height_reward(flipped), world.height_reward(images), atol=1e-12)
    assert np.corrcoef(world.height_reward(images), -scenes.centre_y)[0, 1] > 0.95
    assert np.corrcoef(world.brightness_reward(images), scenes.background)[0, 1] > 0.95
    # a grey image has no object: size 0, position neutral
    grey = np.full((1, 32, 32, 3), 0.4)
    assert world.size_reward(grey)[0] == 0.0 and world.position_reward(grey)[0] == 0.5
    assert world.contrast_reward(grey)[0] == pytest.approx(0.0, abs=1e-12)
    assert world.brightness_reward(grey)[0] == pytest.approx(0.4)

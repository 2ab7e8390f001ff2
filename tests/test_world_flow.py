"""The flow shapes world (inpo_pipeline/worlds/shapes_flow.py): the committed SD3-type folder loads, samples
deterministically, follows colour prompts; the build is deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inpo_pipeline.worlds import shapes as world
from inpo_pipeline.worlds import shapes_flow as wf


@pytest.fixture(scope="module")
def flow_pipeline():
    return wf.load_flow_pipeline(wf.DEFAULT_FLOW_WORLD)


def test_committed_flow_world_loads_as_an_sd3_pipeline(flow_pipeline) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(wf.DEFAULT_FLOW_WORLD))
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.sample_size * 4 == world.IMAGE_SIZE
    assert pipe.vae.config.shift_factor == 0.0
    record = json.loads((wf.DEFAULT_FLOW_WORLD / "world.json").read_text())
    assert record["max_sequence_length"] == wf.MAX_SEQUENCE_LENGTH == pipe.tokenizer_3.model_max_length
    assert pipe.scheduler.config.shift == record["config"]["shift"]
    # the T5 tokenizer knows every caption word as one token (+ </s>)
    assert pipe.tokenizer_3("a purple triangle").input_ids[-1] == pipe.tokenizer_3.eos_token_id
    assert len(pipe.tokenizer_3("a purple triangle").input_ids) == 4
    embeds, pooled = wf.encode_flow_prompts(pipe, ["a red circle"])
    assert embeds.shape == (1, wf.CLIP_MAX_LENGTH + wf.MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)


def test_flow_sampling_is_deterministic_per_seed(flow_pipeline) -> None:
    settings = wf.FlowSamplerSettings(steps=6, guidance=4.0, batch_size=3)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [5, 6, 7]
    first = wf.sample_flow(flow_pipeline, prompts, seeds, settings)
    second = wf.sample_flow(flow_pipeline, prompts, seeds, settings)
    assert first.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert np.array_equal(first, second)
    # an image depends on its own seed only, not on the batch it was drawn in
    alone = wf.sample_flow(flow_pipeline, prompts[2:], seeds[2:], settings)
    np.testing.assert_allclose(alone[0], first[2], atol=1e-5)
    assert not np.allclose(first[0], first[2], atol=0.05)


def test_committed_flow_world_follows_colour_prompts(flow_pipeline) -> None:
    names = list(world.COLOURS)
    prompts = [f"a {colour} {world.SHAPES[i % 3]}" for i, colour in enumerate(names) for _ in range(4)]
    images = wf.sample_flow(flow_pipeline, prompts, list(range(len(prompts))), wf.FlowSamplerSettings(steps=10))
    numbers = wf.quality_numbers(images, prompts)
    assert numbers["colour_accuracy"] >= 0.9  # chance: 1/6
    assert numbers["own_over_shifted"] > 5
    assert numbers["colour_reward_mean"] > 0.1
    # seed-to-seed spread, so preferences over size and brightness exist
    assert numbers["size_std"] > 0.03 and numbers["brightness_std"] > 0.05


def test_build_flow_world_is_deterministic(tmp_path) -> None:
    from safetensors.torch import load_file

    config = wf.FlowWorldConfig(train_images=64, steps=3, batch=8, eval_seeds=0)
    weights = []
    for name in ("a", "b"):
        wf.build_flow_world(tmp_path / name, config)
        weights.append(load_file(tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = wf.build_flow_world(tmp_path / "c", wf.FlowWorldConfig(**{**config.__dict__, "seed": 1}))
    changed = load_file(tmp_path / "c" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(weights[0][k], changed[k]) for k in changed)
    assert other["max_sequence_length"] == wf.MAX_SEQUENCE_LENGTH

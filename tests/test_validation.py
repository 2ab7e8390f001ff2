"""Validation grids: the sampler leaves the policy's mode and the global RNG exactly as it found them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from inpo_pipeline.errors import UserError
from inpo_pipeline.evaluation.validation import Validator, grid


def test_images_restore_the_rng_and_the_training_mode(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    policy = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    policy.train()
    validator = Validator({"model": str(tiny_sd15), "family": "sd15", "resolution": 32}, str(prompts), seeds=2, steps=2)
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first = validator.images(policy, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), before) and policy.training
    second = validator.images(policy, torch.device("cpu"))
    assert len(first) == 4 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))  # seed 0 and seed 1 differ
    assert grid(first, 2).size == (64, 64)


def test_an_empty_prompt_set_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UserError, match="holds no prompt|no prompt"):
        Validator({"model": "unused", "family": "sd15", "resolution": 32}, str(empty))

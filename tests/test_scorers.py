"""Each scorer against a direct computation on tiny random CLIP models; the HPS (open_clip → transformers)
key mapping against open_clip's own forward; weights-only checkpoint reading; ImageReward unavailability."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from inpo_pipeline.errors import UserError
from inpo_pipeline.evaluation.scorers import (
    ScorerUnavailable,
    clip_pair_scores,
    load_hps_model,
    load_scorer,
    openclip_to_transformers,
    read_checkpoint,
    resolve_spec,
)
from tests.tiny_scorers import (  # noqa: F401  (scorer_files is a fixture)
    LAYERS,
    PROJECTION,
    WIDTH,
    direct_aesthetic,
    direct_embeddings,
    direct_hps,
    openclip_encode_image,
    openclip_encode_text,
    openclip_state_dict,
    scorer_files,
    tiny_clip_config,
)

CPU = torch.device("cpu")
PROMPTS = ["a red fox in the snow", "ein Hund im Schnee — 雪の中の犬 🐕", "", "a lighthouse at dusk " * 10]


def images(seed: int = 0) -> list[Image.Image]:
    """Four random pictures of odd sizes and modes (the processor resizes, crops and converts)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 64), (33, 47), (80, 36)]
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pictures[2] = pictures[2].convert("L")
    return pictures


def test_pickscore_is_logit_scale_times_cosine(scorer_files):
    scorer = load_scorer(resolve_spec("pickscore", str(scorer_files.clip), str(scorer_files.clip)), CPU)
    scores = scorer.score(images(), PROMPTS)
    model, _pixels, _tokens, image, text = direct_embeddings(scorer_files.clip, images(), PROMPTS)
    expected = (image * text).sum(-1) * model.logit_scale.exp()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=1e-5)
    # the score of an image does not depend on its batch (prompts are always padded to 77 tokens)
    alone = [scorer.score([picture], [prompt])[0] for picture, prompt in zip(images(), PROMPTS)]
    np.testing.assert_allclose(alone, scores, rtol=0, atol=5e-5)  # float32 rounding at a scale of 100


def test_clip_score_is_100_times_positive_cosine(scorer_files):
    scorer = load_scorer(resolve_spec("clip", str(scorer_files.clip)), CPU)
    scores = scorer.score(images(1), PROMPTS)
    _model, _pixels, _tokens, image, text = direct_embeddings(scorer_files.clip, images(1), PROMPTS)
    cosine = (image * text).sum(-1).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cosine, 0), rtol=0, atol=1e-5)


def test_clip_pair_score_formulas_on_hand_made_embeddings():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, -1.0]])  # cosines 0.6, 1.0, -1.0
    logits = 50.0 * image @ text.t()
    output = SimpleNamespace(image_embeds=image, text_embeds=text, logits_per_image=logits)
    assert clip_pair_scores(output, "pickscore").tolist() == pytest.approx([30.0, 50.0, -50.0])
    assert clip_pair_scores(output, "clip").tolist() == pytest.approx([60.0, 100.0, 0.0])
    assert clip_pair_scores(output, "hps").tolist() == pytest.approx([0.6, 1.0, -1.0])


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(scorer_files):
    scorer = load_scorer(resolve_spec("aesthetic", str(scorer_files.aesthetic), backbone=str(scorer_files.clip)), CPU)
    scores = scorer.score(images(2), PROMPTS)
    _model, _pixels, _tokens, image, _text = direct_embeddings(scorer_files.clip, images(2), PROMPTS)
    head = torch.load(scorer_files.aesthetic, weights_only=True)
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert [tuple(head[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == \
        [(1024, PROJECTION), (128, 1024), (64, 128), (16, 64), (1, 16)]
    np.testing.assert_allclose(scores, direct_aesthetic(scorer_files.aesthetic, image), rtol=0, atol=1e-5)


def test_openclip_key_mapping():
    state = openclip_state_dict()
    mapped = openclip_to_transformers(state)
    reference = CLIPModel(tiny_clip_config())
    assert set(mapped) == set(reference.state_dict())
    assert len(mapped) == len(state) + 2 * 2 * LAYERS * 2  # each in_proj weight/bias becomes three tensors
    v, t = "vision_model", "text_model"
    same = {
        "visual.conv1.weight": f"{v}.embeddings.patch_embedding.weight",
        "visual.class_embedding": f"{v}.embeddings.class_embedding",
        "visual.positional_embedding": f"{v}.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": f"{v}.pre_layrnorm.weight",
        "visual.ln_post.bias": f"{v}.post_layernorm.bias",
        "visual.transformer.resblocks.1.ln_1.weight": f"{v}.encoder.layers.1.layer_norm1.weight",
        "visual.transformer.resblocks.0.attn.out_proj.weight": f"{v}.encoder.layers.0.self_attn.out_proj.weight",
        "visual.transformer.resblocks.0.ln_2.bias": f"{v}.encoder.layers.0.layer_norm2.bias",
        "visual.transformer.resblocks.1.mlp.c_fc.weight": f"{v}.encoder.layers.1.mlp.fc1.weight",
        "visual.transformer.resblocks.1.mlp.c_proj.bias": f"{v}.encoder.layers.1.mlp.fc2.bias",
        "token_embedding.weight": f"{t}.embeddings.token_embedding.weight",
        "positional_embedding": f"{t}.embeddings.position_embedding.weight",
        "transformer.resblocks.1.mlp.c_proj.weight": f"{t}.encoder.layers.1.mlp.fc2.weight",
        "ln_final.weight": f"{t}.final_layer_norm.weight",
        "logit_scale": "logit_scale",
    }
    for source, target in same.items():
        assert torch.equal(mapped[target], state[source]), source
    assert torch.equal(mapped["visual_projection.weight"], state["visual.proj"].t())
    assert torch.equal(mapped["text_projection.weight"], state["text_projection"].t())
    packed = state["transformer.resblocks.0.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        assert torch.equal(mapped[f"{t}.encoder.layers.0.self_attn.{name}_proj.weight"], packed[i * WIDTH:(i + 1) * WIDTH])
    bias = state["visual.transformer.resblocks.1.attn.in_proj_bias"]
    assert torch.equal(mapped[f"{v}.encoder.layers.1.self_attn.v_proj.bias"], bias[2 * WIDTH:])
    # the non-persistent causal-mask buffer of old open_clip files is skipped; foreign keys are refused
    assert set(openclip_to_transformers({**state, "attn_mask": torch.zeros(77, 77)})) == set(mapped)
    with pytest.raises(UserError, match="visual.trunk.blocks.0.weight"):
        openclip_to_transformers({**state, "visual.trunk.blocks.0.weight": torch.zeros(1)})


def test_hps_score_matches_open_clips_own_forward(scorer_files):
    """Mapped into transformers, the checkpoint embeds images and text exactly as open_clip would."""
    state = openclip_state_dict()
    model = load_hps_model(str(scorer_files.hps), str(scorer_files.clip))
    processor = CLIPProcessor.from_pretrained(scorer_files.clip)
    pixels = processor(images=[p.convert("RGB") for p in images(3)], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(pixel_values=pixels, input_ids=tokens)
    image = openclip_encode_image(state, pixels)
    text = openclip_encode_text(state, tokens)
    np.testing.assert_allclose(ours.image_embeds.numpy(), (image / image.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.text_embeds.numpy(), (text / text.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # the scorer: HPSv2's score is the cosine (image_features @ text_features.T, diagonal)
    scorer = load_scorer(resolve_spec("hps", str(scorer_files.hps), backbone=str(scorer_files.clip)), CPU)
    np.testing.assert_allclose(scorer.score(images(3), PROMPTS), direct_hps(pixels, tokens), rtol=0, atol=1e-5)


def test_checkpoints_are_read_weights_only(tmp_path):
    state = {"module.layers.0.weight": torch.ones(2, 2)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    assert list(read_checkpoint(tmp_path / "wrapped.pt")) == ["layers.0.weight"]
    torch.save({"weights": torch.ones(1), "callback": SimpleNamespace(x=1)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="weights-only"):
        read_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_hps_checkpoint_of_another_size_is_refused(tmp_path, scorer_files):
    state = openclip_state_dict()
    state["visual.proj"] = torch.zeros(WIDTH, PROJECTION + 1)
    torch.save({"state_dict": state}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit the CLIP architecture"):
        load_hps_model(str(tmp_path / "other.pt"), str(scorer_files.clip))


def test_defaults_and_required_files():
    assert resolve_spec("pickscore").model == "yuvalkirstain/PickScore_v1"
    assert resolve_spec("pickscore").processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert resolve_spec("clip").model == resolve_spec("clip").processor == "openai/clip-vit-large-patch14"
    assert resolve_spec("aesthetic", "head.pth").backbone == "openai/clip-vit-large-patch14"
    assert resolve_spec("hps", "HPS_v2.1_compressed.pt").backbone == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    for name in ("aesthetic", "hps"):
        with pytest.raises(UserError, match="needs --scorer-model"):
            resolve_spec(name)
    with pytest.raises(UserError, match="unknown scorer"):
        resolve_spec("fid")


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="ImageReward is installed here")
def test_imagereward_is_unavailable_without_its_package():
    with pytest.raises(ScorerUnavailable, match="ImageReward package does not import"):
        load_scorer(resolve_spec("imagereward"), CPU)


def test_a_local_pickscore_folder_is_enough_offline(scorer_files, monkeypatch, tmp_path):
    """--scorer-model pickscore=FOLDER with the processor files in it never asks the hub."""
    spec = resolve_spec("pickscore", str(scorer_files.clip))
    assert spec.processor == str(scorer_files.clip)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub-cache"))
    scorer = load_scorer(spec, CPU)
    from PIL import Image

    scores = scorer.score([Image.new("RGB", (32, 32), "red")], ["a red circle"])
    assert len(scores) == 1 and math.isfinite(float(scores[0]))
    # without the processor files, the published processor is still the default
    bare = tmp_path / "weights-only"
    bare.mkdir()
    assert resolve_spec("pickscore", str(bare)).processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

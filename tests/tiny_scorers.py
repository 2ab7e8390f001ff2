"""Tiny, seeded, offline stand-ins for the scorers' weights: a CLIPModel + CLIPProcessor folder,
a LAION-aesthetic-shaped head file, and an open_clip-shaped (HPS) checkpoint; plus a reference
open_clip forward written from open_clip's own definitions, to check the HPS key mapping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from inpo_pipeline.worlds.example import BOS_TOKEN_ID, EOS_TOKEN_ID, TEXT_VOCAB_SIZE, build_tiny_tokenizer
from inpo_pipeline.evaluation.scorers import AestheticHead

WIDTH, HEADS, LAYERS, PATCH, IMAGE, CONTEXT, PROJECTION = 32, 4, 2, 8, 32, 77, 16


def tiny_clip_config() -> CLIPConfig:
    """GELU (as open_clip's ViT-H/14), layer-norm eps 1e-5 (open_clip's LayerNorm default)."""
    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS,
                  num_hidden_layers=LAYERS, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPConfig(
        text_config=dict(vocab_size=TEXT_VOCAB_SIZE, max_position_embeddings=CONTEXT, bos_token_id=BOS_TOKEN_ID,
                         eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID, **common),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, **common),
        projection_dim=PROJECTION,
        logit_scale_init_value=math.log(100.0),  # PickScore's trained scale is 100
    )


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A saved CLIPModel (random, seeded) and CLIPProcessor (32-px CLIP preprocessing, tiny tokenizer)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(path / "tokenizer-source")
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    return path


def write_aesthetic_head(path: Path, seed: int = 0) -> Path:
    """A random head with the LAION file's layout: torch.save of the MLP's state dict."""
    torch.manual_seed(seed)
    torch.save(AestheticHead(PROJECTION).state_dict(), path)
    return path


def openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under open_clip's ViT CLIP names and shapes (what an HPS checkpoint holds).

    Vision: conv1 (no bias), class/positional embeddings, ln_pre, resblocks, ln_post, proj
    (width × dim, used as x @ proj). Text: token/positional embeddings, resblocks, ln_final,
    text_projection (width × dim), logit_scale. A resblock: ln_1, attn.in_proj_weight/bias
    ([q; k; v] packed), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(WIDTH, scale=0.05), f"{prefix}.bias": rand(WIDTH, scale=0.05)}

    def blocks(prefix: str) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for n in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{n}"
            state.update(norm(f"{p}.ln_1"))
            state[f"{p}.attn.in_proj_weight"] = rand(3 * WIDTH, WIDTH)
            state[f"{p}.attn.in_proj_bias"] = rand(3 * WIDTH)
            state[f"{p}.attn.out_proj.weight"] = rand(WIDTH, WIDTH)
            state[f"{p}.attn.out_proj.bias"] = rand(WIDTH)
            state.update(norm(f"{p}.ln_2"))
            state[f"{p}.mlp.c_fc.weight"] = rand(4 * WIDTH, WIDTH)
            state[f"{p}.mlp.c_fc.bias"] = rand(4 * WIDTH)
            state[f"{p}.mlp.c_proj.weight"] = rand(WIDTH, 4 * WIDTH)
            state[f"{p}.mlp.c_proj.bias"] = rand(WIDTH)
        return state

    grid = IMAGE // PATCH
    state = {
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH),
        "visual.class_embedding": rand(WIDTH),
        "visual.positional_embedding": rand(grid * grid + 1, WIDTH),
        **norm("visual.ln_pre"),
        **blocks("visual."),
        **norm("visual.ln_post"),
        "visual.proj": rand(WIDTH, PROJECTION),
        "token_embedding.weight": rand(TEXT_VOCAB_SIZE, WIDTH),
        "positional_embedding": rand(CONTEXT, WIDTH),
        **blocks(""),
        **norm("ln_final"),
        "text_projection": rand(WIDTH, PROJECTION),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    return state


def direct_embeddings(folder: Path, pictures: list, prompts: list[str]) -> tuple:
    """(model, pixels, tokens, image, text): normalised embeddings computed from the model's parts,
    not through its forward or the scorers' code."""
    model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(folder)
    pixels = processor(images=[p.convert("RGB") for p in pictures], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens.input_ids).pooler_output)
    return model, pixels, tokens, image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def direct_aesthetic(head_file: Path, image: torch.Tensor) -> np.ndarray:
    """The LAION head by hand on normalised image embeddings: five affine maps, no activations
    (dropout is off at evaluation)."""
    head = torch.load(head_file, weights_only=True)
    x = image
    for i in (0, 2, 4, 6, 7):
        x = x @ head[f"layers.{i}.weight"].t() + head[f"layers.{i}.bias"]
    return x.squeeze(-1).numpy()


# --------------------------------------------------------------------- open_clip's forward
def _resblock(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + c_proj(gelu(c_fc(ln_2(x))))."""
    attention = torch.nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    attention.load_state_dict({"in_proj_weight": state[f"{prefix}.attn.in_proj_weight"],
                               "in_proj_bias": state[f"{prefix}.attn.in_proj_bias"],
                               "out_proj.weight": state[f"{prefix}.attn.out_proj.weight"],
                               "out_proj.bias": state[f"{prefix}.attn.out_proj.bias"]})
    h = F.layer_norm(x, (WIDTH,), state[f"{prefix}.ln_1.weight"], state[f"{prefix}.ln_1.bias"])
    x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
    h = F.layer_norm(x, (WIDTH,), state[f"{prefix}.ln_2.weight"], state[f"{prefix}.ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, state[f"{prefix}.mlp.c_fc.weight"], state[f"{prefix}.mlp.c_fc.bias"])),
                 state[f"{prefix}.mlp.c_proj.weight"], state[f"{prefix}.mlp.c_proj.bias"])
    return x + h


@torch.no_grad()
def openclip_encode_image(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, WIDTH)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    for n in range(LAYERS):
        x = _resblock(state, f"visual.transformer.resblocks.{n}", x, None)
    x = F.layer_norm(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return x @ state["visual.proj"]


@torch.no_grad()
def openclip_encode_text(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    length = tokens.shape[1]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for n in range(LAYERS):
        x = _resblock(state, f"transformer.resblocks.{n}", x, causal)
    x = F.layer_norm(x, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ state["text_projection"]


def direct_hps(pixels: torch.Tensor, tokens: torch.Tensor, seed: int = 0) -> np.ndarray:
    """HPSv2's score by open_clip's forward on `openclip_state_dict(seed)`: the embeddings' cosine."""
    state = openclip_state_dict(seed)
    image, text = openclip_encode_image(state, pixels), openclip_encode_text(state, tokens)
    return F.cosine_similarity(image, text, dim=-1).numpy()


# --------------------------------------------------------------------- fixtures
class ScorerFiles(NamedTuple):
    clip: Path  # CLIPModel + CLIPProcessor folder
    aesthetic: Path  # the aesthetic head's .pth
    hps: Path  # HPS_v2_compressed.pt's layout: {"state_dict": open_clip weights, ...}


@pytest.fixture(scope="session")
def scorer_files(tmp_path_factory: pytest.TempPathFactory) -> ScorerFiles:
    folder = tmp_path_factory.mktemp("scorers")
    torch.save({"state_dict": openclip_state_dict(), "epoch": 1, "name": "tiny"}, folder / "HPS_tiny.pt")
    return ScorerFiles(build_tiny_clip(folder / "tiny-clip"), write_aesthetic_head(folder / "aesthetic-head.pth"),
                       folder / "HPS_tiny.pt")

"""A diffusers SD1.x, SD2.x or SDXL pipeline as one checkpoint in the original (CompVis / LDM /
Stability) key layout.

The layout A1111, ComfyUI and `from_single_file` read: the UNet under ``model.diffusion_model.``,
the VAE under ``first_stage_model.``, the text encoders by model: SD1.x's CLIP under
``cond_stage_model.transformer.`` (transformers' own names), SD2.x's OpenCLIP ViT-H under
``cond_stage_model.model.``, SDXL's CLIP-L under ``conditioner.embedders.0.transformer.`` and its
OpenCLIP bigG under ``conditioner.embedders.1.model.``. The maps below are the block arithmetic of
the two layouts, derived from the UNet's and the VAE's own configs (so any number of blocks and
layers per block works, not only SD's four or SDXL's three):

* UNet: the LDM model numbers its down path as one list, ``input_blocks.k``: k = 0 is conv_in,
  then per down block i (L resnets each) k = i·(L+1) + j + 1 holds resnet j (``.0``) and its
  attention (``.1``), and k = (i+1)·(L+1) the downsampler (``.0.op``). The up path
  ``output_blocks.k``, L+1 resnets per up block: k = i·(L+1) + j, the upsampler after the last
  resnet of block i at ``.1`` (no attention) or ``.2``. Resnet parts are renamed
  (norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → emb_layers.1, norm2 → out_layers.0,
  conv2 → out_layers.3, conv_shortcut → skip_connection); attentions keep their names.
* VAE: ``encoder.down.i.block.j`` / ``decoder.up.(N−1−i).block.j`` (the LDM decoder counts its
  up blocks from the bottom), mid resnets ``mid.block_1/2``, the mid attention ``mid.attn_1``
  with q/k/v/proj_out as 1×1 convolutions (diffusers keeps them as linear layers).
* OpenCLIP text encoders: ``transformer.resblocks.i`` with q/k/v as one ``attn.in_proj`` (rows
  q, then k, then v), ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``; ``token_embedding``,
  ``positional_embedding``, ``ln_final``, and ``text_projection`` as the matrix P of x·P (the
  transpose of the linear layer's weight). SD2.x's diffusers text encoder holds the 23 layers
  SD2 uses (it conditions on OpenCLIP-H's penultimate layer), so the checkpoint has those 23.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
OPEN_CLIP_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                         "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}

UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_parts(rest: str, parts: dict[str, str]) -> str:
    for old, new in parts.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers prefix → LDM prefix for every block of a UNet2DConditionModel with this config."""
    layers = int(config["layers_per_block"])
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    mapping = dict(UNET_TOP)
    for i, kind in enumerate(down_types):
        for j in range(layers):
            index = i * (layers + 1) + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < len(down_types) - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
    for i, kind in enumerate(up_types):
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if "CrossAttn" in kind:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < len(up_types) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            mapping[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (layers + 1) + layers}.{slot}"
    mapping["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        mapping[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return mapping


def _longest_prefix(key: str, mapping: dict[str, str]) -> str | None:
    best = None
    for prefix in mapping:
        if (key == prefix or key.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the LDM layout (keys with UNET_PREFIX)."""
    mapping = unet_key_map(config)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = _longest_prefix(key, mapping)
        if prefix is None:
            raise ValueError(f"the UNet key {key} has no place in the original layout")
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefix:
            rest = _rename_parts(rest, UNET_RESNET_PARTS)
        converted[UNET_PREFIX + mapping[prefix] + ("." + rest if rest else "")] = value
    return converted


def vae_key_map(config: dict[str, Any]) -> dict[str, str]:
    blocks = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    mapping = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for i in range(blocks):
        for j in range(layers):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < blocks - 1:
            mapping[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        for j in range(layers + 1):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{blocks - 1 - i}.block.{j}"
        if i < blocks - 1:
            mapping[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{blocks - 1 - i}.upsample"
    for side in ("encoder", "decoder"):
        mapping[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        for j in range(2):
            mapping[f"{side}.mid_block.resnets.{j}"] = f"{side}.mid.block_{j + 1}"
    return mapping


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (keys with VAE_PREFIX)."""
    mapping = vae_key_map(config)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = _longest_prefix(key, mapping)
        if prefix is None:
            converted[VAE_PREFIX + key] = value  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            continue
        rest = key[len(prefix) + 1:]
        if ".attentions." in prefix:
            rest = _rename_parts(rest, VAE_ATTENTION_PARTS)
            if rest.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # a linear layer as the 1×1 convolution it is there
        elif ".resnets." in prefix:
            rest = _rename_parts(rest, {"conv_shortcut": "nin_shortcut"})
        converted[VAE_PREFIX + mapping[prefix] + "." + rest] = value
    return converted


def text_encoder_to_ldm(state: dict[str, torch.Tensor], prefix: str = TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """The CLIP text model's keys under `prefix` as `text_model.…` (transformers ≥ 5.6 keeps
    CLIPTextModel's weights without that level; the checkpoints have it)."""
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in state.items() if not key.endswith("position_ids")}


def text_encoder_to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model (transformers' keys) in OpenCLIP's layout under `prefix` (see the module
    docstring); a key with no place there is refused (ValueError)."""
    left = {key.removeprefix("text_model."): value for key, value in state.items() if not key.endswith("position_ids")}
    converted = {prefix + "token_embedding.weight": left.pop("embeddings.token_embedding.weight"),
                 prefix + "positional_embedding": left.pop("embeddings.position_embedding.weight")}
    for kind in ("weight", "bias"):
        converted[prefix + f"ln_final.{kind}"] = left.pop(f"final_layer_norm.{kind}")
    if "text_projection.weight" in left:
        converted[prefix + "text_projection"] = left.pop("text_projection.weight").T  # x·P there, W·x here
    layers = sorted({int(key.split(".")[2]) for key in left if key.startswith("encoder.layers.")})
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            converted[theirs + f"attn.in_proj_{kind}"] = torch.cat(
                [left.pop(ours + f"self_attn.{part}_proj.{kind}") for part in ("q", "k", "v")])
            for old, new in OPEN_CLIP_LAYER_PARTS.items():
                converted[theirs + f"{new}.{kind}"] = left.pop(ours + f"{old}.{kind}")
    if left:
        raise ValueError(f"the text encoder key {next(iter(left))} has no place in OpenCLIP's layout")
    return converted


def is_open_clip(text_encoder: Any) -> bool:
    """SD2.x's text encoder is OpenCLIP's (GELU); SD1.x's is OpenAI's CLIP (quick GELU)."""
    return text_encoder.config.hidden_act != "quick_gelu"


def _sd_text(pipeline: Any) -> dict[str, torch.Tensor]:
    state = pipeline.text_encoder.state_dict()
    return text_encoder_to_open_clip(state, OPEN_CLIP_PREFIX) if is_open_clip(pipeline.text_encoder) \
        else text_encoder_to_ldm(state)


def _sdxl_text(pipeline: Any) -> dict[str, torch.Tensor]:
    return {**text_encoder_to_ldm(pipeline.text_encoder.state_dict(), SDXL_TEXT_PREFIXES[0]),
            **text_encoder_to_open_clip(pipeline.text_encoder_2.state_dict(), SDXL_TEXT_PREFIXES[1])}


TEXT_LAYOUTS = {"sd15": _sd_text, "sdxl": _sdxl_text}  # family -> its text encoders' original layout


def checkpoint(family: str, pipeline: Any) -> dict[str, torch.Tensor]:
    """One state dict of the pipeline's UNet, VAE and text encoder(s) in the original layout of
    `family` (a key of TEXT_LAYOUTS), contiguous (as safetensors wants); ValueError for another
    family or a module the layout has no place for."""
    if family not in TEXT_LAYOUTS:
        raise ValueError(f"the original single-file layout is written for {', '.join(TEXT_LAYOUTS)}, not {family}")
    parts = {**unet_to_ldm(pipeline.unet.state_dict(), dict(pipeline.unet.config)),
             **vae_to_ldm(pipeline.vae.state_dict(), dict(pipeline.vae.config)),
             **TEXT_LAYOUTS[family](pipeline)}
    return {key: value.detach().contiguous() for key, value in parts.items()}

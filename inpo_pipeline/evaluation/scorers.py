"""Preference scorers of generated images, all through transformers and torch.

* **pickscore** — PickScore v1 (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic): the model's logit
  scale × the cosine of the normalised text and image embeddings, i.e. the diagonal of the
  forward output's ``logits_per_image``.
* **clip** — CLIP score: 100 × max(cosine, 0), by default with OpenAI's CLIP ViT-L/14.
* **aesthetic** — the LAION aesthetic predictor v2: the public MLP head
  (768→1024→128→64→16→1, dropout between the first four layers, no activations) applied to
  the L2-normalised CLIP ViT-L/14 image embedding. The head's file is passed by the user.
* **hps** — HPSv2 / HPSv2.1: the cosine of the normalised embeddings of an open_clip ViT-H/14
  fine-tuned by the HPS authors; its checkpoint (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``)
  is mapped key by key onto transformers' CLIPModel (:func:`openclip_to_transformers`) and read
  with ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and
  plain containers.
* **shapes** — the shapes world's known reward (`inpo_pipeline.worlds.shapes.REWARDS`; ``--scorer-model``
  names which, default ``colour``; ``-NAME`` negates it; ``random@SEED`` is a seeded score that
  knows nothing, for controls): the truth of the test world, for `inpo label` and `inpo eval`
  runs whose result can be checked.
* **imagereward** — only when the ``ImageReward`` package imports; otherwise the scorer is
  reported as unavailable (:class:`ScorerUnavailable`), never imitated.

Every scorer maps a batch of (image, prompt) pairs to one float each: :meth:`Scorer.score`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from inpo_pipeline.errors import UserError

SCORERS = ("pickscore", "clip", "aesthetic", "hps", "imagereward", "shapes")
SHAPES_DEFAULT_REWARD = "colour"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_L_14 = "openai/clip-vit-large-patch14"
IMAGEREWARD_MODEL = "ImageReward-v1.0"
AESTHETIC_HIDDEN = (1024, 128, 64, 16)


class ScorerUnavailable(UserError):
    """A scorer whose package is not installed: listed in the report as unavailable."""


@dataclass(frozen=True)
class ScorerSpec:
    """Where a scorer's parts come from.

    `model`: the scorer's own weights (a CLIPModel folder / hub id for pickscore and clip, the
    head file for aesthetic, the checkpoint file for hps, a name or file for imagereward).
    `backbone`: the CLIP model under the aesthetic head, or the CLIPConfig that the HPS
    checkpoint fills. `processor`: the CLIPProcessor (image preprocessing and tokenizer).
    """

    name: str
    model: str | None
    processor: str | None = None
    backbone: str | None = None


def _holds_processor(location: str) -> bool:
    """A local folder with a CLIP processor's files (image preprocessing and a tokenizer)."""
    folder = Path(location)
    # transformers writes preprocessor_config.json, and since v5 also processor_config.json alone
    return folder.is_dir() and any((folder / name).is_file() for name in ("preprocessor_config.json",
                                                                          "processor_config.json"))


def resolve_spec(name: str, model: str | None = None, processor: str | None = None,
                 backbone: str | None = None) -> ScorerSpec:
    """The spec with each scorer's published defaults filled in."""
    if name not in SCORERS:
        raise UserError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    if name == "pickscore":
        model = model or PICKSCORE_MODEL
        # PickScore's hub repo has no processor files (its card points at ViT-H-14's); a local
        # folder that holds them is enough on its own, so an offline machine never asks the hub
        return ScorerSpec(name, model, processor or (model if _holds_processor(model) else VIT_H_14))
    if name == "clip":
        model = model or VIT_L_14
        return ScorerSpec(name, model, processor or model)
    if name in ("aesthetic", "hps"):
        if not model:
            what = "the LAION aesthetic head (e.g. sac+logos+ava1-l14-linearMSE.pth)" if name == "aesthetic" \
                else "the HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)"
            raise UserError(f"--scorer {name} needs --scorer-model {name}=PATH: {what}")
        backbone = backbone or (VIT_L_14 if name == "aesthetic" else VIT_H_14)
        return ScorerSpec(name, model, processor or backbone, backbone)
    if name == "shapes":
        from inpo_pipeline.worlds.shapes import REWARDS

        model = model or SHAPES_DEFAULT_REWARD
        reward_name, at, seed = model.removeprefix("-").partition("@")
        if not ((reward_name in REWARDS and not at) or (reward_name == "random" and (not at or seed.isdigit()))):
            raise UserError(f"--scorer shapes: --scorer-model {model!r} is not a shapes-world reward; choose from "
                            f"{', '.join(REWARDS)}, random@SEED (a control), each optionally negated (-colour)")
        return ScorerSpec(name, model)
    return ScorerSpec(name, model or IMAGEREWARD_MODEL)


class Scorer(ABC):
    """Scores (image, prompt) pairs; higher is better."""

    name = ""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec

    def identity(self) -> dict[str, Any]:
        return {"scorer": self.spec.name, "model": self.spec.model, "processor": self.spec.processor,
                "backbone": self.spec.backbone}

    @abstractmethod
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per (image, prompt)."""


# ------------------------------------------------------------------------------ CLIP scores
def clip_pair_scores(output: Any, kind: str) -> torch.Tensor:
    """Per-pair scores from a CLIPModel forward output over N images and their N prompts.

    The output's ``image_embeds``/``text_embeds`` are already L2-normalised and
    ``logits_per_image`` = logit_scale.exp() × their cosines (N × N; pair i is the diagonal).
    """
    cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
    if kind == "pickscore":
        return output.logits_per_image.diagonal()
    if kind == "clip":
        return 100.0 * cosine.clamp(min=0)
    if kind == "hps":
        return cosine
    raise ValueError(f"no CLIP pair score {kind!r}")


def image_embeddings(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected CLIP image embedding (not normalised), as CLIP's encode_image returns it."""
    vision = model.vision_model(pixel_values=pixel_values)
    return model.visual_projection(vision.pooler_output)


class _Processed:
    """Shared by the CLIP-based scorers: a CLIPModel in eval mode and its processor."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.device = device

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return pixels["pixel_values"].to(self.device, torch.float32)

    def tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        length = min(int(self.processor.tokenizer.model_max_length),
                     int(self.model.config.text_config.max_position_embeddings))
        # always padded to the full context, so a prompt's encoding never depends on its batch
        tokens = self.processor.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                                          return_tensors="pt")
        return {key: value.to(self.device) for key, value in tokens.items()}


class ClipPairScorer(Scorer, _Processed):
    """pickscore, clip and hps: one CLIPModel forward over images and prompts."""

    def __init__(self, spec: ScorerSpec, model: Any, processor: Any, device: torch.device) -> None:
        Scorer.__init__(self, spec)
        _Processed.__init__(self, model, processor, device)
        self.name = spec.name

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        output = self.model(pixel_values=self.pixels(images), **self.tokens(prompts))
        return clip_pair_scores(output, self.name).double().cpu().tolist()


# ------------------------------------------------------------------------------ aesthetic
class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP; its state-dict keys are layers.{0,2,4,6,7}.*."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        widths = (input_dim, *AESTHETIC_HIDDEN)
        layers: list[torch.nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(width_in, width_out))
            if i < 3:
                layers.append(torch.nn.Dropout(0.2 if i < 2 else 0.1))
        layers.append(torch.nn.Linear(AESTHETIC_HIDDEN[-1], 1))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class AestheticScorer(Scorer, _Processed):
    name = "aesthetic"

    def __init__(self, spec: ScorerSpec, model: Any, head: AestheticHead, processor: Any,
                 device: torch.device) -> None:
        Scorer.__init__(self, spec)
        _Processed.__init__(self, model, processor, device)
        self.head = head.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        embedding = image_embeddings(self.model, self.pixels(images))
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return self.head(embedding).squeeze(-1).double().cpu().tolist()


# ------------------------------------------------------------------------------ ImageReward
class ImageRewardScorer(Scorer):
    name = "imagereward"

    def __init__(self, spec: ScorerSpec, model: Any) -> None:
        super().__init__(spec)
        self.model = model

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [float(self.model.score(prompt, [image.convert("RGB")])) for image, prompt in zip(images, prompts)]


# ------------------------------------------------------------------------------ the shapes world
class ShapesRewardScorer(Scorer):
    """The shapes world's reward `spec.model` of the image's pixels and its prompt (uint8 RGB).

    `-NAME` negates the reward (labels reversed: a mirror run); `random@SEED` is `random_score`.
    """

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        import numpy as np

        from inpo_pipeline.worlds.shapes import REWARDS

        model = str(self.spec.model)
        sign = -1.0 if model.startswith("-") else 1.0
        reward_name, _, seed = model.removeprefix("-").partition("@")
        pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
        if reward_name == "random":
            return [sign * random_score(array, prompt, int(seed or 0)) for array, prompt in zip(pixels, prompts)]
        try:
            values = REWARDS[reward_name](pixels, list(prompts))
        except ValueError as error:
            raise UserError(f"--scorer shapes scores shapes-world samples: {error}") from error
        return [sign * float(value) for value in values]


def random_score(pixels: Any, prompt: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (pixels, prompt, seed) and nothing else: a scorer that
    knows nothing, so its labels are a fair coin per pair (the shuffled control of on-policy data)."""
    import hashlib

    hasher = hashlib.sha256(int(seed).to_bytes(8, "little"))
    hasher.update(prompt.encode())
    hasher.update(pixels.tobytes())
    return int.from_bytes(hasher.digest()[:8], "little") / 2.0**64


# ------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from .safetensors or a torch file (tensors and plain containers only).

    A torch file holding {"state_dict": ...} (the HPS checkpoints) or {"model": ...} is
    unwrapped; a DataParallel "module." prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {path} as a weights-only checkpoint ({first})") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_VISION = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",  # sic: transformers' spelling
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_OPENCLIP_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def _block_keys(prefix: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One residual block's tensor: `rest` is "N.<open_clip name>" below transformer.resblocks."""
    number, _, name = rest.partition(".")
    if not number.isdigit():
        return {}
    target = f"{prefix}.encoder.layers.{number}"
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        # nn.MultiheadAttention packs [q; k; v] along dim 0
        kind = "weight" if name.endswith("weight") else "bias"
        query, key, val = value.chunk(3, dim=0)
        return {f"{target}.self_attn.q_proj.{kind}": query, f"{target}.self_attn.k_proj.{kind}": key,
                f"{target}.self_attn.v_proj.{kind}": val}
    module, _, parameter = name.rpartition(".")
    if module in _OPENCLIP_BLOCK and parameter in ("weight", "bias"):
        return {f"{target}.{_OPENCLIP_BLOCK[module]}.{parameter}": value}
    return {}


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP (ViT) state dict onto transformers' CLIPModel names.

    open_clip: ``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding``,
    ``visual.ln_pre.*``, ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight,
    attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post.*``,
    ``visual.proj``; ``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final.*``, ``text_projection``, ``logit_scale``.
    ``in_proj_*`` packs q, k, v; ``visual.proj`` and ``text_projection`` are (width, dim)
    matrices applied as ``x @ proj``, i.e. transposed relative to a Linear weight. Any other
    key (another architecture) is an error; the ``attn_mask`` buffer is skipped.
    """
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        if key == "visual.proj":
            result = {"visual_projection.weight": value.t().contiguous()}
        elif key == "text_projection":
            result = {"text_projection.weight": value.t().contiguous()}
        elif key.startswith("visual.transformer.resblocks."):
            result = _block_keys("vision_model", key[len("visual.transformer.resblocks."):], value)
        elif key.startswith("visual."):
            name = _OPENCLIP_VISION.get(key[len("visual."):])
            result = {f"vision_model.{name}": value} if name else {}
        elif key.startswith("transformer.resblocks."):
            result = _block_keys("text_model", key[len("transformer.resblocks."):], value)
        else:
            name = _OPENCLIP_TEXT.get(key)
            result = {name: value} if name else {}
        if not result:
            unknown.append(key)
        mapped.update(result)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise UserError(f"the checkpoint has {len(unknown)} key(s) that are not an open_clip ViT CLIP's: {shown}")
    return mapped


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_clip_model(location: str) -> Any:
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(location, torch_dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a CLIP model from {location}: {_first_line(error)}") from error


def load_processor(location: str) -> Any:
    from transformers import CLIPProcessor

    try:
        return CLIPProcessor.from_pretrained(location)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot load a CLIP processor from {location}: {_first_line(error)}") from error


def load_hps_model(checkpoint: str, backbone: str) -> Any:
    """transformers' CLIPModel with the architecture of `backbone` and the HPS checkpoint's weights."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    mapped = openclip_to_transformers(read_checkpoint(checkpoint))
    try:
        config = CLIPConfig.from_pretrained(backbone)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the CLIP configuration of {backbone}: {_first_line(error)}") from error
    with init_empty_weights():  # parameters on the meta device: the checkpoint supplies them all
        model = CLIPModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise UserError(f"the HPS checkpoint {checkpoint} does not fit the CLIP architecture of {backbone} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict({key: value.float() for key, value in mapped.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise UserError(f"the HPS checkpoint {checkpoint} does not fit the CLIP architecture of {backbone}: "
                        f"{_first_line(error.__cause__ or error)} (a size mismatch: another ViT size?)") from error
    return model.float()


def load_aesthetic_head(path: str, input_dim: int) -> AestheticHead:
    state = read_checkpoint(path)
    weight = state.get("layers.0.weight")
    if weight is None or weight.ndim != 2:
        raise UserError(f"{path} is not a LAION aesthetic head (no layers.0.weight)")
    if weight.shape[1] != input_dim:
        raise UserError(f"the aesthetic head {path} takes {weight.shape[1]}-wide embeddings but the CLIP "
                        f"backbone gives {input_dim}-wide ones (the head needs CLIP ViT-L/14)")
    head = AestheticHead(input_dim)
    try:
        head.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} is not the LAION aesthetic MLP (768→1024→128→64→16→1): "
                        f"{_first_line(error)}") from error
    return head


def load_scorer(spec: ScorerSpec, device: torch.device) -> Scorer:
    """Load a scorer's weights and processor; ScorerUnavailable when its package is missing."""
    if spec.name == "imagereward":
        try:
            import ImageReward  # type: ignore[import-not-found]
        except Exception as error:  # any import failure means the scorer cannot run here
            raise ScorerUnavailable(
                f"the ImageReward package does not import ({type(error).__name__}: "
                f"{_first_line(error)}); pip install image-reward to use it"
            ) from error
        try:
            model = ImageReward.load(spec.model, device=str(device))
        except Exception as error:
            raise UserError(f"cannot load ImageReward {spec.model}: {_first_line(error)}") from error
        return ImageRewardScorer(spec, model)
    if spec.name == "shapes":
        return ShapesRewardScorer(spec)
    assert spec.processor is not None
    processor = load_processor(spec.processor)
    if spec.name in ("pickscore", "clip"):
        assert spec.model is not None
        return ClipPairScorer(spec, load_clip_model(spec.model), processor, device)
    assert spec.model is not None and spec.backbone is not None
    if spec.name == "hps":
        return ClipPairScorer(spec, load_hps_model(spec.model, spec.backbone), processor, device)
    backbone = load_clip_model(spec.backbone)
    head = load_aesthetic_head(spec.model, int(backbone.config.projection_dim))
    return AestheticScorer(spec, backbone, head, processor, device)

"""Tiny offline fixtures: seeded toy Stable Diffusion pipelines and toy preference datasets.

The test-suite and the built-in example must run without the Hugging Face hub, so everything
here is generated locally and deterministically from a seed:

* a byte-level CLIP tokenizer that encodes any unicode text into fewer than 1000 ids;
* SD 1.5 (ε or v-prediction) / SDXL / SD3 / FLUX.1 pipeline folders with diffusers' own tiny test
  configurations (one- or two-layer transformers, tiny CLIP and T5 encoders), saved with
  ``save_pretrained`` so that ``from_pretrained`` loads them like real checkpoints;
* Pick-a-Pic v2 style parquet files and prompt/chosen/rejected manifests, laced with the edge
  cases the tool must survive: ties, undecodable images, odd sizes and modes, unicode, empty and
  repeated captions, extra columns.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

if TYPE_CHECKING:
    from transformers import T5EncoderModel, T5TokenizerFast

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 512
"""Special tokens follow the 512 byte tokens, so (as in real CLIP) the EOS id is the largest."""
EOS_TOKEN_ID = 513
TOKENIZER_MAX_LENGTH = 77
TEXT_VOCAB_SIZE = 1000
TEXT_HIDDEN_SIZE = 32

CAPTIONS = (
    "ein Hund im Schnee — 雪の中の犬 🐕",
    "",
    "a red fox in a snowy forest, highly detailed",
    "portrait of an astronaut cat, oil painting",
    "  A  lighthouse\nat dusk,\tcinematic  ",
    "a bowl of ramen, studio lighting, 4k",
    'a sign that says "hello, world"',
    "cyberpunk street market at night " * 12,
)
"""Caption pool, cycled so that every caption is used by several pairs: unicode and emoji, empty,
odd whitespace, quotes and commas (CSV quoting), and one far beyond 77 tokens (truncation)."""

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
)
"""diffusers' tiny test UNet (block channels 32, 64), shared by the SD1.5 and SDXL fixtures."""

BROKEN_IMAGE = b"not an image"

PICKAPIC_SCHEMA = pa.schema(
    [
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("user_id", pa.int64()),
    ]
)
"""Pick-a-Pic v2 columns the tool reads (caption, jpg_*, label_*) among some it must ignore."""


class WrittenDataset(TypedDict):
    """What a dataset writer produced; row indices are 0-based positions in the file."""

    path: Path
    num_rows: int
    tie_rows: list[int]
    broken_rows: list[int]
    num_distinct_captions: int
    kept_rows: list[int]


# --------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from each byte to a printable unicode character (byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {byte: chr(cp) for byte, cp in zip(printable, codepoints)}


def build_tiny_tokenizer(path: Path | str) -> CLIPTokenizer:
    """Write and load a merge-free byte-level CLIP tokenizer (514 ids) under ``path``.

    With every byte and every byte + ``</w>`` in the vocabulary, BPE needs no merges to encode any
    string; the ids stay below the tiny text encoders' vocabulary size of 1000.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    vocab.update({BOS_TOKEN: BOS_TOKEN_ID, EOS_TOKEN: EOS_TOKEN_ID})
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(path)
    return tokenizer


# --------------------------------------------------------------------------------- pipelines


def _text_config(**overrides: Any) -> CLIPTextConfig:
    """diffusers' tiny test text-encoder config, with special ids matching the tiny tokenizer."""
    values: dict[str, Any] = dict(
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=TEXT_VOCAB_SIZE,
    )
    return CLIPTextConfig(**{**values, **overrides})


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    """diffusers' tiny test VAE: one downsampling, so a 64x64 image has 32x32x4 latents."""
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The DDIM scheduler configuration of the real SD 1.5 / SDXL checkpoints (SD 2.x: v_prediction)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd15(path: Path, seed: int = 0, prediction_type: str = "epsilon", open_clip: bool = False) -> Path:
    """Save a randomly initialised tiny SD 1.5 pipeline folder at ``path`` and return it.

    Each model is built right after ``torch.manual_seed(seed)``, so equal seeds give bit-identical
    weight files. ``prediction_type="v_prediction"`` makes it an SD 2.x-style v-model;
    ``open_clip=True`` gives it SD 2.x's kind of text encoder (OpenCLIP's GELU, not quick GELU).
    """
    path = Path(path)
    tokenizer = build_tiny_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=TEXT_HIDDEN_SIZE)
    torch.manual_seed(seed)
    vae = _tiny_vae(scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(**({"hidden_act": "gelu"} if open_clip else {})))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0, second_text_width: int = TEXT_HIDDEN_SIZE) -> Path:
    """Save a randomly initialised tiny SDXL pipeline folder at ``path`` and return it.

    Two 32-wide text encoders are concatenated into 64-wide cross-attention context; the UNet's
    added embedding takes 6 micro-conditioning values x 8 plus the 32-wide pooled projection.
    The VAE keeps SDXL's own scaling factor (0.13025), so readers must take it from the config.
    `second_text_width` widens the second encoder (and its projection), as SDXL's bigG is wider
    than its CLIP-L (a single-file loader tells the two apart by width).
    """
    path = Path(path)
    tokenizer = build_tiny_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + second_text_width,
        cross_attention_dim=TEXT_HIDDEN_SIZE + second_text_width,
    )
    torch.manual_seed(seed)
    vae = _tiny_vae(scaling_factor=0.13025)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=second_text_width,
                                                              hidden_size=second_text_width))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


T5_MAX_LENGTH = 16
"""T5 tokens per prompt in the tiny flow pipelines (the tokenizer's model_max_length)."""
TINY_T5_DIM = 64
"""Tiny T5's d_model = the transformers' joint_attention_dim (wider than the 2 × 32 CLIP states,
which SD3's encode_prompt zero-pads to it)."""


def caption_words() -> list[str]:
    """The lower-case ASCII words of the example captions, in a fixed order (a T5 vocabulary)."""
    words: list[str] = []
    for caption in CAPTIONS:
        for word in caption.lower().replace(",", " ").replace('"', " ").split():
            if word.isascii() and word.isalnum() and word not in words:
                words.append(word)
    return words


def build_tiny_t5_tokenizer(path: Path | str, words: Sequence[str], max_length: int) -> "T5TokenizerFast":
    """Write and load a T5TokenizerFast: a Unigram model over `words`, letters as fallback,
    anything else <unk>. Built from a `tokenizers` model (nothing downloaded), saved and
    reloaded so the object is exactly what `from_pretrained` of the pipeline folder gives."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0) for word in words]
    vocab += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(Path(path))
    return T5TokenizerFast.from_pretrained(Path(path))


def _tiny_t5(vocab_size: int, seed: int) -> "T5EncoderModel":
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=TINY_T5_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, is_encoder_decoder=False)
    return T5EncoderModel(config)


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    vae = _tiny_vae(scaling_factor)
    vae.register_to_config(shift_factor=shift_factor)
    return vae


def build_tiny_sd3(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny SD3 pipeline: diffusers' test SD3Transformer2DModel (one
    joint block, patch 2), CLIP-L/G-shaped tiny encoders with projections, a tiny T5, SD3's VAE
    scaling/shift and its shifted flow scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    tokenizer = build_tiny_tokenizer(path / "tokenizer")
    words = caption_words()
    t5_tokenizer = build_tiny_t5_tokenizer(path / "tokenizer_3", words, T5_MAX_LENGTH)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=TINY_T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE, pos_embed_max_size=16,
    )
    torch.manual_seed(seed)
    vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    encoders = []
    for offset in (0, 1):
        torch.manual_seed(seed + offset)
        encoders.append(CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_HIDDEN_SIZE)))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=_tiny_t5(len(t5_tokenizer), seed + 2), tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a randomly initialised tiny FLUX.1 pipeline: diffusers' test FluxTransformer2DModel (one
    double and one single block) with the guidance embedding of FLUX.1-dev (or without it:
    schnell), a tiny CLIP (pooled) and T5, FLUX's VAE scaling/shift and its resolution-dependent
    (dynamic) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    tokenizer = build_tiny_tokenizer(path / "tokenizer")
    t5_tokenizer = build_tiny_t5_tokenizer(path / "tokenizer_2", caption_words(), T5_MAX_LENGTH)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TINY_T5_DIM, pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(len(t5_tokenizer), seed + 2), tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------- images


def _random_image(rng: random.Random) -> tuple[bytes, str]:
    """A random picture of rectangles and ellipses, encoded; returns (bytes, "jpeg" | "png").

    Sizes vary independently in 40..120 px (so mostly non-square, often odd); about one image in
    six is grayscale ("L") and one in six RGBA (always PNG); the rest are RGB, mostly JPEG.
    """
    width, height = rng.randint(40, 120), rng.randint(40, 120)
    mode = rng.choices(["RGB", "L", "RGBA"], weights=[4, 1, 1])[0]

    def colour() -> tuple[int, ...]:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        return tuple(rng.randrange(256) for _ in range(channels))

    image = Image.new(mode, (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, x1 = sorted(rng.randrange(width) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height) for _ in range(2))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=colour())
    fmt = "png" if mode == "RGBA" or rng.random() < 0.2 else "jpeg"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": rng.randint(70, 95)} if fmt == "jpeg" else {}))
    return buffer.getvalue(), fmt


def _break(encoded: bytes, rng: random.Random) -> bytes:
    """Undecodable image bytes: a 40-byte truncation (the header may still parse) or garbage."""
    return encoded[:40] if rng.random() < 0.5 else BROKEN_IMAGE


def _captions(num_rows: int, rng: random.Random) -> list[str]:
    """``num_rows`` captions cycling through ``CAPTIONS`` (so they repeat), in shuffled order."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(num_rows)]
    rng.shuffle(captions)
    return captions


def _summary(
    path: Path, captions: Sequence[str], tie_rows: Collection[int], broken_rows: Collection[int]
) -> WrittenDataset:
    """The ``WrittenDataset`` record of a file with these captions and special rows."""
    dropped = set(tie_rows) | set(broken_rows)
    return WrittenDataset(
        path=path,
        num_rows=len(captions),
        tie_rows=sorted(tie_rows),
        broken_rows=sorted(broken_rows),
        num_distinct_captions=len(set(captions)),
        kept_rows=[i for i in range(len(captions)) if i not in dropped],
    )


# --------------------------------------------------------------------------------- datasets


def write_pickapic_parquet(
    path: Path,
    num_pairs: int = 24,
    seed: int = 0,
    *,
    ties: int = 3,
    broken: int = 2,
    row_group_size: int = 8,
) -> WrittenDataset:
    """Write one Pick-a-Pic v2 style parquet file of ``num_pairs`` image pairs.

    Columns: ``caption``, ``jpg_0``/``jpg_1`` (encoded image bytes), ``label_0``/``label_1``
    (1/0 or 0/1; 0.5/0.5 on the ``ties`` rows), plus the real dataset's ``best_image_uid``,
    ``image_0_uid``, ``image_1_uid`` and ``user_id``, which the tool must ignore. On the
    ``broken`` rows (never ties) one of the two images cannot be decoded.
    """
    if ties + broken > num_pairs:
        raise ValueError(f"ties ({ties}) + broken ({broken}) exceed num_pairs ({num_pairs})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    special = rng.sample(range(num_pairs), ties + broken)
    tie_rows, broken_rows = set(special[:ties]), set(special[ties:])
    captions = _captions(num_pairs, rng)
    columns: dict[str, list] = {name: [] for name in PICKAPIC_SCHEMA.names}
    for row, caption in enumerate(captions):
        images = [_random_image(rng)[0], _random_image(rng)[0]]
        uids = [f"{rng.getrandbits(64):016x}" for _ in images]
        if row in tie_rows:
            labels, best_uid = (0.5, 0.5), ""
        else:
            winner = rng.randrange(2)
            labels, best_uid = (1.0 - winner, float(winner)), uids[winner]
        if row in broken_rows:
            side = rng.randrange(2)
            images[side] = _break(images[side], rng)
        columns["best_image_uid"].append(best_uid)
        columns["caption"].append(caption)
        columns["image_0_uid"].append(uids[0])
        columns["image_1_uid"].append(uids[1])
        columns["jpg_0"].append(images[0])
        columns["jpg_1"].append(images[1])
        columns["label_0"].append(labels[0])
        columns["label_1"].append(labels[1])
        columns["user_id"].append(rng.randrange(1, 500_000))
    pq.write_table(pa.table(columns, schema=PICKAPIC_SCHEMA), path, row_group_size=row_group_size)
    return _summary(path, captions, tie_rows, broken_rows)


def write_pickapic_folder(
    folder: Path,
    num_files: int = 2,
    pairs_per_file: int = 12,
    seed: int = 0,
    **kwargs: int,
) -> list[WrittenDataset]:
    """Write a sharded Pick-a-Pic split ``train-0000i-of-0000n.parquet``; file i uses seed + i.

    ``kwargs`` (``ties``, ``broken``, ``row_group_size``) go to ``write_pickapic_parquet``.
    """
    folder = Path(folder)
    return [
        write_pickapic_parquet(
            folder / f"train-{i:05d}-of-{num_files:05d}.parquet",
            pairs_per_file,
            seed + i,
            **kwargs,
        )
        for i in range(num_files)
    ]


def write_manifest(
    path: Path,
    num_pairs: int = 8,
    seed: int = 0,
    fmt: Literal["jsonl", "csv"] = "jsonl",
) -> WrittenDataset:
    """Write a prompt/chosen/rejected manifest at ``path`` and its images in ``images/`` beside it.

    Image paths are relative to the manifest's folder. Two rows are broken: one names a chosen
    image that does not exist, one points its rejected image at an undecodable file.
    """
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be at least 2 (two rows are broken), got {num_pairs}")
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"fmt must be 'jsonl' or 'csv', got {fmt!r}")
    path = Path(path)
    images_dir = path.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    missing_row, corrupt_row = rng.sample(range(num_pairs), 2)
    captions = _captions(num_pairs, rng)
    rows = []
    for row, caption in enumerate(captions):
        names = {}
        for role in ("chosen", "rejected"):
            encoded, ext = _random_image(rng)
            if row == corrupt_row and role == "rejected":
                encoded = _break(encoded, rng)
            name = f"images/{row:04d}_{role}.{'jpg' if ext == 'jpeg' else ext}"
            if row == missing_row and role == "chosen":
                (path.parent / name).unlink(missing_ok=True)
            else:
                (path.parent / name).write_bytes(encoded)
            names[role] = name
        rows.append({"prompt": caption, **names})
    with path.open("w", encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
    return _summary(path, captions, [], [missing_row, corrupt_row])

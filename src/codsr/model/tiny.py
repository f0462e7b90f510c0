"""Tiny random Stable-Diffusion-2.1-like models for tests and CPU training recipes.

:func:`save_tiny_model` writes a complete diffusers folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
:func:`codsr.model.base.load_base_components` and :class:`codsr.CODSRPipeline` read like the real
SD 2.1-base. The architecture keeps what CODSR depends on (SPEC §1-§5) and shrinks the rest:

* UNet ``conv_in`` outputs 320 channels (the SFT maps 192 → 320 channels, SPEC §4); the other
  levels are narrow; cross-attention blocks carry the stage-2 ``attn2`` layers;
* VAE downsamples ×8 (PixelUnshuffle(8) of the SFT must match the latent grid), 4 latent
  channels, 32 GroupNorm groups, ``scaling_factor`` 0.18215;
* CLIP text model with a small hidden size; a byte-level CLIP tokenizer built offline (the 256
  byte symbols, the same with ``</w>``, ``<|startoftext|>``, ``<|endoftext|>``; no merges) that
  pads with ``"!"`` (id 0) like SD 2.1;
* ``DDPMScheduler`` with SD's configuration (scaled-linear betas 0.00085 → 0.012, 1000 steps).

Weights are random (seeded). Everything is built offline; nothing is downloaded.

:func:`save_tiny_grounding_models` writes tiny random Grounding DINO and SAM 2 folders in
``transformers`` format, so that ``codsr masks`` (and stage-2 training with online masks) runs
offline in tests and CPU recipes (``codsr make-tiny-model --grounding``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SD_SCHEDULER_CONFIG",
    "TinyModelConfig",
    "build_tiny_components",
    "build_tokenizer",
    "byte_level_vocab",
    "bytes_to_unicode",
    "save_tiny_grounding_models",
    "save_tiny_model",
    "TINY_GROUNDING_VOCAB",
]

# SD 2.1-base's scheduler (SPEC §1).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

_DEFAULT_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    # conv_in must output 320 channels: the SFT modulates it (SPEC §4).
    "block_out_channels": [320, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    # diffusers' SD-2 naming: the number of heads per level.
    "attention_head_dim": [5, 2],
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "time_embedding_dim": 128,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

_DEFAULT_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    # four levels = three downsamplers = ×8, as SD's VAE
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

_DEFAULT_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # SD 2.1 pads with "!" (id 0), SPEC §1


@dataclass
class TinyModelConfig:
    """Keyword overrides for the three networks; the defaults are a known-good tiny SD-2.1 layout.

    ``unet``/``vae``/``text_encoder`` are merged into the defaults above (so ``{"layers_per_block":
    2}`` changes only that). ``scheduler`` overrides :data:`SD_SCHEDULER_CONFIG`.
    """

    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TinyModelConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {"unet", "vae", "text_encoder", "scheduler"})
        if unknown:
            raise ValueError(
                f"unknown tiny-model config keys {unknown}; valid: unet, vae, text_encoder, scheduler"
            )
        return cls(**{k: dict(v or {}) for k, v in values.items()})

    def unet_kwargs(self) -> dict[str, Any]:
        kw = {**copy.deepcopy(_DEFAULT_UNET), **self.unet}
        if kw["block_out_channels"][0] != 320:
            raise ValueError(
                f"tiny unet.block_out_channels[0] must be 320 (the SFT's output channels, SPEC §4), "
                f"got {kw['block_out_channels'][0]}"
            )
        return kw

    def vae_kwargs(self) -> dict[str, Any]:
        kw = {**copy.deepcopy(_DEFAULT_VAE), **self.vae}
        if len(kw["block_out_channels"]) != 4:
            raise ValueError("tiny vae.block_out_channels needs 4 levels (×8 downsampling, as SD's VAE)")
        return kw

    def text_kwargs(self) -> dict[str, Any]:
        return {**copy.deepcopy(_DEFAULT_TEXT), **self.text_encoder}

    def scheduler_kwargs(self) -> dict[str, Any]:
        return {**copy.deepcopy(SD_SCHEDULER_CONFIG), **self.scheduler}


def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable-character table of byte-level BPE (GPT-2 / CLIP).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + k)`` in byte
    order, so every byte has a visible, whitespace-free symbol.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_vocab() -> dict[str, int]:
    """514-entry CLIP vocabulary: 256 byte symbols, the same with ``</w>``, BOS, EOS.

    Symbols are ordered like CLIP's (printable bytes first, ``"!"`` = 0), so the pad id is 0 as in
    SD 2.1. With no merges, every word is spelled byte by byte.
    """
    symbols = list(bytes_to_unicode().values())
    symbols.sort(key=lambda s: (ord(s) >= 256, ord(s)))
    order = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {s: i for i, s in enumerate(order)}


def build_tokenizer():
    """A CLIP tokenizer over :func:`byte_level_vocab` (max length 77, pads with ``"!"``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=byte_level_vocab(),
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=77,
    )


def build_tiny_components(config: TinyModelConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """Random tiny ``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` (fp32, CPU).

    Weight initialisation is seeded with ``seed`` (same seed → bit-identical weights). diffusers
    zero-initialises ``conv_out`` of the UNet; it is left that way (a fresh UNet predicts ε = 0).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or TinyModelConfig()
    tokenizer = build_tokenizer()
    vocab = byte_level_vocab()
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config.unet_kwargs())
        vae = AutoencoderKL(**config.vae_kwargs())
        text_cfg = CLIPTextConfig(
            vocab_size=len(vocab),
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[PAD_TOKEN],
            **config.text_kwargs(),
        )
        text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDPMScheduler(**config.scheduler_kwargs())
    for m in (unet, vae, text_encoder):
        m.eval()
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_model(
    out_dir: str | os.PathLike, config: TinyModelConfig | None = None, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a tiny random SD-2.1-like model in diffusers layout to ``out_dir`` and return the path.

    Refuses to write into a non-empty folder unless ``overwrite`` is set.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) or another --out"
        )
    comps = build_tiny_components(config, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        comps[name].save_pretrained(out / name)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "_codsr_tiny": {"seed": int(seed)},
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


# Word-piece vocabulary of the tiny Grounding DINO's BERT tokenizer: BERT's special tokens, the
# period that ends every detector prompt, and common RAM tags (other words become [UNK]).
TINY_GROUNDING_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".",
    "cat", "dog", "bird", "tree", "sky", "grass", "car", "building", "road", "water", "flower",
    "person", "man", "woman", "house", "cloud", "mountain", "field", "wall", "window", "street",
)  # fmt: skip


def _save_tiny_grounding_dino(folder: Path, image_size: int) -> None:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    # Grounding DINO needs >= 2 decoder layers (tied weights) and an input above 64² (shared/ENVIRONMENT.md).
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=image_size, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(TINY_GROUNDING_VOCAB), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32,
    )  # fmt: skip
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(TINY_GROUNDING_VOCAB)})
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": image_size}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_tiny_sam2(folder: Path, size: int) -> None:
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    # A global-attention block must not open a Hiera stage (ZeroDivisionError): stage 3 = blocks 2, 3.
    backbone = Sam2HieraDetConfig(
        hidden_size=8, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[2, 2, 2, 2], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )  # fmt: skip
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32,
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
    )  # fmt: skip
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16,
                                                      mask_input_channels=4),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                                  num_attention_heads=2, iou_head_hidden_dim=16),
    )  # fmt: skip
    Sam2Model(config).save_pretrained(folder)
    image_processor = Sam2ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
    )
    Sam2Processor(image_processor=image_processor, target_size=size).save_pretrained(folder)


def save_tiny_grounding_models(
    out_dir: str | os.PathLike, seed: int = 0, detector_size: int = 96, sam_size: int = 128
) -> tuple[Path, Path]:
    """Write tiny random Grounding DINO and SAM 2.1 models (transformers format) for offline runs.

    Returns ``(out_dir/grounding_dino, out_dir/sam2)``, the folders to pass to ``codsr masks
    --grounding-dino/--sam2`` or ``masks.grounding_dino/sam2``. Both are seeded with ``seed``;
    their masks are meaningless but deterministic. The detector works at ``detector_size`` px
    (> 64, see shared/ENVIRONMENT.md), SAM at ``sam_size`` px (a multiple of 16).
    """
    if detector_size <= 64:
        raise ValueError(
            f"detector_size must exceed 64 px (Grounding DINO's extra level), got {detector_size}"
        )
    if sam_size % 16:
        raise ValueError(f"sam_size must be a multiple of 16 (SAM's patch size), got {sam_size}")
    out = Path(out_dir)
    gd, sam = out / "grounding_dino", out / "sam2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _save_tiny_grounding_dino(gd, detector_size)
        torch.manual_seed(seed)
        _save_tiny_sam2(sam, sam_size)
    return gd, sam

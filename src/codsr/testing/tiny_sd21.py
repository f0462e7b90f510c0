"""Tiny random Stable-Diffusion-2.1-like model: the one tiny SD 2.1 config of the project.

:func:`save_tiny_model` (``codsr make-tiny-model``) writes a complete diffusers folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
:func:`codsr.model.base.load_base_components` and :class:`codsr.CODSRPipeline` read like the real
SD 2.1-base; :func:`build_tiny_components` builds the same modules in memory. The architecture keeps
what CODSR depends on (docs/method.md#base-model) and shrinks the rest:

* UNet ``conv_in`` outputs 320 channels (the SFT maps 192 → 320 channels, paper §3.3 /
  docs/method.md#lqfm); the other levels are narrow; cross-attention blocks carry the stage-2
  ``attn2`` layers;
* VAE downsamples ×8 (PixelUnshuffle(8) of the SFT must match the latent grid), 4 latent
  channels, 32 GroupNorm groups, ``scaling_factor`` 0.18215;
* CLIP text model with a small hidden size; a byte-level CLIP tokenizer built offline (the 256
  byte symbols, the same with ``</w>``, ``<|startoftext|>``, ``<|endoftext|>``; no merges) that
  pads with ``"!"`` (id 0) like SD 2.1;
* ``DDPMScheduler`` with SD's configuration (scaled-linear betas 0.00085 → 0.012, 1000 steps).

Weights are random (seeded). Everything is built offline; nothing is downloaded.
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
    "save_tiny_model",
]

# SD 2.1-base's scheduler (docs/method.md#base-model).
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
    # conv_in must output 320 channels: the SFT modulates it (paper Eq. 4).
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
PAD_TOKEN = "!"  # SD 2.1 pads with "!" (id 0), docs/method.md#base-model


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
                f"tiny unet.block_out_channels[0] must be 320 (the SFT's output channels, paper Eq. 4), "
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

    Weight initialisation (the libraries' own initialisers) is seeded with ``seed``: the same seed
    gives bit-identical weights.
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
    out_dir: str | os.PathLike,
    config: TinyModelConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    *,
    components: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random SD-2.1-like model in diffusers layout to ``out_dir`` and return the path.

    ``components`` (from :func:`build_tiny_components`, possibly modified) are written instead of
    a fresh build. Refuses to write into a non-empty folder unless ``overwrite`` is set.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) or another --out"
        )
    comps = components if components is not None else build_tiny_components(config, seed)
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

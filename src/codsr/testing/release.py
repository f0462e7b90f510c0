"""A complete tiny CODSR model: tiny SD 2.1 base + a synthetic checkpoint in the release's format.

:func:`tiny_pipeline` builds a :class:`codsr.CODSRPipeline` in memory in a few seconds;
:func:`save_tiny_release` writes the same model as files (``tiny-sd21/`` diffusers folder and
``codsr_tiny.pkl``, the layout of the release-parity fixture) for tests of the file-reading paths
(CLI, batch runner). Both are seeded: the same ``seed`` gives bit-identical weights, and
``CODSRPipeline.from_pretrained(*save_tiny_release(d, seed=s))`` computes what
``tiny_pipeline(seed=s)`` computes.

The synthetic checkpoint follows what two-stage training leaves behind (docs/method.md#checkpoint-format):
stage-1 adapters (``default_{encoder,decoder,others}``) non-zero on every target module; stage-2
alignment adapters non-zero only on the cross-attention (``attn2``) projections and at their
untrained initialisation elsewhere (``lora_B`` = 0); a non-zero VAE-encoder LoRA; a non-zero SFT.
Ranks are the release's (VAE 4, UNet 16). The base weights get N(0, 0.02²) noise on every parameter
so that no norm scale, bias or zero-initialised output projection is trivial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from codsr.model.checkpoint import SFT_KEYS, CODSRCheckpoint
from codsr.model.lora import (
    UNET_GROUPS,
    VAE_ADAPTER,
    unet_adapter_name,
    unet_lora_target_modules,
    vae_lora_target_modules,
)
from codsr.testing.tiny_sd21 import TinyModelConfig, build_tiny_components, save_tiny_model

__all__ = [
    "BASE_NOISE_STD",
    "RANK_UNET",
    "RANK_VAE",
    "assemble_pipeline",
    "build_tiny_release",
    "save_tiny_release",
    "tiny_pipeline",
    "tiny_release_checkpoint",
]

RANK_VAE = 4  # the release's ranks
RANK_UNET = 16
BASE_NOISE_STD = 0.02  # added to every base parameter (as the release-parity fixture does)
_LORA_B_STD = 0.05  # non-zero adapters: A ~ N(0, (1/r)²) (peft's gaussian init), B ~ N(0, 0.05²)
_SFT_STD = 0.01  # the SFT's raw maps are divided by coeff ≈ 0.34 before modulating conv_in


def _lora_pair(
    layer: nn.Module, rank: int, nonzero: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) shaped as peft stores them for ``layer`` (Linear or Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        a_shape = (rank, layer.in_channels, *layer.kernel_size)
        b_shape = (layer.out_channels, rank, 1, 1)
    elif isinstance(layer, nn.Linear):
        a_shape, b_shape = (rank, layer.in_features), (layer.out_features, rank)
    else:  # pragma: no cover - the target patterns only match convs and linears
        raise TypeError(f"LoRA target {type(layer).__name__} is neither Conv2d nor Linear")
    a = torch.randn(a_shape, generator=gen) / rank
    b = torch.randn(b_shape, generator=gen) * _LORA_B_STD if nonzero else torch.zeros(b_shape)
    return a, b


def _adapter_tensors(
    model: nn.Module, modules: list[str], adapter: str, rank: int, gen: torch.Generator, nonzero=lambda n: True
) -> dict[str, torch.Tensor]:
    layers = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name in modules:
        a, b = _lora_pair(layers[name], rank, nonzero(name), gen)
        out[f"{name}.lora_A.{adapter}.weight"] = a
        out[f"{name}.lora_B.{adapter}.weight"] = b
    return out


def tiny_release_checkpoint(
    vae: nn.Module, unet: nn.Module, seed: int = 0, stage: int = 2, sft_channels: int = 320
) -> CODSRCheckpoint:
    """A seeded synthetic CODSR checkpoint for ``vae``/``unet`` (release layout, stage 1 or 2).

    Module lists are those :mod:`codsr.model.lora` derives from the networks (docs/method.md#lora-layout);
    ``unet_extra`` holds ``conv_{in,out}.base_layer.*`` equal to the base weights, as the release stores them.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    gen = torch.Generator().manual_seed(seed)
    vae_modules = vae_lora_target_modules(vae)
    groups = unet_lora_target_modules(unet)
    vae_lora = _adapter_tensors(vae, vae_modules, VAE_ADAPTER, RANK_VAE, gen)
    unet_lora: dict[str, torch.Tensor] = {}
    for group in UNET_GROUPS:
        unet_lora.update(_adapter_tensors(unet, groups[group], unet_adapter_name(group), RANK_UNET, gen))
    if stage == 2:
        for group in UNET_GROUPS:
            unet_lora.update(
                _adapter_tensors(
                    unet, groups[group], unet_adapter_name(group, alignment=True), RANK_UNET, gen,
                    nonzero=lambda n: ".attn2." in n,
                )
            )  # fmt: skip
    sft: dict[str, torch.Tensor] = {}
    in_channels = 3 * 8 * 8
    for key in SFT_KEYS:
        conv_in_ch = in_channels if "_conv0." in key else sft_channels
        shape = (sft_channels, conv_in_ch, 3, 3) if key.endswith("weight") else (sft_channels,)
        sft[key] = torch.randn(shape, generator=gen) * _SFT_STD
    base = unet.state_dict()
    extra = {
        f"{m}.base_layer.{p}": base[f"{m}.{p}"].detach().clone()
        for m in ("conv_in", "conv_out")
        for p in ("weight", "bias")
    }
    ckpt = CODSRCheckpoint(
        rank_vae=RANK_VAE,
        rank_unet=RANK_UNET,
        vae_lora_modules=vae_modules,
        unet_lora_modules=groups,
        vae_lora=vae_lora,
        unet_lora=unet_lora,
        sft=sft,
        unet_extra=extra,
        metadata={"source_format": "release"},
    )
    ckpt.validate()
    return ckpt


@torch.no_grad()
def _perturb(modules: list[nn.Module], gen: torch.Generator) -> None:
    for m in modules:
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * BASE_NOISE_STD)


def build_tiny_release(
    seed: int = 0, stage: int = 2, config: TinyModelConfig | None = None
) -> tuple[dict[str, Any], CODSRCheckpoint]:
    """The tiny base components (perturbed, fp32, CPU) and their synthetic checkpoint."""
    comps = build_tiny_components(config, seed=seed)
    _perturb([comps["unet"], comps["vae"], comps["text_encoder"]], torch.Generator().manual_seed(seed + 1))
    ckpt = tiny_release_checkpoint(comps["vae"], comps["unet"], seed=seed + 2, stage=stage)
    return comps, ckpt


def assemble_pipeline(
    comps: dict[str, Any],
    checkpoint: CODSRCheckpoint | None = None,
    *,
    sft: nn.Module | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A :class:`codsr.CODSRPipeline` from in-memory base components, as ``from_pretrained`` builds it.

    ``comps`` holds ``vae``, ``unet``, ``scheduler``, ``text_encoder`` and ``tokenizer`` (float32);
    the checkpoint is applied (UNet and VAE-encoder LoRA merged in float32, the pipeline's default)
    before the cast to ``dtype``.
    """
    from codsr.model.codsr import CODSRModel
    from codsr.pipeline.pipeline import CODSRPipeline

    kw = {"sft": sft} if sft is not None else {}
    gen = CODSRModel(comps["vae"], comps["unet"], comps["scheduler"], **kw)
    if checkpoint is not None:
        gen.load_checkpoint(checkpoint, merge_vae=True)
    pipe = CODSRPipeline(gen, comps["text_encoder"], comps["tokenizer"])
    return pipe.to(torch.device(device), dtype)


def tiny_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    stage: int = 2,
    config: TinyModelConfig | None = None,
):
    """A complete tiny :class:`codsr.CODSRPipeline` (tiny SD 2.1 + synthetic release checkpoint), in memory."""
    comps, ckpt = build_tiny_release(seed, stage, config)
    return assemble_pipeline(comps, ckpt, device=device, dtype=dtype)


def save_tiny_release(
    out_dir: str | os.PathLike,
    seed: int = 0,
    stage: int = 2,
    config: TinyModelConfig | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/tiny-sd21/`` (diffusers folder) and ``out_dir/codsr_tiny.pkl`` (release format).

    Returns ``(base_model_dir, checkpoint_path)``, the two arguments of ``CODSRPipeline.from_pretrained``
    and of ``codsr upscale --base-model/--checkpoint``.
    """
    out = Path(out_dir)
    comps, ckpt = build_tiny_release(seed, stage, config)
    base = save_tiny_model(out / "tiny-sd21", components=comps, overwrite=overwrite)
    return base, ckpt.save(out / "codsr_tiny.pkl", format="release")

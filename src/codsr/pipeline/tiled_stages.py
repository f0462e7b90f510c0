"""The model's heavy stages run under a :class:`~codsr.pipeline.tiling.TilePlan`.

:func:`tiled_stages` returns the :class:`~codsr.model.codsr.ForwardStages` that
``CODSRPipeline.restore`` passes to :meth:`CODSRModel.forward <codsr.model.codsr.CODSRModel.forward>`:

* VAE encode / decode: untiled, the exact tiled VAE (``vae_tiling``: GroupNorm statistics pooled
  over tiles, optional offload), or with ``release_compat=True`` the release's approximate tiled
  VAE (``release_vae_tiling``, its own trigger: longer side > tile + 2·pad);
* noise prediction: one call, or UNet tiles (``latent_tiling``) in one batch with pooled GroupNorm
  statistics (default), one by one with the same exact pooled statistics and bounded memory
  (``plan.sequential_unet``), or one by one with per-tile statistics (``release_compat``);
* decode: with ``tiny_decoder`` (an ``AutoencoderTiny``, TAESD) the same ẑ_H is decoded by it
  instead: about 10× cheaper and lossy, for previews (docs/benchmarks.md#tiny-preview-decoder).

float16 decodes are guarded against overflow: when the fp16 VAE decode is not finite it is run
again with the decoder (``post_quant_conv`` + ``decoder``) upcast to float32 for that call, the
per-call form of diffusers' ``force_upcast``, and a :class:`DecodeUpcastWarning` says so.

A stage tiles only above the plan's thresholds (docs/inference.md#tiling).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from codsr.model.codsr import CODSRModel, ForwardStages
from codsr.model.lqfm import conv_in_modulation
from codsr.pipeline.latent_tiling import (
    batched_noise_prediction,
    sequential_pooled_noise_prediction,
    tiled_noise_prediction,
)
from codsr.pipeline.release_vae_tiling import release_tiled_decoder_forward, release_tiled_encoder_forward
from codsr.pipeline.tiling import TilePlan
from codsr.pipeline.vae_tiling import tiled_decode, tiled_encode_moments

__all__ = ["DecodeUpcastWarning", "tiled_stages", "tiny_decode", "upcast_decoder"]


class DecodeUpcastWarning(UserWarning):
    """A float16 VAE decode overflowed (Inf/NaN) and was redone with the decoder in float32."""


class upcast_decoder:  # noqa: N801 - used as a context manager
    """Within the block, the VAE's ``post_quant_conv`` and ``decoder`` run in float32 (their
    weights are cast and cast back on exit: the part of the VAE that overflows in float16)."""

    def __init__(self, vae: nn.Module) -> None:
        self.parts = [vae.post_quant_conv, vae.decoder]
        self.dtype = vae.post_quant_conv.weight.dtype

    def __enter__(self) -> None:
        for m in self.parts:
            m.float()

    def __exit__(self, *exc: object) -> None:
        for m in self.parts:
            m.to(self.dtype)


def _guarded(vae: nn.Module, run: Callable[[bool], torch.Tensor]) -> torch.Tensor:
    """``run(False)``; for a float16 VAE whose result is not finite, ``run(True)`` under :class:`upcast_decoder`."""
    x = run(False)
    if vae.post_quant_conv.weight.dtype != torch.float16 or bool(torch.isfinite(x).all()):
        return x
    warnings.warn(
        "the float16 VAE decode overflowed (Inf/NaN); decoded again with the VAE decoder in float32. Use "
        "torch_dtype=torch.bfloat16 to avoid the second decode.",
        DecodeUpcastWarning,
        stacklevel=3,
    )
    with upcast_decoder(vae):
        return run(True)


def tiny_decode(tiny_decoder: nn.Module, z_h: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Decode ẑ_H (scaled latent, as the VAE gets it before ``/ scaling_factor``) with an
    ``AutoencoderTiny`` (TAESD); lossy. ``tile`` (latent px): diffusers' own blended tiling of
    AutoencoderTiny above it (TAESD has no GroupNorm, so its tiles need no pooled statistics)."""
    p = next(tiny_decoder.parameters())
    z = (z_h / float(tiny_decoder.config.scaling_factor)).to(device=p.device, dtype=p.dtype)
    tiled = tile is not None and max(z.shape[-2:]) > tile
    old = tiny_decoder.use_tiling
    tiny_decoder.use_tiling = tiled
    try:
        return tiny_decoder.decode(z, return_dict=False)[0].clamp(-1, 1)
    finally:
        tiny_decoder.use_tiling = old


def tiled_stages(
    model: CODSRModel, plan: TilePlan, *, release_compat: bool = False, tiny_decoder: nn.Module | None = None
) -> ForwardStages:
    """Encode / noise-prediction / decode callables of ``model`` that follow ``plan``; with
    ``tiny_decoder`` the decode is :func:`tiny_decode` instead of the VAE's."""
    vae = model.vae

    def encode_moments(x: torch.Tensor) -> torch.Tensor:
        tile = plan.vae_encoder_tile
        if release_compat:
            # The release decides itself whether to tile; an untiled plan never triggers it.
            h = release_tiled_encoder_forward(vae.encoder, x.to(vae.dtype), tile or max(x.shape[-2:]))
            return vae.quant_conv(h.to(vae.quant_conv.weight.dtype))
        if tile is not None and max(x.shape[-2:]) > tile:
            return tiled_encode_moments(vae, x, tile, offload=plan.offload)
        return model.encode_moments(x)

    def predict_noise(
        z_t: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        h, w = z_t.shape[-2:]
        tile = plan.latent_tile
        overlap = min(plan.latent_overlap, max(0, min(tile, h, w) - 1))

        def predict(ys: slice, xs: slice) -> torch.Tensor:
            return model.predict_noise(
                z_t[..., ys, xs], timesteps, prompt_embeds, scale[..., ys, xs], shift[..., ys, xs]
            )

        def predict_batch(windows: list[tuple[slice, slice]]) -> torch.Tensor:
            n = len(windows)
            return model.predict_noise(
                torch.cat([z_t[..., ys, xs] for ys, xs in windows]),
                timesteps.repeat(n),
                prompt_embeds.repeat(n, 1, 1),
                torch.cat([scale[..., ys, xs] for ys, xs in windows]),
                torch.cat([shift[..., ys, xs] for ys, xs in windows]),
            )

        shape = tuple(z_t.shape)
        if release_compat:
            return tiled_noise_prediction(predict, shape, tile, overlap, release_compat, z_t.device)
        if plan.sequential_unet and h * w > tile * tile:

            def conv_in(ys: slice, xs: slice) -> torch.Tensor:
                with conv_in_modulation(model.unet, scale[..., ys, xs], shift[..., ys, xs]):
                    return model.unet.conv_in(z_t[..., ys, xs].to(model.dtype))

            return sequential_pooled_noise_prediction(
                model.unet, conv_in, shape, timesteps, prompt_embeds, tile, overlap, offload=plan.offload,
                device=z_t.device,
            )  # fmt: skip
        return batched_noise_prediction(predict_batch, shape, tile, overlap, model.unet, z_t.device)

    def decode(z_h: torch.Tensor) -> torch.Tensor:
        tile = None if plan.vae_decoder_tile is None else max(1, plan.vae_decoder_tile // 8)  # latent px
        if tiny_decoder is not None:
            return tiny_decode(tiny_decoder, z_h, tile)
        return _guarded(vae, lambda upcast: vae_decode(z_h, tile, upcast))

    def vae_decode(z_h: torch.Tensor, tile: int | None, upcast: bool) -> torch.Tensor:
        if upcast:  # the decoder's weights are float32 now, the encoder's (``vae.dtype``) are not
            z = (z_h / model.scaling_factor).float()
            if tile is not None and max(z_h.shape[-2:]) > tile and not release_compat:
                return tiled_decode(vae, z, tile, offload=plan.offload).clamp(-1, 1)
            return vae.decode(z, return_dict=False)[0].clamp(-1, 1)
        if release_compat:
            z = vae.post_quant_conv(
                z_h.to(vae.dtype) / model.scaling_factor
            )  # the release casts, then divides
            return release_tiled_decoder_forward(vae.decoder, z, tile or max(z.shape[-2:])).clamp(-1, 1)
        if tile is not None and max(z_h.shape[-2:]) > tile:
            z = (z_h / model.scaling_factor).to(vae.dtype)
            return tiled_decode(vae, z, tile, offload=plan.offload).clamp(-1, 1)
        return model.decode(z_h)

    return ForwardStages(encode_moments=encode_moments, predict_noise=predict_noise, decode=decode)

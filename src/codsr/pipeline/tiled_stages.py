"""The model's heavy stages run under a :class:`~codsr.pipeline.tiling.TilePlan`.

:func:`tiled_stages` returns the :class:`~codsr.model.codsr.ForwardStages` that
``CODSRPipeline.restore`` passes to :meth:`CODSRModel.forward <codsr.model.codsr.CODSRModel.forward>`:

* VAE encode / decode: untiled, the exact tiled VAE (``vae_tiling``: GroupNorm statistics pooled
  over tiles, optional offload), or with ``release_compat=True`` the release's approximate tiled
  VAE (``release_vae_tiling``, its own trigger: longer side > tile + 2·pad);
* noise prediction: one call, or UNet tiles (``latent_tiling``) in one batch with pooled GroupNorm
  statistics (default) or one by one (``plan.sequential_unet`` or ``release_compat``).

A stage tiles only above the plan's thresholds (docs/inference.md#tiling).
"""

from __future__ import annotations

import torch

from codsr.model.codsr import CODSRModel, ForwardStages
from codsr.pipeline.latent_tiling import batched_noise_prediction, tiled_noise_prediction
from codsr.pipeline.release_vae_tiling import release_tiled_decoder_forward, release_tiled_encoder_forward
from codsr.pipeline.tiling import TilePlan
from codsr.pipeline.vae_tiling import tiled_decode, tiled_encode_moments

__all__ = ["tiled_stages"]


def tiled_stages(model: CODSRModel, plan: TilePlan, *, release_compat: bool = False) -> ForwardStages:
    """Encode / noise-prediction / decode callables of ``model`` that follow ``plan``."""
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
        if release_compat or plan.sequential_unet:
            return tiled_noise_prediction(predict, shape, tile, overlap, release_compat, z_t.device)
        return batched_noise_prediction(predict_batch, shape, tile, overlap, model.unet, z_t.device)

    def decode(z_h: torch.Tensor) -> torch.Tensor:
        tile = None if plan.vae_decoder_tile is None else max(1, plan.vae_decoder_tile // 8)  # latent px
        if release_compat:
            z = vae.post_quant_conv(z_h.to(vae.dtype) / model.scaling_factor)  # the release casts, then divides
            return release_tiled_decoder_forward(vae.decoder, z, tile or max(z.shape[-2:])).clamp(-1, 1)
        if tile is not None and max(z_h.shape[-2:]) > tile:
            z = (z_h / model.scaling_factor).to(vae.dtype)
            return tiled_decode(vae, z, tile, offload=plan.offload).clamp(-1, 1)
        return model.decode(z_h)

    return ForwardStages(encode_moments=encode_moments, predict_noise=predict_noise, decode=decode)

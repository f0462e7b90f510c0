"""Seam-free tiled VAE encode/decode with GroupNorm statistics shared across tiles.

Why not the usual blended tiles: GroupNorm normalises with statistics of the whole image, so
tiles normalised on their own shift colour from tile to tile, and blending only hides it. Here the
full-resolution part of the VAE (the encoder's down blocks, the decoder's up blocks) runs tile by
tile and layer by layer: before every GroupNorm the per-group mean and variance are pooled over the
tiles' *core* regions (which partition the image), so every tile is normalised with the statistics
of the whole image. Each tile carries a halo at least as wide as the receptive field of the tiled
part, so its core is computed exactly as in the untiled network; the latent-resolution parts
(mid-blocks, including their global self-attention) run untiled. Tiled and untiled results agree
to float rounding.

Memory: the activations of one layer for all tiles are held at once (about twice one full-size
activation), while convolution work buffers are per tile. The stock diffusers blocks are used;
only the order of their sub-module calls is driven from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

# Receptive-field radius of the tiled parts of the SD VAE, rounded up: encoder conv_in + down
# blocks ≈ 75 input px (kept a multiple of 8 for stride alignment); decoder up blocks + conv_out
# ≈ 12.3 latent px.
ENCODER_HALO = 80
DECODER_HALO = 13


@dataclass(frozen=True)
class AxisWindow:
    start: int  # window start (input coordinates of the tiled part)
    core0: int  # core (owned) region, window coordinates
    core1: int


def plan_axis(length: int, core: int, halo: int, align: int = 1) -> tuple[int, list[AxisWindow]]:
    """Equal-size windows covering ``length``; cores partition it, each ≥ ``halo`` from inner window edges.

    Returns (window size, windows). All offsets are multiples of ``align``.
    """
    if length % align or core % align or halo % align:
        raise ValueError(f"length {length}, tile {core} and halo {halo} must be multiples of {align}")
    window = core + 2 * halo
    if length <= window:
        return length, [AxisWindow(0, 0, length)]
    units, core_units = length // align, core // align
    n = math.ceil(units / core_units)
    bounds = [units * i // n * align for i in range(n + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s = min(max(a - halo, 0), length - window)
        out.append(AxisWindow(s, a - s, b - s))
    return window, out


@dataclass(frozen=True)
class Tile:
    y: AxisWindow
    x: AxisWindow


class _TiledRunner:
    """Runs stock diffusers VAE blocks over a list of tiles with pooled GroupNorm statistics."""

    def __init__(self, tiles: list[torch.Tensor], layout: list[Tile], window_hw: tuple[int, int]) -> None:
        self.tiles: list[torch.Tensor | None] = list(tiles)
        self.layout = layout
        self.window_hw = window_hw

    def _core(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Core region of tile ``i`` at ``t``'s resolution."""
        fy = t.shape[-2] / self.window_hw[0]
        fx = t.shape[-1] / self.window_hw[1]
        tl = self.layout[i]
        return t[..., round(tl.y.core0 * fy) : round(tl.y.core1 * fy), round(tl.x.core0 * fx) : round(tl.x.core1 * fx)]

    def _group_stats(self, xs: list[torch.Tensor], norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, group) mean and biased variance over all tile cores (two passes, float32)."""
        g = norm.num_groups
        total = None
        count = 0
        for i, x in enumerate(xs):
            c = self._core(i, x).float()
            b = c.shape[0]
            s = c.reshape(b, g, -1).sum(-1)
            total = s if total is None else total + s
            count += c[0, 0].numel() * (c.shape[1] // g)
        mean = total / count
        sq = None
        for i, x in enumerate(xs):
            c = self._core(i, x).float()
            b = c.shape[0]
            d = (c.reshape(b, g, -1) - mean[..., None]).pow(2).sum(-1)
            sq = d if sq is None else sq + d
        return mean, sq / count

    @staticmethod
    def _apply_norm(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = norm.num_groups
        xf = x.float().reshape(b, g, -1)
        y = ((xf - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        if norm.affine:
            y = y * norm.weight.float().view(1, c, 1, 1) + norm.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for i, t in enumerate(self.tiles):
            self.tiles[i] = fn(t)

    def norm_act(self, norm: nn.GroupNorm, act: nn.Module, then: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """tiles ← then(act(GroupNorm_pooled(tiles)))."""
        mean, var = self._group_stats(self.tiles, norm)
        self.map(lambda t: then(act(self._apply_norm(t, norm, mean, var))))

    def resnet(self, block: nn.Module) -> None:
        """A diffusers ``ResnetBlock2D`` (no time embedding, no internal resampling)."""
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise NotImplementedError("tiled VAE: resnet blocks with internal resampling are not supported")
        inputs = self.tiles
        self.tiles = list(inputs)
        self.norm_act(block.norm1, block.nonlinearity, block.conv1)
        hidden = self.tiles
        mean, var = self._group_stats(hidden, block.norm2)
        out: list[torch.Tensor | None] = []
        for i in range(len(hidden)):
            h = block.conv2(block.dropout(block.nonlinearity(self._apply_norm(hidden[i], block.norm2, mean, var))))
            hidden[i] = None
            x = inputs[i]
            inputs[i] = None
            if block.conv_shortcut is not None:
                x = block.conv_shortcut(x)
            out.append((x + h) / block.output_scale_factor)
        self.tiles = out

    def block(self, blk: nn.Module) -> None:
        """A diffusers ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``."""
        if getattr(blk, "attentions", None):
            raise NotImplementedError("tiled VAE: down/up blocks with attention are not supported")
        for r in blk.resnets:
            self.resnet(r)
        for s in getattr(blk, "downsamplers", None) or []:
            self.map(s)
        for s in getattr(blk, "upsamplers", None) or []:
            self.map(s)


def _split(x: torch.Tensor, core: int, halo: int, align: int) -> tuple[list[torch.Tensor], list[Tile], tuple[int, int]]:
    wh, rows = plan_axis(x.shape[-2], core, halo, align)
    ww, cols = plan_axis(x.shape[-1], core, halo, align)
    layout = [Tile(r, c) for r in rows for c in cols]
    tiles = [x[..., t.y.start : t.y.start + wh, t.x.start : t.x.start + ww] for t in layout]
    return tiles, layout, (wh, ww)


def _assemble_into(out: torch.Tensor, runner: _TiledRunner) -> None:
    """Write every tile's core into ``out`` (at the tiles' current resolution), freeing the tiles."""
    for i, tl in enumerate(runner.layout):
        t = runner.tiles[i]
        runner.tiles[i] = None
        fy = t.shape[-2] / runner.window_hw[0]
        fx = t.shape[-1] / runner.window_hw[1]
        y0, x0 = round((tl.y.start + tl.y.core0) * fy), round((tl.x.start + tl.x.core0) * fx)
        core = runner._core(i, t)
        out[..., y0 : y0 + core.shape[-2], x0 : x0 + core.shape[-1]] = core


def needs_tiling(h: int, w: int, tile: int | None) -> bool:
    return tile is not None and max(h, w) > tile


def tiled_encode_moments(vae: nn.Module, x: torch.Tensor, tile_size: int, halo: int = ENCODER_HALO) -> torch.Tensor:
    """``quant_conv(Encoder(x))`` with the full-resolution part tiled (``tile_size`` image px)."""
    enc = vae.encoder
    factor = 2 ** sum(1 for b in enc.down_blocks if getattr(b, "downsamplers", None))
    tile_size = max(factor, tile_size // factor * factor)
    tiles, layout, window = _split(x, tile_size, halo, factor)
    runner = _TiledRunner(tiles, layout, window)
    runner.map(enc.conv_in)
    for blk in enc.down_blocks:
        runner.block(blk)
    first = runner.tiles[0]
    h = first.new_empty((x.shape[0], first.shape[1], x.shape[-2] // factor, x.shape[-1] // factor))
    _assemble_into(h, runner)
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    return vae.quant_conv(h)


def tiled_decode(vae: nn.Module, z: torch.Tensor, tile_size: int, halo: int = DECODER_HALO) -> torch.Tensor:
    """``Decoder(post_quant_conv(z))`` with the up blocks tiled; ``tile_size`` in latent px."""
    dec = vae.decoder
    factor = 2 ** sum(1 for b in dec.up_blocks if getattr(b, "upsamplers", None))
    h = dec.conv_in(vae.post_quant_conv(z))
    h = dec.mid_block(h, None)
    tiles, layout, window = _split(h, max(1, tile_size), halo, 1)
    del h
    runner = _TiledRunner(tiles, layout, window)
    for blk in dec.up_blocks:
        runner.block(blk)
    runner.norm_act(dec.conv_norm_out, dec.conv_act, dec.conv_out)
    first = runner.tiles[0]
    out = first.new_empty((z.shape[0], first.shape[1], z.shape[-2] * factor, z.shape[-1] * factor))
    _assemble_into(out, runner)
    return out

"""The CODSR release's *approximate* tiled VAE, reproduced for ``release_compat=True``.

This reproduces the release's tiled VAE (my_utils/vaehook.py, ``VAEHook`` as installed by
``CODSR_test._init_tiled_vae`` in codsr.py of Chanson94/CODSR @ 68cad3cd, with
``fast_encoder = fast_decoder = color_fix = False``). Our own tiled VAE (``vae_tiling.py``) is
exact; the release's is not, and differs from the untiled network by O(0.1-1) where it tiles. The
numerics reproduced here, all of them quirks of the release:

* **Trigger.** A module is tiled only when ``max(H, W) > 2·pad + tile_size`` (pad = 32 image px
  for the encoder, 11 latent px for the decoder); otherwise the untiled forward runs.
* **Split.** ``n = max(1, ceil((L − 2·pad) / tile))`` tiles per axis of nominal size
  ``ceil((L − 2·pad) / n)``, rounded *up* to a multiple of 32, 16, 8, 4 or 2 (the largest that
  stays ≤ tile_size, else unchanged). Cores start at ``pad``; the first/last core is extended to
  the border; every tile carries ``pad`` of halo, cut at the image border. The halo is smaller
  than the receptive field, so tile borders differ from the untiled network.
* **Tile-local everything but GroupNorm.** Convolutions see zero padding at tile borders and the
  mid-block self-attention attends within the tile only.
* **GroupNorm statistics.** Before every GroupNorm, each tile's per-(sample, group) mean and
  *biased* variance are taken over the whole padded tile (halo included); the image statistics are
  their average weighted by tile pixel count. The variance is the weighted mean of the tile
  variances, i.e. without the spread of the tile means. 32 groups and eps = 1e-6 are fixed.
* **Merge.** Each tile's core is cut out and written into a zero tensor of the output size, in
  the default dtype (float32) whatever the input dtype.

Where float rounding can be matched cheaply it is: the statistics are combined with the same
operations (including the alternating tile order of the release's back-and-forth tile sweep), the
normalisation uses ``F.batch_norm`` on the grouped view, and the attention uses the stock diffusers
``Attention`` helpers (``head_to_batch_dim``, ``get_attention_scores``: ``baddbmm`` + softmax), not
SDPA. Against the release on CPU float32 the outputs agree to ~1e-6.

The modules are the stock diffusers ``Encoder`` / ``Decoder``; their sub-modules are called directly
(``resnet.conv1(h)`` …), so peft-wrapped (LoRA) layers apply exactly as in the release, where the VAE
encoder LoRA is active and unmerged when the hook runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The release's defaults (test_codsr.py): encoder tile in image px, decoder tile in latent px.
RELEASE_ENCODER_TILE = 1024
RELEASE_DECODER_TILE = 224
RELEASE_ENCODER_PAD = 32  # image px
RELEASE_DECODER_PAD = 11  # latent px
# The release hard-codes these instead of reading them from the GroupNorm layers.
RELEASE_NORM_GROUPS = 32
RELEASE_NORM_EPS = 1e-6
VAE_SCALE = 8


def _pad(is_decoder: bool) -> int:
    return RELEASE_DECODER_PAD if is_decoder else RELEASE_ENCODER_PAD


def _check_tile_size(tile_size: int, name: str) -> int:
    if isinstance(tile_size, bool) or int(tile_size) != tile_size or tile_size < 1:
        raise ValueError(f"{name} must be a positive integer, got {tile_size!r}")
    return int(tile_size)


def release_vae_tiling_applies(h: int, w: int, tile_size: int, is_decoder: bool) -> bool:
    """The release's trigger: tile only when ``max(h, w) > 2·pad + tile_size``.

    ``h``, ``w`` and ``tile_size`` are in the module's input units: image px for the encoder
    (pad 32), latent px for the decoder (pad 11). At the release's defaults the encoder tiles
    images larger than 1088 px and the decoder latents larger than 246 px (1968 image px).
    """
    tile_size = _check_tile_size(tile_size, "tile_size")
    return max(h, w) > 2 * _pad(is_decoder) + tile_size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _snap_tile_size(size: int, limit: int) -> int:
    """Round ``size`` up to a multiple of 32, 16, 8, 4 or 2, the first that stays ≤ ``limit``.

    Python's floor modulo matters for the non-positive sizes of thin images (they become 0).
    """
    divider = 32
    while divider >= 2:
        remainder = size % divider
        if remainder == 0:
            return size
        candidate = size - remainder + divider
        if candidate <= limit:
            return candidate
        divider //= 2
    return size


@dataclass(frozen=True)
class ReleaseTile:
    """One tile: the input window (with halo) and the output region it fills, as (y0, y1, x0, x1)."""

    window: tuple[int, int, int, int]  # input coordinates
    target: tuple[int, int, int, int]  # output coordinates


def _scale(v: int, is_decoder: bool) -> int:
    return v * VAE_SCALE if is_decoder else v // VAE_SCALE


def release_vae_tiles(h: int, w: int, tile_size: int, is_decoder: bool) -> list[ReleaseTile]:
    """The release's tile split of an ``h``×``w`` input, row-major (see the module docstring)."""
    tile_size = _check_tile_size(tile_size, "tile_size")
    pad = _pad(is_decoder)
    n_h = max(_ceil_div(h - 2 * pad, tile_size), 1)
    n_w = max(_ceil_div(w - 2 * pad, tile_size), 1)
    tile_h = _snap_tile_size(_ceil_div(h - 2 * pad, n_h), tile_size)
    tile_w = _snap_tile_size(_ceil_div(w - 2 * pad, n_w), tile_size)

    def axis(i: int, step: int, length: int) -> tuple[tuple[int, int], tuple[int, int]]:
        c0, c1 = pad + i * step, min(pad + (i + 1) * step, length)
        # Cores next to the border are extended to it (the border needs no halo).
        t0 = c0 if c0 > pad else 0
        t1 = c1 if c1 < length - pad else length
        return (max(0, c0 - pad), min(length, c1 + pad)), (_scale(t0, is_decoder), _scale(t1, is_decoder))

    tiles = []
    for i in range(n_h):
        (wy0, wy1), (ty0, ty1) = axis(i, tile_h, h)
        for j in range(n_w):
            (wx0, wx1), (tx0, tx1) = axis(j, tile_w, w)
            tiles.append(ReleaseTile((wy0, wy1, wx0, wx1), (ty0, ty1, tx0, tx1)))
    return tiles


class _ReleaseTileSet:
    """All tiles of one input, advanced op by op; tiles interact only through GroupNorm statistics."""

    def __init__(self, tiles: list[Tensor]):
        self.tiles = tiles
        self._norms_done = 0

    def map(self, fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
        return [fn(t) for t in self.tiles]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.tiles = self.map(fn)

    def add(self, residuals: list[Tensor]) -> None:
        self.tiles = [t + r for t, r in zip(self.tiles, residuals, strict=True)]

    def group_norm(self, norm: nn.GroupNorm) -> None:
        """GroupNorm with pixel-weighted averages of per-tile mean and biased variance."""
        stats = [_tile_var_mean(t) for t in self.tiles]
        pixels = [t.shape[2] * t.shape[3] for t in self.tiles]
        # The release sweeps the tiles forwards and backwards alternately, one GroupNorm per
        # sweep, so its statistics lists are in reverse tile order for every odd GroupNorm.
        order = list(range(len(stats)))
        if self._norms_done % 2:
            order.reverse()
        self._norms_done += 1
        var = torch.vstack([stats[i][0] for i in order])
        mean = torch.vstack([stats[i][1] for i in order])
        weights = torch.tensor([pixels[i] for i in order], dtype=torch.float32, device=var.device) / max(
            pixels
        )
        weights = weights.unsqueeze(1) / weights.sum()
        var = (var * weights).sum(dim=0)
        mean = (mean * weights).sum(dim=0)
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        self.apply(lambda t: _normalize(t, mean, var, weight, bias))


def _grouped(x: Tensor) -> Tensor:
    b, c = x.shape[:2]
    return x.contiguous().view(1, b * RELEASE_NORM_GROUPS, c // RELEASE_NORM_GROUPS, *x.shape[2:])


def _tile_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) biased variance and mean of one tile, shape (B·32,)."""
    var, mean = torch.var_mean(_grouped(x), dim=[0, 2, 3, 4], unbiased=False)
    if var.dtype == torch.float16 and var.isinf().any():
        # Large fp16 activations overflow the variance; the release retries in float32.
        var, mean = torch.var_mean(_grouped(x.float()), dim=[0, 2, 3, 4], unbiased=False)
    return var, mean


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    out = F.batch_norm(_grouped(x), mean, var, None, None, training=False, momentum=0.0, eps=RELEASE_NORM_EPS)
    out = out.view(x.shape)
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _resnet(ts: _ReleaseTileSet, block: nn.Module) -> None:
    """ResnetBlock2D (no time embedding, output scale 1) with tiled GroupNorms."""
    if block.in_channels != block.out_channels:
        residual = ts.map(block.conv_shortcut)
    else:
        residual = list(ts.tiles)
    ts.group_norm(block.norm1)
    ts.apply(F.silu)
    ts.apply(block.conv1)
    ts.group_norm(block.norm2)
    ts.apply(F.silu)
    ts.apply(block.conv2)
    ts.add(residual)


def _tile_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """Self-attention within one tile, through the stock ``Attention`` helpers (baddbmm + softmax)."""
    b, c, h, w = x.shape
    seq = x.view(b, c, h * w).transpose(1, 2)
    query = attn.head_to_batch_dim(attn.to_q(seq))
    key = attn.head_to_batch_dim(attn.to_k(seq))
    value = attn.head_to_batch_dim(attn.to_v(seq))
    probs = attn.get_attention_scores(query, key, None)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    out = attn.to_out[1](attn.to_out[0](out))
    return out.transpose(-1, -2).reshape(b, c, h, w)


def _attention(ts: _ReleaseTileSet, attn: nn.Module) -> None:
    residual = list(ts.tiles)
    ts.group_norm(attn.group_norm)
    ts.apply(lambda t: _tile_attention(attn, t))
    ts.add(residual)


def _mid_block(ts: _ReleaseTileSet, mid: nn.Module) -> None:
    _resnet(ts, mid.resnets[0])
    _attention(ts, mid.attentions[0])
    _resnet(ts, mid.resnets[1])


def _run_encoder(ts: _ReleaseTileSet, encoder: nn.Module) -> None:
    ts.apply(encoder.conv_in)
    last = len(encoder.down_blocks) - 1
    for level, block in enumerate(encoder.down_blocks):
        for resnet in block.resnets:
            _resnet(ts, resnet)
        if level != last:
            ts.apply(block.downsamplers[0])
    _mid_block(ts, encoder.mid_block)
    ts.group_norm(encoder.conv_norm_out)
    ts.apply(F.silu)
    ts.apply(encoder.conv_out)


def _run_decoder(ts: _ReleaseTileSet, decoder: nn.Module) -> None:
    ts.apply(decoder.conv_in)
    _mid_block(ts, decoder.mid_block)
    last = len(decoder.up_blocks) - 1
    for level, block in enumerate(decoder.up_blocks):
        for resnet in block.resnets:
            _resnet(ts, resnet)
        if level != last:
            ts.apply(block.upsamplers[0])
    ts.group_norm(decoder.conv_norm_out)
    ts.apply(F.silu)
    ts.apply(decoder.conv_out)


def _check_module(net: nn.Module, is_decoder: bool) -> None:
    name = "decoder" if is_decoder else "encoder"
    blocks = "up_blocks" if is_decoder else "down_blocks"
    for attr in ("conv_in", "mid_block", blocks, "conv_norm_out", "conv_out"):
        if not hasattr(net, attr):
            raise TypeError(
                f"{name} must be a diffusers AutoencoderKL {name} (vae.{name}); it has no {attr!r}"
            )
    if not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise TypeError(
            f"the release's tiled VAE supports GroupNorm only; vae.{name}.conv_norm_out is {type(net.conv_norm_out).__name__}"
        )


@torch.no_grad()
def _release_tiled_forward(net: nn.Module, x: Tensor, tile_size: int, is_decoder: bool) -> Tensor:
    name = "decoder" if is_decoder else "encoder"
    tile_size = _check_tile_size(tile_size, f"vae_{name}_tiled_size")
    if x.ndim != 4:
        raise ValueError(f"{name} input must be B×C×H×W, got shape {tuple(x.shape)}")
    _check_module(net, is_decoder)
    n, _, h, w = x.shape
    if not release_vae_tiling_applies(h, w, tile_size, is_decoder):
        return net(x)
    tiles = release_vae_tiles(h, w, tile_size, is_decoder)
    ts = _ReleaseTileSet([x[:, :, t.window[0] : t.window[1], t.window[2] : t.window[3]] for t in tiles])
    (_run_decoder if is_decoder else _run_encoder)(ts, net)
    out_h, out_w = _scale(h, is_decoder), _scale(w, is_decoder)
    # Default dtype, not the input's: the release allocates its result with a bare torch.zeros.
    result = torch.zeros((n, ts.tiles[0].shape[1], out_h, out_w), device=x.device)
    for tile, out in zip(tiles, ts.tiles, strict=True):
        wy0, wy1, wx0, wx1 = (_scale(v, is_decoder) for v in tile.window)
        ty0, ty1, tx0, tx1 = tile.target
        # Offsets of the target region inside the tile's output; the end offsets are ≤ 0.
        core = out[:, :, ty0 - wy0 : out.shape[2] + ty1 - wy1, tx0 - wx0 : out.shape[3] + tx1 - wx1]
        if core.shape[-2:] != (ty1 - ty0, tx1 - tx0):
            # Only the encoder gets here: a tile edge off the 8-px grid. The release fails too.
            raise ValueError(
                f"vae_{name}_tiled_size={tile_size} splits this {h}×{w} input at offsets that are not "
                "multiples of 8, so the tiles' outputs do not line up (the release fails here too); "
                "use a tile size that is a multiple of 32"
            )
        result[:, :, ty0:ty1, tx0:tx1] = core
    return result


def release_tiled_encoder_forward(
    encoder: nn.Module, x: Tensor, tile_size: int = RELEASE_ENCODER_TILE
) -> Tensor:
    """Replaces ``vae.encoder(x)`` as the release runs it: B×3×H×W image → B×2C×H/8×W/8 moments.

    ``tile_size`` is the release's ``vae_encoder_tiled_size`` in image px (default 1024). Below the
    trigger (:func:`release_vae_tiling_applies`) this is exactly ``encoder(x)``. Call it instead of
    ``vae.encoder(x)`` (then ``vae.quant_conv``); do not install it as ``encoder.forward``, since the
    untiled case calls ``encoder(x)``.
    """
    return _release_tiled_forward(encoder, x, tile_size, is_decoder=False)


def release_tiled_decoder_forward(
    decoder: nn.Module, z: Tensor, tile_size: int = RELEASE_DECODER_TILE
) -> Tensor:
    """Replaces ``vae.decoder(z)`` as the release runs it: ``z`` is the ``post_quant_conv`` output.

    ``tile_size`` is the release's ``vae_decoder_tiled_size`` in *latent* px (default 224). Below
    the trigger this is exactly ``decoder(z)``.
    """
    return _release_tiled_forward(decoder, z, tile_size, is_decoder=True)

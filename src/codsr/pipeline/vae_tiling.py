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

Memory: by default the activations of one layer for all tiles are held at once (about twice one
full-size activation), while convolution work buffers are per tile. With ``offload="cpu"`` (for
GPU runs) or ``offload="disk"`` the idle tiles wait in host memory or in temporary files instead,
and each GroupNorm's statistics are accumulated per tile as the tiles are produced (per-channel
mean and sum of squared deviations, merged exactly in float64), so only one tile's working set is
on the compute device at a time: the peak no longer grows with the image (docs/memory.md). The
stock diffusers blocks are used; only the order of their sub-module calls is driven from here.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from codsr.hostmem import release_host_memory
from codsr.pipeline.group_norm import Moments, channel_moments, group_normalize, merge_group_moments

# Receptive-field radius of the tiled parts of the SD VAE, rounded up: encoder conv_in + down
# blocks ≈ 75 input px (kept a multiple of 8 for stride alignment); decoder up blocks + conv_out
# ≈ 12.3 latent px.
ENCODER_HALO = 80
DECODER_HALO = 13
OFFLOAD_MODES = ("cpu", "disk")


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
    units, core_units = length // align, core // align
    n = math.ceil(units / core_units)
    # Windows fit the cores of the even split, not the requested tile: a 256-px axis with 224-px
    # tiles gets two 128-px cores and 154-px windows instead of two 250-px windows (that would
    # compute and hold almost twice the axis).
    window = math.ceil(units / n) * align + 2 * halo
    if n <= 1 or length <= window:
        return length, [AxisWindow(0, 0, length)]
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


def _activate(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``act(y)`` for a freshly normalised ``y``: SiLU in place (no second full-size tensor)."""
    return F.silu(y, inplace=True) if type(act) is nn.SiLU else act(y)


def _residual(x: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
    """A resnet's ``(x + h) / scale`` into the fresh ``h`` (conv output), dividing only when scale ≠ 1."""
    h = h.add_(x)
    return h if scale == 1 else h.div_(scale)


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
        """Per-(sample, group) mean and biased variance over all tile cores (float32)."""
        return merge_group_moments([channel_moments(self._core(i, x)) for i, x in enumerate(xs)], norm.num_groups)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for i, t in enumerate(self.tiles):
            self.tiles[i] = fn(t)

    def norm_act(self, norm: nn.GroupNorm, act: nn.Module, then: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """tiles ← then(act(GroupNorm_pooled(tiles)))."""
        mean, var = self._group_stats(self.tiles, norm)
        self.map(lambda t: then(_activate(act, group_normalize(t, norm, mean, var))))

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
            h = block.conv2(block.dropout(_activate(block.nonlinearity, group_normalize(hidden[i], block.norm2, mean, var))))
            hidden[i] = None
            x = inputs[i]
            inputs[i] = None
            if block.conv_shortcut is not None:
                x = block.conv_shortcut(x)
            out.append(_residual(x, h, block.output_scale_factor))
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


class TileStore:
    """Where idle tiles wait between layers: kept as they are (the base class), in host memory, or on disk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._items: dict[Hashable, torch.Tensor] = {}

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        self._items[key] = t

    def get(self, key: Hashable) -> torch.Tensor:
        return self._items[key]

    def pop(self, key: Hashable) -> torch.Tensor:
        t = self.get(key)
        self._discard(key)
        return t

    def _discard(self, key: Hashable) -> None:
        del self._items[key]

    def close(self) -> None:
        self._items.clear()


class HostTileStore(TileStore):
    """Idle tiles in host (CPU) memory; on a CPU run this saves nothing."""

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        self._items[key] = t.to("cpu")

    def get(self, key: Hashable) -> torch.Tensor:
        return self._items[key].to(self.device)


class DiskTileStore(TileStore):
    """Idle tiles in raw files of a private temporary folder (removed on :meth:`close`).

    Files are written and read with plain I/O (not memory-mapped), so a parked tile costs no
    process memory; the kernel's page cache may still hold it, reclaimably.
    """

    def __init__(self, device: torch.device, directory: str | os.PathLike | None = None) -> None:
        super().__init__(device)
        self.directory = tempfile.mkdtemp(prefix="codsr-vae-tiles-", dir=directory)
        self._meta: dict[Hashable, tuple[str, torch.Size, torch.dtype, bool]] = {}
        self._count = 0

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        path = os.path.join(self.directory, f"{self._count}.bin")
        self._count += 1
        t = t.detach().to("cpu")
        # Channels-last tiles are written in their own layout (B×H×W×C, no copy) and come back
        # channels-last, so the next convolution gets the layout it runs fastest in.
        channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        raw = t.permute(0, 2, 3, 1) if channels_last else t
        # A byte view handles dtypes numpy lacks (bfloat16).
        raw.contiguous().view(torch.uint8).numpy().tofile(path)
        self._meta[key] = (path, t.shape, t.dtype, channels_last)

    def get(self, key: Hashable) -> torch.Tensor:
        path, shape, dtype, channels_last = self._meta[key]
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype)
        if channels_last:
            b, c, h, w = shape
            return raw.view(b, h, w, c).permute(0, 3, 1, 2).to(self.device)
        return raw.view(shape).to(self.device)

    def _discard(self, key: Hashable) -> None:
        path = self._meta.pop(key)[0]
        os.remove(path)

    def close(self) -> None:
        self._meta.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def make_tile_store(offload: str | None, device: torch.device, directory: str | os.PathLike | None = None) -> TileStore:
    """The store for ``offload`` = ``None`` (tiles stay where they are), ``"cpu"`` or ``"disk"``."""
    if offload is None:
        return TileStore(device)
    if offload == "cpu":
        return HostTileStore(device)
    if offload == "disk":
        return DiskTileStore(device, directory)
    raise ValueError(f"VAE tile offload must be None, 'cpu' or 'disk', got {offload!r}")


class _StreamingRunner(_TiledRunner):
    """Like :class:`_TiledRunner`, but idle tiles live in a :class:`TileStore` and GroupNorm
    statistics are accumulated per tile when it is produced, so one tile is processed at a time.

    Statistics are merged with the parallel-variance formula (Chan et al.) in float64:
    mean = Σ nᵢ·μᵢ / N, M2 = Σ (M2ᵢ + nᵢ·(μᵢ − mean)²), which equals the pooled two-pass
    statistics of :class:`_TiledRunner` up to float rounding.
    """

    def __init__(self, tiles: list[torch.Tensor], layout: list[Tile], window_hw: tuple[int, int], store: TileStore) -> None:
        super().__init__([], layout, window_hw)
        self.store = store
        self.n = len(tiles)
        self._generation = 0
        self.dtype = tiles[0].dtype
        self.stats: list[Moments] = []
        for i, t in enumerate(tiles):
            self._put(i, t)

    def _key(self, i: int, generation: int | None = None) -> tuple[int, int]:
        return (self._generation if generation is None else generation, i)

    def _put(self, i: int, t: torch.Tensor, generation: int | None = None) -> None:
        self.dtype = t.dtype
        st = self._channel_stats(i, t)
        gen = self._generation if generation is None else generation
        if gen == self._generation:
            if i < len(self.stats):
                self.stats[i] = st
            else:
                self.stats.append(st)
        self.store.put(self._key(i, gen), t)

    def _channel_stats(self, i: int, t: torch.Tensor) -> Moments:
        return channel_moments(self._core(i, t))

    def _group_stats(self, xs: list, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return merge_group_moments(self.stats, norm.num_groups)

    def _tile_done(self) -> None:
        # On the CPU, glibc keeps freed tile-sized blocks in its heap and the heap fragments across
        # tiles of different layers; returning free memory after every tile keeps the process at
        # one tile's working set (measured: 3-4× lower peak RSS, docs/memory.md).
        if self.store.device.type == "cpu":
            release_host_memory()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        old = self._generation
        self._generation += 1
        for i in range(self.n):
            self._put(i, fn(self.store.pop(self._key(i, old))))
            self._tile_done()

    def norm_act(self, norm: nn.GroupNorm, act: nn.Module, then: Callable[[torch.Tensor], torch.Tensor]) -> None:
        mean, var = self._group_stats([], norm)
        self.map(lambda t: then(_activate(act, group_normalize(t, norm, mean, var))))

    def resnet(self, block: nn.Module) -> None:
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise NotImplementedError("tiled VAE: resnet blocks with internal resampling are not supported")
        inputs = self._generation
        hidden = inputs + 1
        out = inputs + 2
        mean, var = self._group_stats([], block.norm1)
        self._generation = hidden
        for i in range(self.n):
            x = self.store.get(self._key(i, inputs))
            self._put(i, block.conv1(_activate(block.nonlinearity, group_normalize(x, block.norm1, mean, var))))
            del x
            self._tile_done()
        mean, var = self._group_stats([], block.norm2)
        self._generation = out
        for i in range(self.n):
            h = self.store.pop(self._key(i, hidden))
            h = block.conv2(block.dropout(_activate(block.nonlinearity, group_normalize(h, block.norm2, mean, var))))
            x = self.store.pop(self._key(i, inputs))
            if block.conv_shortcut is not None:
                x = block.conv_shortcut(x)
            self._put(i, _residual(x, h, block.output_scale_factor))
            del x, h
            self._tile_done()

    def take(self, i: int) -> torch.Tensor:
        return self.store.pop(self._key(i))


def _split(x: torch.Tensor, core: int, halo: int, align: int) -> tuple[list[torch.Tensor], list[Tile], tuple[int, int]]:
    wh, rows = plan_axis(x.shape[-2], core, halo, align)
    ww, cols = plan_axis(x.shape[-1], core, halo, align)
    layout = [Tile(r, c) for r in rows for c in cols]
    tiles = [x[..., t.y.start : t.y.start + wh, t.x.start : t.x.start + ww] for t in layout]
    return tiles, layout, (wh, ww)


def _assemble_into(out: torch.Tensor, runner: _TiledRunner) -> None:
    """Write every tile's core into ``out`` (at the tiles' current resolution), freeing the tiles."""
    for i, tl in enumerate(runner.layout):
        t = _take_tile(runner, i)
        fy = t.shape[-2] / runner.window_hw[0]
        fx = t.shape[-1] / runner.window_hw[1]
        y0, x0 = round((tl.y.start + tl.y.core0) * fy), round((tl.x.start + tl.x.core0) * fx)
        core = runner._core(i, t)
        out[..., y0 : y0 + core.shape[-2], x0 : x0 + core.shape[-1]] = core


def _take_tile(runner: _TiledRunner, i: int) -> torch.Tensor:
    if isinstance(runner, _StreamingRunner):
        return runner.take(i)
    t = runner.tiles[i]
    runner.tiles[i] = None
    return t


def _runner(
    tiles: list[torch.Tensor],
    layout: list[Tile],
    window: tuple[int, int],
    offload: str | None,
    device: torch.device,
    offload_dir: str | os.PathLike | None,
) -> _TiledRunner:
    if offload is None:
        return _TiledRunner(tiles, layout, window)
    return _StreamingRunner(tiles, layout, window, make_tile_store(offload, device, offload_dir))


def _close(runner: _TiledRunner) -> None:
    if isinstance(runner, _StreamingRunner):
        runner.store.close()


def _tile_meta(runner: _TiledRunner) -> tuple[int, int, torch.dtype]:
    """(batch, channels, dtype) of the runner's current tiles."""
    if isinstance(runner, _StreamingRunner):
        b, c = runner.stats[0].mean.shape
        return b, c, runner.dtype
    t = runner.tiles[0]
    return t.shape[0], t.shape[1], t.dtype


def tiled_encode_moments(
    vae: nn.Module,
    x: torch.Tensor,
    tile_size: int,
    halo: int = ENCODER_HALO,
    *,
    offload: str | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``quant_conv(Encoder(x))`` with the full-resolution part tiled (``tile_size`` image px).

    ``offload``: ``None`` holds all tiles of a layer on the device; ``"cpu"``/``"disk"`` park idle
    tiles in host memory / temporary files in ``offload_dir`` (default: the system temp folder).
    """
    enc = vae.encoder
    factor = 2 ** sum(1 for b in enc.down_blocks if getattr(b, "downsamplers", None))
    tile_size = max(factor, tile_size // factor * factor)
    tiles, layout, window = _split(x, tile_size, halo, factor)
    runner = _runner(tiles, layout, window, offload, x.device, offload_dir)
    del tiles
    try:
        runner.map(enc.conv_in)
        for blk in enc.down_blocks:
            runner.block(blk)
        b, c, dtype = _tile_meta(runner)
        h = torch.empty((b, c, x.shape[-2] // factor, x.shape[-1] // factor), dtype=dtype, device=x.device)
        _assemble_into(h, runner)
    finally:
        _close(runner)
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    return vae.quant_conv(h)


def tiled_decode(
    vae: nn.Module,
    z: torch.Tensor,
    tile_size: int,
    halo: int = DECODER_HALO,
    *,
    offload: str | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``Decoder(post_quant_conv(z))`` with the up blocks tiled; ``tile_size`` in latent px.

    ``offload`` as in :func:`tiled_encode_moments`.
    """
    dec = vae.decoder
    factor = 2 ** sum(1 for b in dec.up_blocks if getattr(b, "upsamplers", None))
    h = dec.conv_in(vae.post_quant_conv(z))
    h = dec.mid_block(h, None)
    tiles, layout, window = _split(h, max(1, tile_size), halo, 1)
    device = h.device
    del h
    runner = _runner(tiles, layout, window, offload, device, offload_dir)
    del tiles
    try:
        for blk in dec.up_blocks:
            runner.block(blk)
        runner.norm_act(dec.conv_norm_out, dec.conv_act, dec.conv_out)
        b, c, dtype = _tile_meta(runner)
        out = torch.empty((b, c, z.shape[-2] * factor, z.shape[-1] * factor), dtype=dtype, device=device)
        _assemble_into(out, runner)
    finally:
        _close(runner)
    return out

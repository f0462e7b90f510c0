"""Latent (UNet) tiling with Gaussian blending (docs/method.md#inference; docs/inference.md#tiling).

The release splits the latent into T×T tiles with overlap O, runs the UNet per tile and blends the
ε predictions with Gaussian weights. By default the tiles are spread evenly
(:func:`even_tile_grid`: the release's number of tiles per axis, the smallest side that keeps the
overlap). The release's own positions (:func:`tile_grid`, last tile pinned to the border) and two
quirks of the release are reproduced only on request (``release_compat=True``): the y-centre of
the Gaussian is T/2 while the x-centre is (T−1)/2, and the blended sum is divided by
``clamp_min(Σ weights, 1e-6)``, which damps ε near image corners where the Gaussian tails are tiny. By default the weights are symmetric and the division exact.

The release also lets every tile normalise with its own GroupNorm statistics, which shifts each
tile's prediction (with a tiny random UNet, tiled vs untiled drops to ~27 dB PSNR). By default
here the tiles run as one batch and every GroupNorm of the UNet pools its statistics over the
tiles' core regions (a partition of the latent), so each tile is normalised like the whole image
(~56 dB on the same test); self-attention stays tile-local, which is what makes tiling cheap.

The batch holds every tile's activations at once, so its memory grows with the image.
:func:`sequential_pooled_noise_prediction` computes the same result (to float rounding) with the
tiles one at a time: it drives the stock UNet unit by unit (resnet, transformer, down/upsampler)
and, inside a unit, measures each GroupNorm's pooled statistics in a pass over the tiles that stops
at that GroupNorm, before the pass that applies them (resnets are split in two units before their
second GroupNorm, so no pass recomputes anything). Idle tiles (the current activation and the
skip connections) wait in a tile store (on the device, in host memory or on disk, as the tiled
VAE's), so the device holds one tile's working set (docs/benchmarks.md#bounded-unet-tiling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from codsr.pipeline.group_norm import Moments, channel_moments, group_normalize, merge_group_moments
from codsr.pipeline.vae_tiling import TileStore, make_tile_store

GAUSSIAN_VAR = 0.01
# SD 2.1's UNet halves the latent three times: tiles of a multiple of 8 keep every level even.
UNET_ALIGN = 8
_RELEASE_MIN_CONTRIBUTION = 1e-6


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: multiples of (tile − overlap), the last pinned to the border."""
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"latent tile overlap ({overlap}) must be smaller than the tile size ({tile})")
    n = max(1, (size - overlap + stride - 1) // stride)
    return [i * stride if i < n - 1 else size - tile for i in range(n)]


def tile_grid(h: int, w: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int]]]:
    """(T', offsets): square tiles of side T' = min(tile, h, w) in row-major (y, x) order."""
    t = min(tile, h, w)
    return t, [(y, x) for y in tile_starts(h, t, overlap) for x in tile_starts(w, t, overlap)]


def even_tile_grid(
    h: int, w: int, tile: int, overlap: int, align: int = UNET_ALIGN
) -> tuple[int, list[tuple[int, int]]]:
    """(T', offsets) of the default layout: per axis as many tiles as :func:`tile_grid` (the fewest
    of side ≤ ``tile`` that overlap by ≥ ``overlap``), evenly spread, with the smallest common side
    T' that keeps every overlap ≥ ``overlap``, rounded up to a multiple of ``align`` (capped at
    min(``tile``, h, w)) so the UNet's down/upsamplers see even sizes at every level. The release
    pins its last tile to the border, where it can overlap its neighbour almost entirely: a 256-px
    latent with tiles of 150 and overlap 50 gets tiles at 0, 100, 106 there, and 3 tiles of 120 px
    at 0, 68, 136 here (1.6× fewer pixels through the UNet). Row-major (y, x) order."""
    t = min(tile, h, w)
    counts = [len(tile_starts(n, t, overlap)) for n in (h, w)]
    side = max(n if k == 1 else -(-(n + (k - 1) * overlap) // k) for n, k in zip((h, w), counts, strict=True))
    side = min(t, -(-side // align) * align)  # side ≤ t: the counts come from tiles of t

    def spread(n: int, k: int) -> list[int]:
        return [0] if k == 1 else [round(i * (n - side) / (k - 1)) for i in range(k)]

    return side, [(y, x) for y in spread(h, counts[0]) for x in spread(w, counts[1])]


def gaussian_tile_weights(tile: int, release_compat: bool = False) -> torch.Tensor:
    """T×T blending weights (float64 maths, float32 result) as in the release's ``_gaussian_weights``."""
    coords = np.arange(tile, dtype=np.float64)

    def g(centre: float) -> np.ndarray:
        return np.exp(-((coords - centre) ** 2) / (tile * tile) / (2 * GAUSSIAN_VAR)) / math.sqrt(
            2 * math.pi * GAUSSIAN_VAR
        )

    gx = g((tile - 1) / 2)
    gy = g(tile / 2) if release_compat else gx
    return torch.from_numpy(np.outer(gy, gx)).float()


def tiled_noise_prediction(
    predict: Callable[[slice, slice], torch.Tensor],
    latent_shape: tuple[int, ...],
    tile: int,
    overlap: int,
    release_compat: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Blend per-tile ε predictions at the release's tile positions (:func:`tile_grid`) into a full
    B×C×h×w prediction (float32): the ``release_compat=True`` path.

    ``predict(ys, xs)`` returns the UNet output for the latent window ``[..., ys, xs]``; the caller
    slices its own inputs (noisy latent, SFT maps) so nothing here knows about the model.
    Tiling happens only when h·w > tile² (the release's rule); otherwise ``predict`` is called once.
    """
    h, w = latent_shape[-2:]
    if h * w <= tile * tile:
        return predict(slice(0, h), slice(0, w)).float()
    t, offsets = tile_grid(h, w, tile, overlap)
    weights = gaussian_tile_weights(t, release_compat).to(device)
    acc = torch.zeros(latent_shape, dtype=torch.float32, device=device)
    contributors = torch.zeros(latent_shape, dtype=torch.float32, device=device)
    for y, x in offsets:
        ys, xs = slice(y, y + t), slice(x, x + t)
        out = predict(ys, xs).float()
        acc[..., ys, xs] += out * weights
        contributors[..., ys, xs] += weights
    if release_compat:
        return acc / contributors.clamp_min(_RELEASE_MIN_CONTRIBUTION)
    return acc / contributors


def tile_cores(size: int, tile: int, starts: list[int]) -> list[tuple[int, int]]:
    """Core interval of each tile along one axis: overlaps are split at their midpoints, so the
    cores partition ``[0, size)`` and each lies inside its tile."""
    bounds = [0] + [(starts[i - 1] + tile + starts[i]) // 2 for i in range(1, len(starts))] + [size]
    return [(bounds[i] - starts[i], bounds[i + 1] - starts[i]) for i in range(len(starts))]


def core_weights(h: int, w: int, tile: int, overlap: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """(offsets, n×1×T×T indicator of each tile's core), in the order of :func:`even_tile_grid`."""
    t, offsets = even_tile_grid(h, w, tile, overlap)
    ys, xs = sorted({y for y, _ in offsets}), sorted({x for _, x in offsets})
    cy, cx = tile_cores(h, t, ys), tile_cores(w, t, xs)
    masks = []
    for y0, y1 in cy:
        for x0, x1 in cx:
            m = torch.zeros(1, t, t)
            m[:, y0:y1, x0:x1] = 1.0
            masks.append(m)
    return offsets, torch.stack(masks)


@contextmanager
def pooled_group_norm(module: nn.Module, weights: torch.Tensor, batch: int) -> Iterator[None]:
    """Within the block, every ``nn.GroupNorm`` in ``module`` treats its input as ``n`` tiles × ``batch``
    images (tile-major) and normalises with per-image statistics pooled over the tiles, each pixel
    weighted by ``weights`` (n×1×T×T at the first resolution, area-resized for lower ones)."""
    cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
    n = weights.shape[0]

    def weight_at(h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        if key not in cache:
            wt = weights if weights.shape[-2:] == (h, w) else F.interpolate(weights, size=(h, w), mode="area")
            cache[key] = wt.to(device=device, dtype=torch.float32).view(n, 1, 1, 1, h, w)
        return cache[key]

    def forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        nb, c, h, w = x.shape
        g = norm.num_groups
        xt = x.float().view(n, nb // n, g, c // g, h, w)
        wt = weight_at(h, w, x.device)
        count = wt.sum() * (c // g)
        mean = (xt * wt).sum(dim=(0, 3, 4, 5), keepdim=True) / count
        var = ((xt - mean).pow(2) * wt).sum(dim=(0, 3, 4, 5), keepdim=True) / count
        y = ((xt - mean) * torch.rsqrt(var + norm.eps)).view(nb, c, h, w)
        if norm.affine:
            y = y * norm.weight.float().view(1, c, 1, 1) + norm.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)

    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.forward = lambda x, m=m: forward(m, x)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def batched_noise_prediction(
    predict_batch: Callable[[list[tuple[slice, slice]]], torch.Tensor],
    latent_shape: tuple[int, ...],
    tile: int,
    overlap: int,
    unet: nn.Module,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Tiled ε prediction with all tiles in one UNet batch and GroupNorm statistics pooled across them.

    ``predict_batch(windows)`` returns the UNet output for the stacked windows, tile-major
    (``len(windows)·B × C × T × T``). Blending: symmetric Gaussian weights, exact division.
    """
    b, h, w = latent_shape[0], latent_shape[-2], latent_shape[-1]
    if h * w <= tile * tile:
        return predict_batch([(slice(0, h), slice(0, w))]).float()
    offsets, cores = core_weights(h, w, tile, overlap)
    t = cores.shape[-1]
    windows = [(slice(y, y + t), slice(x, x + t)) for y, x in offsets]
    with pooled_group_norm(unet, cores, b):
        outs = predict_batch(windows).float()
    weights = gaussian_tile_weights(t).to(device)
    acc = torch.zeros(latent_shape, dtype=torch.float32, device=device)
    contributors = torch.zeros(latent_shape, dtype=torch.float32, device=device)
    for i, (ys, xs) in enumerate(windows):
        acc[..., ys, xs] += outs[i * b : (i + 1) * b] * weights
        contributors[..., ys, xs] += weights
    return acc / contributors


# ---------------------------------------------------------------------------------------------
# UNet tiles one at a time with the batched variant's pooled GroupNorm statistics
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a measuring pass at the GroupNorm being measured."""


_SUPPORTED_BLOCKS = {
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
}  # fmt: skip


def _check_unet(unet: nn.Module) -> None:
    cfg = unet.config
    unsupported = [
        k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
        if cfg.get(k) is not None
    ]  # fmt: skip
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    unsupported += [type(b).__name__ for b in blocks if type(b).__name__ not in _SUPPORTED_BLOCKS]
    unsupported += ["FreeU"] * any(getattr(b, "s1", None) is not None for b in unet.up_blocks)
    if cfg.get("center_input_sample") or unsupported:
        raise NotImplementedError(
            f"sequential pooled UNet tiling drives SD-style UNets only; this one has {unsupported or 'centering'}. "
            "Use the batched UNet tiling (TilePlan(sequential_unet=False))"
        )


def _halvable(block: nn.Module) -> bool:
    """Whether ``block`` is a plain diffusers ``ResnetBlock2D`` (no resampling, temb added before
    norm2), whose forward the sequential tiles can run in two halves."""
    return (
        type(block) is ResnetBlock2D and block.upsample is None and block.downsample is None
        and block.time_embedding_norm == "default" and not block.skip_time_act
    )  # fmt: skip


class _PooledStreamer:
    """Runs stock UNet units tile by tile with GroupNorm statistics pooled over the tiles' cores.

    ``weights`` (n×1×T×T) are the batched variant's core indicators, area-resized per resolution
    exactly as :func:`pooled_group_norm` does, so the statistics are the same weighted sums: per
    tile, per channel, weight sum, weighted mean and M2, merged in float64
    (:mod:`codsr.pipeline.group_norm`).
    """

    def __init__(self, weights: torch.Tensor, store: TileStore) -> None:
        self.weights = weights
        self.n = weights.shape[0]
        self.store = store
        self.current = 0
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._count = 0

    def new_key(self) -> str:
        self._count += 1
        return f"a{self._count}"

    def weight(self, i: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (i, h, w)
        if key not in self._cache:
            wt = (
                self.weights
                if self.weights.shape[-2:] == (h, w)
                else F.interpolate(self.weights, (h, w), mode="area")
            )
            self._cache.update({(j, h, w): wt[j : j + 1] for j in range(self.n)})
        return self._cache[key].to(device=device, dtype=torch.float32).view(1, 1, h, w)

    def unit(self, module: nn.Module | None, fn: Callable[[int], torch.Tensor]) -> str:
        """Run ``fn(i)`` (one stock unit on tile i, reading the store) for every tile with every
        GroupNorm in ``module`` pooled; store the outputs under a new key and return it."""
        norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)] if module is not None else []
        fixed: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        measuring: list[nn.Module] = []
        acc: list[Moments] = []

        def forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
            if norm in fixed:
                return group_normalize(x, norm, *fixed[norm])
            if measuring and measuring[0] is not norm:
                raise RuntimeError("tiles reached different GroupNorms first: the UNet is not tile-uniform")
            measuring[:] = [norm]
            acc.append(channel_moments(x, self.weight(self.current, *x.shape[-2:], x.device)))
            raise _Stop

        for m in norms:
            m.forward = lambda x, m=m: forward(m, x)  # instance attribute shadows the class method
        try:
            while True:  # one measuring pass per GroupNorm, in the order the unit reaches them
                measuring.clear()
                acc.clear()
                key = self.new_key()
                for i in range(self.n):
                    self.current = i
                    try:
                        y = fn(i)
                    except _Stop:
                        continue
                    if measuring:
                        raise RuntimeError("a tile finished while another stopped at a GroupNorm")
                    self.store.put((key, i), y)
                    del y
                if not measuring:
                    return key
                if len(acc) != self.n:
                    raise RuntimeError("not every tile reached the GroupNorm being measured")
                fixed[measuring[0]] = merge_group_moments(acc, measuring[0].num_groups)
        finally:
            for m in norms:
                del m.forward

    def drop(self, key: str) -> None:
        for i in range(self.n):
            self.store.pop((key, i))

    def get(self, key: str, i: int) -> torch.Tensor:
        return self.store.get((key, i))


def sequential_pooled_noise_prediction(
    unet: nn.Module,
    conv_in: Callable[[slice, slice], torch.Tensor],
    latent_shape: tuple[int, ...],
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    tile: int,
    overlap: int,
    *,
    offload: str | None = None,
    offload_dir: str | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The result of :func:`batched_noise_prediction` (to float rounding) with one tile at a time.

    ``conv_in(ys, xs)``: the UNet's (LQFM-modulated) ``conv_in`` output for the latent window
    ``[..., ys, xs]``; the rest of the stock UNet (time embedding, down/mid/up blocks with their
    resnets, transformers and resamplers, output head) is driven here unit by unit, each unit
    called per tile. Every GroupNorm is normalised with the statistics pooled over all tiles'
    cores, measured by a pass that stops at it. Plain ``ResnetBlock2D``s run as two units split
    before norm2 (its input kept in the store), so every GroupNorm is the first operation of its
    unit and measuring recomputes nothing. Self-attention stays tile-local. ``offload``: ``None``
    keeps idle tiles on the device (the current activation and the skip connections of all tiles:
    a few full-latent activations, far below the batch), ``"cpu"`` / ``"disk"`` park them in host
    memory / temporary files so only one tile's working set is on the device.
    Untiled (h·w ≤ tile²) it runs the same driver on one window.
    """
    _check_unet(unet)
    b, h, w = latent_shape[0], latent_shape[-2], latent_shape[-1]
    tiled = h * w > tile * tile
    offsets, cores = core_weights(h, w, tile, overlap) if tiled else ([(0, 0)], torch.ones(1, 1, h, w))
    th, tw = cores.shape[-2:]
    windows = [(slice(y, y + th), slice(x, x + tw)) for y, x in offsets]
    device = torch.device(device)
    store = make_tile_store(offload, device, offload_dir)
    s = _PooledStreamer(cores, store)
    dtype = unet.dtype
    ehs = encoder_hidden_states.to(dtype)
    try:
        t_emb = unet.get_time_embed(
            sample=torch.empty(b, 1, 1, 1, dtype=dtype, device=device), timestep=timesteps
        )
        emb = unet.time_embedding(t_emb, None)
        if getattr(unet, "time_embed_act", None) is not None:
            emb = unet.time_embed_act(emb)
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = th % up_factor != 0 or tw % up_factor != 0

        def resnet(block: nn.Module, key: str, skip: str | None = None) -> str:
            def inputs(i: int) -> torch.Tensor:
                x = s.get(key, i)
                return x if skip is None else torch.cat([x, s.get(skip, i)], dim=1)

            if not _halvable(block):
                return s.unit(block, lambda i: block(inputs(i), emb))
            # ResnetBlock2D.forward in two units split before norm2, the intermediate kept in the
            # store: measuring norm2 then reads it instead of running norm1 → conv1 again per tile.
            temb = None
            if block.time_emb_proj is not None:
                temb = block.time_emb_proj(block.nonlinearity(emb))[:, :, None, None]

            def first(i: int) -> torch.Tensor:
                h = block.conv1(block.nonlinearity(block.norm1(inputs(i))))
                return h if temb is None else h + temb

            def second(i: int) -> torch.Tensor:
                h = block.conv2(block.dropout(block.nonlinearity(block.norm2(s.get(hidden, i)))))
                x = inputs(i)
                if block.conv_shortcut is not None:
                    x = block.conv_shortcut(x)
                return (x + h) / block.output_scale_factor

            hidden = s.unit(nn.ModuleList([block.norm1]), first)
            out = s.unit(nn.ModuleList([block.norm2]), second)
            s.drop(hidden)
            return out

        def attn(block: nn.Module, key: str) -> str:
            return s.unit(
                block, lambda i: block(s.get(key, i), encoder_hidden_states=ehs, return_dict=False)[0]
            )

        def plain(
            fn: Callable[[torch.Tensor], torch.Tensor], key: str, module: nn.Module | None = None
        ) -> str:
            return s.unit(module, lambda i: fn(s.get(key, i)))

        cur = s.unit(None, lambda i: conv_in(*windows[i]))
        skips: list[str] = [cur]
        keep: set[str] = {cur}
        for blk in unet.down_blocks:
            attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
            for r, a in zip(blk.resnets, attns, strict=True):
                nxt = resnet(r, cur)
                if cur not in keep:
                    s.drop(cur)
                cur = nxt
                if a is not None:
                    nxt = attn(a, cur)
                    s.drop(cur)
                    cur = nxt
                skips.append(cur)
                keep.add(cur)
            for d in blk.downsamplers or []:
                cur = plain(d, cur)
                skips.append(cur)
                keep.add(cur)
        mid = unet.mid_block
        nxt = resnet(mid.resnets[0], cur)
        cur = nxt
        for a, r in zip(mid.attentions, mid.resnets[1:], strict=True):
            nxt = attn(a, cur)
            s.drop(cur)
            nxt2 = resnet(r, nxt)
            s.drop(nxt)
            cur = nxt2
        for bi, blk in enumerate(unet.up_blocks):
            upsample_size = None
            attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
            for r, a in zip(blk.resnets, attns, strict=True):
                skip = skips.pop()
                nxt = resnet(r, cur, skip)
                if cur not in keep:
                    s.drop(cur)
                s.drop(skip)
                keep.discard(skip)
                cur = nxt
                if a is not None:
                    nxt = attn(a, cur)
                    s.drop(cur)
                    cur = nxt
            if blk.upsamplers:
                if bi < len(unet.up_blocks) - 1 and forward_upsample_size:
                    upsample_size = s.get(skips[-1], 0).shape[2:]
                for u in blk.upsamplers:
                    nxt = plain(lambda x, u=u, size=upsample_size: u(x, size), cur)
                    s.drop(cur)
                    cur = nxt
        if unet.conv_norm_out is not None:
            head = nn.ModuleList([unet.conv_norm_out])
            nxt = plain(lambda x: unet.conv_out(unet.conv_act(unet.conv_norm_out(x))), cur, head)
        else:
            nxt = plain(unet.conv_out, cur)
        s.drop(cur)
        cur = nxt
        if not tiled:
            return s.store.pop((cur, 0)).float()
        weights = gaussian_tile_weights(th).to(device)
        acc = torch.zeros(latent_shape, dtype=torch.float32, device=device)
        contributors = torch.zeros(latent_shape, dtype=torch.float32, device=device)
        for i, (ys, xs) in enumerate(windows):
            acc[..., ys, xs] += s.store.pop((cur, i)).float() * weights
            contributors[..., ys, xs] += weights
        return acc / contributors
    finally:
        store.close()

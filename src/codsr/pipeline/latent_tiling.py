"""Latent (UNet) tiling with Gaussian blending (docs/method.md#inference; docs/inference.md#tiling).

The release splits the latent into T×T tiles with overlap O, runs the UNet per tile and blends the
ε predictions with Gaussian weights. Two quirks of the release are reproduced only on request
(``release_compat=True``): the y-centre of the Gaussian is T/2 while the x-centre is (T−1)/2, and
the blended sum is divided by ``clamp_min(Σ weights, 1e-6)``, which damps ε near image corners
where the Gaussian tails are tiny. By default the weights are symmetric and the division exact.

The release also lets every tile normalise with its own GroupNorm statistics, which shifts each
tile's prediction (with a tiny random UNet, tiled vs untiled drops to ~27 dB PSNR). By default
here the tiles run as one batch and every GroupNorm of the UNet pools its statistics over the
tiles' core regions (a partition of the latent), so each tile is normalised like the whole image
(~56 dB on the same test); self-attention stays tile-local, which is what makes tiling cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

GAUSSIAN_VAR = 0.01
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
    """Blend per-tile ε predictions into a full B×C×h×w prediction (float32).

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
    """(offsets, n×1×T×T indicator of each tile's core), in the order of :func:`tile_grid`."""
    t, offsets = tile_grid(h, w, tile, overlap)
    ys, xs = tile_starts(h, t, overlap), tile_starts(w, t, overlap)
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

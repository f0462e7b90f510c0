"""Latent (UNet) tiling with Gaussian blending (SPEC §7).

The release splits the latent into T×T tiles with overlap O, runs the UNet per tile and blends the
ε predictions with Gaussian weights. Two quirks of the release are reproduced only on request
(``release_compat=True``): the y-centre of the Gaussian is T/2 while the x-centre is (T−1)/2, and
the blended sum is divided by ``clamp_min(Σ weights, 1e-6)``, which damps ε near image corners
where the Gaussian tails are tiny. By default the weights are symmetric and the division exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

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

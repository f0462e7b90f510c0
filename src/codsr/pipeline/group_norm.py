"""GroupNorm with statistics pooled over tiles: per-tile moments, their exact merge, the normalisation.

The exact tiled VAE (:mod:`~codsr.pipeline.vae_tiling`) and the sequential UNet tiles
(:mod:`~codsr.pipeline.latent_tiling`) normalise every tile with the statistics of the whole image
(docs/method.md#inference). They share the maths here:

* :func:`channel_moments` reads one tile (optionally weighted per pixel) in row slices of
  :data:`CHUNK_ELEMENTS` float32 elements and returns per-(sample, channel) count, mean and
  M2 = Σ w·(x − mean)², the slices merged in float64. On the CPU the slices stay below glibc's mmap
  threshold, so their float32 temporaries come from reused heap memory instead of fresh pages (a
  whole-tile float copy cost one page fault per 4 KiB: docs/benchmarks.md#cpu-speed).
* :func:`merge_group_moments` merges moments of several tiles into per-(sample, group) mean and
  biased variance with the parallel-variance formula (Chan et al.) in float64:
  mean = Σ nᵢ·μᵢ / N, M2 = Σ (M2ᵢ + nᵢ·(μᵢ − mean)²), equal to the two-pass statistics of the
  concatenated tiles up to float rounding.
* :func:`group_normalize` applies given group statistics with the affine parameters as one
  per-channel scale and shift (``F.batch_norm`` in inference mode, float32 parameters): one pass in
  the input's dtype and memory layout (channels-last stays channels-last), as stock GroupNorm does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CHUNK_ELEMENTS", "Moments", "channel_moments", "group_normalize", "merge_group_moments"]

# float32 elements per row slice on the CPU: 512 KiB, below glibc's 1 MiB mmap threshold
# (codsr.hostmem.HEAP_MMAP_THRESHOLD). Elsewhere slices of 2**24 elements bound the temporaries.
CHUNK_ELEMENTS = 1 << 17
_DEVICE_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Moments:
    """Per-(sample, channel) moments of one tile: ``count`` (sum of weights, a 0-d float64 tensor,
    the same for every channel), ``mean`` and ``m2`` (B×C float64)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 statistics can live: ``device`` itself, or the CPU for MPS (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device


def _merge(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor, dims: tuple[int, ...]):
    """Chan et al.'s merge over ``dims`` of K parts: counts broadcastable to means (float64)."""
    n = counts.expand_as(means)
    total = n.sum(dim=dims)
    mean = (n * means).sum(dim=dims) / total
    shape = list(means.shape)
    for d in dims:
        shape[d] = 1
    m2 = (m2s + n * (means - mean.view(shape)).pow(2)).sum(dim=dims)
    return total, mean, m2


def channel_moments(x: torch.Tensor, weight: torch.Tensor | None = None) -> Moments:
    """Moments of ``x`` (B×C×H×W, any dtype and layout), each pixel weighted by ``weight``
    (1×1×H×W, non-negative) or by 1. Row slices of about :data:`CHUNK_ELEMENTS` float32 elements
    (two-pass within a slice), merged in float64."""
    b, c, h, w = x.shape
    limit = CHUNK_ELEMENTS if x.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    rows = max(1, limit // max(1, b * c * w))
    merge_device = _float64_device(x.device)
    counts, means, m2s = [], [], []
    for r0 in range(0, h, rows):
        xf = x[:, :, r0 : r0 + rows].float()
        if weight is None:
            var, mu = torch.var_mean(xf, dim=(2, 3), correction=0)
            n = torch.tensor(float(xf.shape[2] * xf.shape[3]), dtype=torch.float32, device=x.device)
            m2 = var * n
        else:
            wk = weight[..., r0 : r0 + rows, :].to(torch.float32)
            n = wk.sum()
            # Slices with no weight contribute nothing (clamp avoids 0/0; their n is 0 in the merge).
            mu = (xf * wk).sum(dim=(2, 3)) / n.clamp_min(torch.finfo(torch.float32).tiny)
            m2 = ((xf - mu[..., None, None]).pow(2) * wk).sum(dim=(2, 3))
        counts.append(n)
        means.append(mu)
        m2s.append(m2)
    count, mean, m2 = _merge(
        torch.stack(counts).to(merge_device, torch.float64).view(-1, 1, 1),
        torch.stack(means).to(merge_device, torch.float64),
        torch.stack(m2s).to(merge_device, torch.float64),
        dims=(0,),
    )
    return Moments(count[0, 0], mean, m2)


def merge_group_moments(parts: list[Moments], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and biased variance (B×G, float32) of the tiles whose
    per-channel moments are ``parts`` (on the moments' device: :func:`group_normalize` moves them)."""
    b, c = parts[0].mean.shape
    counts = torch.stack([p.count for p in parts]).view(-1, 1, 1, 1)
    means = torch.stack([p.mean for p in parts]).view(len(parts), b, groups, c // groups)
    m2s = torch.stack([p.m2 for p in parts]).view(len(parts), b, groups, c // groups)
    total, mean, m2 = _merge(counts, means, m2s, dims=(0, 3))
    return mean.float(), (m2 / total).float()


def group_normalize(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to ``x`` (B×C×H×W) with the given per-(sample, group) ``mean``/``var`` (B×G)
    instead of ``x``'s own: y = (x − mean)·rsqrt(var + eps)·γ + β, computed in float32, returned in
    ``x``'s dtype and memory layout."""
    b, c = x.shape[:2]
    cpg = c // norm.num_groups
    device = x.device
    mean = mean.to(device, torch.float32).repeat_interleave(cpg, dim=1)
    var = var.to(device, torch.float32).repeat_interleave(cpg, dim=1)
    weight = norm.weight.float() if norm.affine else None
    bias = norm.bias.float() if norm.affine else None

    def one(xi: torch.Tensor, i: int) -> torch.Tensor:
        return F.batch_norm(xi, mean[i], var[i], weight, bias, False, 0.0, norm.eps)

    if b == 1:
        return one(x, 0)
    out = torch.empty_like(x)
    for i in range(b):
        out[i : i + 1] = one(x[i : i + 1], i)
    return out

"""RGPA: region-adaptive generative prior activation (paper §3.1, Eq. 1-3; docs/method.md#rgpa).

The LQ image's Sobel gradient magnitude, averaged over 16×16 pixel patches and mapped through a
"floor + ramp" curve, weights the Gaussian noise added to the LQ latent: flat regions get little
noise (fidelity), textured regions the full amount (generative detail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as in the release.
_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class RGPAParams:
    """Constants of the weight map (docs/method.md#rgpa); exposed as advanced parameters.

    ``floor`` applies at patch means ``<= low``, ``1.0`` at means ``> high``, linear in between.
    ``patch`` is the averaging patch in image pixels; each patch covers ``patch // 8`` latent cells.
    """

    low: float = 0.15
    high: float = 0.25
    floor: float = 0.3
    patch: int = 16


DEFAULT_RGPA = RGPAParams()


def sobel_magnitude(x_l: torch.Tensor) -> torch.Tensor:
    """L1 Sobel gradient magnitude |gx| + |gy| of the BT.601 gray image of ``x_l`` ∈ [-1, 1].

    Cross-correlation with kx = [[-1,0,1],[-2,0,2],[-1,0,1]], ky = kxᵀ and replicate padding
    (docs/method.md#rgpa). Returns B×1×H×W in float32.
    """
    x = x_l.float() * 0.5 + 0.5
    gray = _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # 2×1×3×3
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads.abs().sum(dim=1, keepdim=True)


def patch_weight(p: torch.Tensor, params: RGPAParams = DEFAULT_RGPA) -> torch.Tensor:
    """Piecewise map of patch means: floor, linear ramp to 1, then 1 (UPSR-style; docs/method.md#rgpa).

    Evaluated as ``slope·(p − low) + floor`` on the ramp, the release's form, so results match it
    to the last bit (the algebraically equal ``floor + (1 − floor)·ramp`` differs by an ulp).
    """
    slope = (1.0 - params.floor) / (params.high - params.low)
    ramp = slope * (p - params.low) + params.floor
    return torch.where(p <= params.low, torch.full_like(p, params.floor), torch.where(p <= params.high, ramp, torch.ones_like(p)))


def rgpa_weight_map(
    x_l: torch.Tensor,
    params: RGPAParams = DEFAULT_RGPA,
    latent_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Noise weight map W(g_{x_L}) of paper Eq. 3, at latent resolution.

    Args:
        x_l: B×3×H×W LQ image in [-1, 1].
        params: map constants.
        latent_size: (h, w) to crop to; defaults to (H // 8, W // 8).

    Returns:
        B×1×h×w float32 weights in [floor, 1], shared over the latent channels.
    """
    if x_l.ndim != 4 or x_l.shape[1] != 3:
        raise ValueError(f"rgpa_weight_map expects B×3×H×W, got {tuple(x_l.shape)}")
    h_img, w_img = x_l.shape[-2:]
    h, w = latent_size or (h_img // 8, w_img // 8)
    grad = sobel_magnitude(x_l)
    pad_h = (-h_img) % params.patch
    pad_w = (-w_img) % params.patch
    if pad_h or pad_w:
        grad = F.pad(grad, (0, pad_w, 0, pad_h), mode="replicate")
    means = F.avg_pool2d(grad, params.patch, params.patch)
    weight = patch_weight(means, params)
    cells = params.patch // 8
    weight = weight.repeat_interleave(cells, dim=2).repeat_interleave(cells, dim=3)
    return weight[:, :, :h, :w].contiguous()

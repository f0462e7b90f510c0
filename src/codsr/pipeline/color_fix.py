"""Colour correction of the SR output towards the upsampled LQ (docs/method.md#inference; StableSR's two methods).

Both work on B×3×H×W tensors in [0, 1] and return [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS = ("adain", "wavelet", "none")


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    # Unbiased variance + eps, as the release computes it.
    return flat.mean(-1).view(b, c, 1, 1), (flat.var(-1) + eps).sqrt().view(b, c, 1, 1)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std of ``image`` to ``reference`` (AdaIN)."""
    mean_i, std_i = _mean_std(image.float())
    mean_r, std_r = _mean_std(reference.float())
    return ((image.float() - mean_i) / std_i * std_r + mean_r).clamp(0, 1)


_BLUR = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]])


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    c = x.shape[1]
    kernel = _BLUR.to(x).expand(c, 1, 3, 3)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=c, dilation=radius)


def _wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-frequency sum, low-frequency residual) of an à-trous wavelet decomposition."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``image`` + low frequencies (colour) of ``reference``."""
    high, _ = _wavelet_decompose(image.float(), levels)
    _, low = _wavelet_decompose(reference.float(), levels)
    return (high + low).clamp(0, 1)


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str | None = "adain") -> torch.Tensor:
    """Dispatch on ``method`` in {"adain", "wavelet", "none"/None}."""
    if method in (None, "none"):
        return image.clamp(0, 1)
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    raise ValueError(f"unknown color_fix {method!r}; choose one of {COLOR_FIX_METHODS}")

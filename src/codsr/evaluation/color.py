"""BT.601 luma (the "Y channel" of SR papers), computed exactly from 8-bit RGB.

docs/method.md#evaluation: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (RGB 0-255) is the
ITU-R BT.601 studio-swing luma (range [16, 235]) that MATLAB's ``rgb2ycbcr`` and pyiqa's
``color_space='ycbcr'`` produce.

The coefficients are multiples of 1/1000, so for integer RGB the value
``255000 * Y = 4080000 + 65481 R + 128553 G + 24966 B`` is an integer. We evaluate that integer
exactly and divide once: the result is the correctly rounded float64 Y with no dependence on
summation order, and rounding Y to an integer (the 8-bit Y used by SSIM) can be done with exact
ties (194 of the 2^24 colours land exactly on .5).
"""

from __future__ import annotations

import numpy as np

# 255000 * Y = _OFFSET + _R * R + _G * G + _B * B  (exact integers)
_SCALE = 255_000
_OFFSET = 16 * _SCALE
_R, _G, _B = 65_481, 128_553, 24_966


def _check_rgb_u8(rgb: np.ndarray, name: str = "image") -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        got = rgb.dtype if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise TypeError(f"{name}: expected a uint8 numpy array (H, W, 3) in RGB order, got {got}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3) RGB, got {rgb.shape}")


def _luma_numerator(rgb: np.ndarray) -> np.ndarray:
    """255000 * Y as exact int64 (max 4080000 + 218999 * 255 < 2^31)."""
    u = rgb.astype(np.int64)
    return _OFFSET + _R * u[..., 0] + _G * u[..., 1] + _B * u[..., 2]


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma Y in [16, 235] as float64, not rounded (docs/method.md#evaluation; used by PSNR).

    Args:
        rgb: uint8 array (H, W, 3), channel order R, G, B.

    Returns:
        float64 array (H, W).
    """
    _check_rgb_u8(rgb)
    return _luma_numerator(rgb) / float(_SCALE)


def rgb_to_y_u8(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma rounded to the nearest integer, ties to even, as float64 (used by SSIM).

    This is the "uint8 Y" that MATLAB-style SSIM evaluates and that pyiqa's SSIM computes with
    ``torch.round`` (round half to even) after scaling Y to [0, 255].

    Args:
        rgb: uint8 array (H, W, 3), channel order R, G, B.

    Returns:
        float64 array (H, W) holding integers in [16, 235].
    """
    _check_rgb_u8(rgb)
    num = _luma_numerator(rgb)
    q, r = np.divmod(num, _SCALE)
    half = _SCALE // 2
    round_up = (r > half) | ((r == half) & (q % 2 == 1))
    return (q + round_up).astype(np.float64)

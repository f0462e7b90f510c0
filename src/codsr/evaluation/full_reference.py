"""Full-reference fidelity metrics of the paper's Table 1: PSNR and SSIM on the BT.601 Y channel.

Protocol (docs/method.md#evaluation), pinned to the variant that reproduces the per-image PSNR/SSIM that
OSEDiff's DRealSR evaluation logged with pyiqa (``psnr``/``ssim`` with ``test_y_channel=True,
color_space='ycbcr'``); the tests check every available image to within 1e-5 dB / 2e-6:

- Inputs are 8-bit RGB arrays of equal shape; the whole image is used (no border crop).
- PSNR: Y from :func:`~codsr.evaluation.color.rgb_to_y` (not rounded), on a [0, 1] scale,
  ``10 log10(1 / (MSE + 1e-8))``. The 1e-8 is pyiqa's epsilon: identical images score 80 dB
  instead of infinity, and it shifts typical scores by < 1e-4 dB.
- SSIM (Wang et al. 2004): Y rounded to integers (:func:`~codsr.evaluation.color.rgb_to_y_u8`),
  data range 255, C1 = (0.01·255)², C2 = (0.03·255)², 11×11 Gaussian window σ = 1.5 normalised
  to sum 1, "valid" filtering (no padding), no downsampling, the contrast-structure term clipped
  at 0 (as pyiqa does), mean of the SSIM map. Computed in float64.

numpy only: no torch, no pyiqa.
"""

from __future__ import annotations

import numpy as np

from codsr.evaluation.color import rgb_to_y, rgb_to_y_u8

PSNR_EPS = 1e-8
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} != ground-truth shape {gt.shape}; resize the prediction "
            "to the ground-truth size first (codsr.evaluation.images.resize_to)"
        )


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, eps: float = PSNR_EPS) -> float:
    """PSNR in dB of two same-shape float arrays; ``eps`` is added to the MSE on a [0, 1] scale."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ: {x.shape} vs {y.shape}")
    diff = (np.asarray(x, np.float64) - np.asarray(y, np.float64)) / data_range
    mse = float(np.mean(diff * diff))
    return float(10.0 * np.log10(1.0 / (mse + eps)))


def gaussian_kernel_1d(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB's ``fspecial('gaussian', size, sigma)``."""
    half = (size - 1) / 2.0
    t = np.arange(size, dtype=np.float64) - half
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with kernel ``outer(k, k)``, 'valid' region only."""
    n = k.shape[0]
    h, w = img.shape
    rows = sum(k[i] * img[i : h - n + 1 + i, :] for i in range(n))
    return sum(k[i] * rows[:, i : w - n + 1 + i] for i in range(n))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two same-shape 2-D arrays (Gaussian 11×11, σ = 1.5, valid window).

    The contrast-structure term is clipped at 0 before multiplying by the luminance term, as in
    pyiqa (which the reference logs used); for natural images this rarely changes the result.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim: expected two 2-D arrays of equal shape, got {x.shape} and {y.shape}")
    if min(x.shape) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"ssim: image {x.shape[1]}x{x.shape[0]} is smaller than the {SSIM_WINDOW_SIZE}x"
            f"{SSIM_WINDOW_SIZE} window"
        )
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    k = gaussian_kernel_1d()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x = _filter_valid(x, k)
    mu_y = _filter_valid(y, k)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = _filter_valid(x * x, k) - mu_xx
    var_y = _filter_valid(y * y, k) - mu_yy
    cov_xy = _filter_valid(x * y, k) - mu_xy
    cs_map = np.maximum((2.0 * cov_xy + c2) / (var_x + var_y + c2), 0.0)
    ssim_map = (2.0 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs_map
    return float(ssim_map.mean())


def psnr_y(pred_u8: np.ndarray, gt_u8: np.ndarray) -> float:
    """Y-channel PSNR (dB) of two equal-shape uint8 RGB images (paper Table 1; docs/method.md#evaluation)."""
    _check_pair(pred_u8, gt_u8)
    return psnr(rgb_to_y(pred_u8), rgb_to_y(gt_u8), data_range=255.0)


def ssim_y(pred_u8: np.ndarray, gt_u8: np.ndarray) -> float:
    """Y-channel SSIM of two equal-shape uint8 RGB images (paper Table 1; docs/method.md#evaluation)."""
    _check_pair(pred_u8, gt_u8)
    return ssim(rgb_to_y_u8(pred_u8), rgb_to_y_u8(gt_u8), data_range=255.0)

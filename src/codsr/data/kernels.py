"""Blur and sinc kernels of the Real-ESRGAN degradation model (docs/method.md#stage-1), written in torch.

All kernels are built on the integer grid ``-(k//2) .. k//2`` (``k`` odd), with ``x`` the column
(horizontal) and ``y`` the row (vertical) coordinate, and are normalised to sum to 1.

Closed forms (Wang et al., "Real-ESRGAN", ICCVW 2021, §3.1, eq. 2 and the "sinc filter" paragraph):

* covariance ``Σ = R(θ) diag(σx², σy²) R(θ)ᵀ``; quadratic form ``q(c) = cᵀ Σ⁻¹ c``;
* Gaussian: ``k ∝ exp(-q / 2)`` (isotropic when ``σx = σy``, ``θ = 0``);
* generalised Gaussian: ``k ∝ exp(-(q)^β / 2)``, so ``β = 1`` is the Gaussian (Real-ESRGAN's
  convention: the exponent applies to the quadratic form, not to the distance);
* plateau: ``k ∝ 1 / (1 + q^β)``;
* sinc (ideal circular low-pass with cut-off ``ω_c``): ``k(r) ∝ ω_c J1(ω_c r) / (2π r)`` with
  the limit ``ω_c² / (4π)`` at ``r = 0``.

Random sampling of kernels (:func:`random_blur_kernel`, :func:`random_sinc_kernel`) draws every
number from the ``torch.Generator`` it is given, in a fixed order, so that a seed fixes the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "KERNEL_TYPES",
    "kernel_grid",
    "sigma_matrix",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "sinc_kernel",
    "pad_kernel",
    "pulse_kernel",
    "random_blur_kernel",
    "random_sinc_kernel",
    "uniform",
    "choice",
]

# Order matters: docs/method.md#stage-1 gives the probabilities in this order.
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)

_DTYPE = torch.float64  # kernels are tiny; build them in float64 and let callers cast


# ----------------------------------------------------------------------------- random helpers


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One draw from U[low, high) using ``generator`` (a CPU generator)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return low + (high - low) * u


def choice(generator: torch.Generator, probs: Sequence[float]) -> int:
    """Index drawn with the given probabilities (need not be normalised) using ``generator``."""
    total = float(sum(probs))
    if total <= 0:
        raise ValueError(f"choice: probabilities must have a positive sum, got {list(probs)}")
    u = uniform(generator, 0.0, total)
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1  # u == total only through rounding


# ----------------------------------------------------------------------------- closed forms


def _check_size(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")


def kernel_grid(kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) coordinate grids of shape (k, k): x varies along columns, y along rows."""
    _check_size(kernel_size)
    ax = torch.arange(kernel_size, dtype=_DTYPE) - kernel_size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Covariance ``R(θ) diag(σx², σy²) R(θ)ᵀ`` (2×2, float64)."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got sigma_x={sigma_x}, sigma_y={sigma_y}")
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=_DTYPE)
    d = torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=_DTYPE))
    return rot @ d @ rot.T


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    xx, yy = kernel_grid(kernel_size)
    inv = torch.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta))
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def _normalise(k: torch.Tensor) -> torch.Tensor:
    return k / k.sum()


def gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0
) -> torch.Tensor:
    """Bivariate Gaussian ``exp(-q/2)``, normalised (Real-ESRGAN eq. 2 with β = 1)."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalise(torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> torch.Tensor:
    """Generalised Gaussian ``exp(-q^β / 2)``, normalised (β = 1 gives the Gaussian)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, theta)
    return _normalise(torch.exp(-0.5 * q.pow(beta)))


def plateau_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> torch.Tensor:
    """Plateau-shaped kernel ``1 / (1 + q^β)``, normalised."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, theta)
    return _normalise(1.0 / (1.0 + q.pow(beta)))


def sinc_kernel(kernel_size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc) ``ω_c J1(ω_c r) / (2π r)`` with centre ``ω_c²/(4π)``, normalised."""
    if not 0 < cutoff <= math.pi:
        raise ValueError(f"sinc cutoff must be in (0, pi], got {cutoff}")
    xx, yy = kernel_grid(kernel_size)
    r = torch.sqrt(xx * xx + yy * yy)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    k = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r > 0, k, torch.full_like(k, cutoff**2 / (4 * math.pi)))
    return _normalise(k)


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd square kernel to ``size``×``size`` (no-op if already that size)."""
    k = kernel.shape[-1]
    _check_size(size)
    if k > size:
        raise ValueError(f"cannot pad a {k}x{k} kernel to the smaller size {size}")
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


def pulse_kernel(size: int) -> torch.Tensor:
    """Identity (Dirac) kernel: filtering with it leaves the image unchanged."""
    _check_size(size)
    k = torch.zeros(size, size, dtype=_DTYPE)
    k[size // 2, size // 2] = 1.0
    return k


# ----------------------------------------------------------------------------- random kernels


def _random_beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    # Real-ESRGAN draws the shape below or above 1 with equal chance, so that both the sharper
    # (β < 1) and flatter (β > 1) shapes are seen as often whatever the range's asymmetry.
    if uniform(generator, 0.0, 1.0) < 0.5:
        return uniform(generator, beta_range[0], 1.0)
    return uniform(generator, 1.0, beta_range[1])


def random_blur_kernel(
    generator: torch.Generator,
    kernel_size: int,
    kernel_probs: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
) -> tuple[torch.Tensor, str]:
    """One Gaussian-family kernel of type drawn from ``kernel_probs`` (order of :data:`KERNEL_TYPES`).

    Isotropic types use ``σy = σx`` and ``θ = 0``; anisotropic ones draw ``σx``, ``σy`` and ``θ``
    independently. Returns the (k, k) float64 kernel and its type name.
    """
    if len(kernel_probs) != len(KERNEL_TYPES):
        raise ValueError(
            f"kernel_probs needs {len(KERNEL_TYPES)} entries ({KERNEL_TYPES}), got {list(kernel_probs)}"
        )
    kind = KERNEL_TYPES[choice(generator, kernel_probs)]
    family, shape = kind.rsplit("_", 1) if "_" in kind else ("gaussian", kind)
    sigma_x = uniform(generator, *sigma_range)
    if shape == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = uniform(generator, *sigma_range)
        theta = uniform(generator, *rotation_range)
    if family == "gaussian":
        kernel = gaussian_kernel(kernel_size, sigma_x, sigma_y, theta)
    elif family == "generalized":
        kernel = generalized_gaussian_kernel(
            kernel_size, sigma_x, sigma_y, theta, _random_beta(generator, betag_range)
        )
    else:
        kernel = plateau_kernel(kernel_size, sigma_x, sigma_y, theta, _random_beta(generator, betap_range))
    return kernel, kind


def random_sinc_kernel(
    generator: torch.Generator, kernel_size: int, cutoff_range: Sequence[float]
) -> torch.Tensor:
    """Sinc kernel of the given size with cut-off drawn uniformly from ``cutoff_range``."""
    return sinc_kernel(kernel_size, uniform(generator, *cutoff_range))

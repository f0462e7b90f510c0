"""Real-ESRGAN second-order degradation (docs/method.md#stage-1), in torch, batched, seeded.

Interface used by the training loop
-----------------------------------
``degrade(hq, generator, config=None, kernels=None) -> lq``
    ``hq``: (B, 3, H, W) float in [0, 1] on any device; ``generator``: a CPU ``torch.Generator``
    that fixes every random choice; returns LQ (B, 3, H // scale, W // scale) in [0, 1], rounded
    to multiples of 1/255. ``kernels`` (optional) is a mapping with ``kernel1``, ``kernel2`` and
    ``sinc_kernel`` of shape (B, K, K) (what :func:`sample_kernels` returns and what the datasets
    return in ``degrade_in="batch"`` mode); when absent they are drawn from ``generator``.

``BatchDegrader(config, seed)(hq_m11, kernels=batch) -> {"lq": ..., "lq_small": ...}``
    The GPU-batch form for the training loop: takes HQ in [-1, 1] (what the datasets return),
    returns ``lq`` resized back to the HQ size with a per-sample random mode from
    ``config.resize_back_modes`` and ``lq_small`` (H/scale), both in [-1, 1]. Its generator state
    is saved with ``state_dict()`` for exact resumption.

``random_resize_back(lq, size, generator, modes) -> (lq_resized, modes_used)``
    docs/method.md#stage-1: LQ resized back to 512 with a mode drawn from {nearest, bilinear, bicubic}.

Pipeline (Wang et al., Real-ESRGAN, ICCVW 2021, §3 and its reference training code):

1. blur with ``kernel1`` → random resize (up/down/keep, mode area/bilinear/bicubic) → Gaussian
   noise (prob. 0.5) or Poisson noise, each grey with prob. 0.4 → JPEG;
2. blur with ``kernel2`` with prob. 0.8 → random resize to (H/scale·s) → noise → ;
3. with prob. 0.5 each: [resize to H/scale + final sinc filter] then JPEG, or JPEG then
   [resize + sinc]; clamp and round to 1/255.

As in Real-ESRGAN's batched GPU code, the per-sample quantities are the kernels, the noise level,
the grey-noise flag and the JPEG quality; the resize factors and modes, the Gaussian-or-Poisson
choice, the second-blur coin and the final-stage order are drawn once per call (per batch). For a
batch of one (the per-sample DataLoader-worker mode) everything is per sample.

Randomness: all parameters come from ``generator`` (CPU) in a fixed order. Noise tensors are drawn
from a generator on the image's device seeded by one draw of ``generator``, so the same seed gives
the same parameters on CPU and GPU, and bit-identical LQ for the same seed on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from codsr.data import kernels as K
from codsr.data.jpeg import jpeg_compress

__all__ = [
    "DegradationConfig",
    "sample_kernels",
    "degrade",
    "filter2d",
    "add_gaussian_noise",
    "add_poisson_noise",
    "random_resize_back",
    "resize_back",
    "BatchDegrader",
]

KERNEL_KEYS = ("kernel1", "kernel2", "sinc_kernel")
_RESIZE_KINDS = ("up", "down", "keep")
_PI = math.pi


def _pair(x: Sequence[float]) -> tuple[float, float]:
    return (float(x[0]), float(x[1]))


@dataclass
class DegradationConfig:
    """Real-ESRGAN degradation parameters; defaults: docs/method.md#stage-1 (Real-ESRGAN x4plus).

    Ranges are (low, high) pairs; ``*_probs`` follow the order of the names they refer to
    (kernel types: :data:`codsr.data.kernels.KERNEL_TYPES`; resize: up, down, keep).
    Fields ending in ``2`` belong to the second degradation stage.
    """

    scale: int = 4
    kernel_size_range: tuple[int, int] = (7, 21)  # odd sizes in this range, uniformly
    kernel_pad_to: int = 21  # every kernel is zero-padded to this size (batchable)
    sinc_cutoff_small: tuple[float, float] = (_PI / 3, _PI)  # sinc cut-off when kernel size < 13
    sinc_cutoff_large: tuple[float, float] = (_PI / 5, _PI)  # ... when kernel size >= 13
    # first stage
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second stage
    second_blur_prob: float = 0.8
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # final stage
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (_PI / 3, _PI)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    # docs/method.md#stage-1: LQ is resized back to the HQ size with one of these, chosen per sample
    resize_back_modes: tuple[str, ...] = ("nearest", "bilinear", "bicubic")

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so configs compare and hash predictably.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of its domain."""
        if self.scale < 1:
            raise ValueError(f"DegradationConfig.scale must be >= 1, got {self.scale}")
        lo, hi = self.kernel_size_range
        if (
            lo % 2 == 0
            or hi % 2 == 0
            or lo < 1
            or lo > hi
            or hi > self.kernel_pad_to
            or self.kernel_pad_to % 2 == 0
        ):
            raise ValueError(
                f"DegradationConfig.kernel_size_range must be odd (low <= high <= kernel_pad_to, odd), "
                f"got {self.kernel_size_range} with kernel_pad_to={self.kernel_pad_to}"
            )
        for name in ("kernel_probs", "kernel_probs2"):
            probs = getattr(self, name)
            if len(probs) != len(K.KERNEL_TYPES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(
                    f"DegradationConfig.{name} must be {len(K.KERNEL_TYPES)} probabilities summing to 1, got {probs}"
                )
        for name in ("resize_probs", "resize_probs2"):
            probs = getattr(self, name)
            if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(
                    f"DegradationConfig.{name} must be 3 probabilities (up, down, keep) summing to 1, got {probs}"
                )
        for name in (
            "sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
            "gray_noise_prob2", "second_blur_prob", "final_sinc_prob",
        ):  # fmt: skip
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"DegradationConfig.{name} must be a probability in [0, 1], got {p}")
        for name in (
            "sinc_cutoff_small", "sinc_cutoff_large", "blur_sigma", "betag_range", "betap_range", "resize_range",
            "noise_range", "poisson_scale_range", "jpeg_range", "blur_sigma2", "betag_range2", "betap_range2",
            "resize_range2", "noise_range2", "poisson_scale_range2", "jpeg_range2", "final_sinc_cutoff",
        ):  # fmt: skip
            r = getattr(self, name)
            if len(r) != 2 or r[0] > r[1] or r[0] < 0:
                raise ValueError(
                    f"DegradationConfig.{name} must be a (low, high) pair with 0 <= low <= high, got {r}"
                )
        for name in ("resize_range", "resize_range2"):
            lo_r, hi_r = getattr(self, name)
            if not (0 < lo_r <= 1 <= hi_r):
                raise ValueError(
                    f"DegradationConfig.{name} must satisfy 0 < low <= 1 <= high, got {(lo_r, hi_r)}"
                )
        for name in ("jpeg_range", "jpeg_range2"):
            lo_q, hi_q = getattr(self, name)
            if lo_q < 1 or hi_q > 100:
                raise ValueError(f"DegradationConfig.{name} must lie in [1, 100], got {(lo_q, hi_q)}")
        for name in ("betag_range", "betap_range", "betag_range2", "betap_range2"):
            lo_b, hi_b = getattr(self, name)
            if not (0 < lo_b <= 1 <= hi_b):
                raise ValueError(
                    f"DegradationConfig.{name} must satisfy 0 < low <= 1 <= high, got {(lo_b, hi_b)}"
                )
        bad = [m for m in self.resize_modes if m not in ("area", "bilinear", "bicubic", "nearest")]
        bad += [m for m in self.resize_back_modes if m not in ("nearest", "bilinear", "bicubic", "area")]
        if bad or not self.resize_modes or not self.resize_back_modes:
            raise ValueError(f"DegradationConfig: unsupported or empty resize modes {bad or '(empty list)'}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DegradationConfig:
        """Build from a (YAML) mapping, overriding the method's defaults; unknown keys are an error."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown degradation config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists for tuples), suitable for YAML."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


# ----------------------------------------------------------------------------- kernels


def _kernel_sizes(cfg: DegradationConfig) -> list[int]:
    lo, hi = cfg.kernel_size_range
    return list(range(lo, hi + 1, 2))


def _random_size(generator: torch.Generator, cfg: DegradationConfig) -> int:
    sizes = _kernel_sizes(cfg)
    return sizes[K.choice(generator, [1.0] * len(sizes))]


def _stage_kernel(generator: torch.Generator, cfg: DegradationConfig, second: bool) -> torch.Tensor:
    """Blur kernel of one stage: a sinc with prob. ``sinc_prob`` else a Gaussian-family kernel."""
    sfx = "2" if second else ""
    size = _random_size(generator, cfg)
    if K.uniform(generator, 0.0, 1.0) < getattr(cfg, "sinc_prob" + sfx):
        # Small kernels cannot represent low cut-offs without heavy truncation ringing.
        cutoff = cfg.sinc_cutoff_small if size < 13 else cfg.sinc_cutoff_large
        kernel = K.random_sinc_kernel(generator, size, cutoff)
    else:
        kernel, _ = K.random_blur_kernel(
            generator,
            size,
            getattr(cfg, "kernel_probs" + sfx),
            getattr(cfg, "blur_sigma" + sfx),
            getattr(cfg, "betag_range" + sfx),
            getattr(cfg, "betap_range" + sfx),
        )
    return K.pad_kernel(kernel, cfg.kernel_pad_to)


def _final_sinc(generator: torch.Generator, cfg: DegradationConfig) -> torch.Tensor:
    if K.uniform(generator, 0.0, 1.0) < cfg.final_sinc_prob:
        size = _random_size(generator, cfg)
        return K.pad_kernel(K.random_sinc_kernel(generator, size, cfg.final_sinc_cutoff), cfg.kernel_pad_to)
    return K.pulse_kernel(cfg.kernel_pad_to)


def sample_kernels(
    generator: torch.Generator, config: DegradationConfig | None = None, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Draw ``kernel1``, ``kernel2`` and ``sinc_kernel``, each (batch_size, K, K) float32.

    Samples are drawn one after another (sample 0's three kernels, then sample 1's, ...).
    """
    cfg = config or DegradationConfig()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KERNEL_KEYS}
    for _ in range(batch_size):
        out["kernel1"].append(_stage_kernel(generator, cfg, second=False))
        out["kernel2"].append(_stage_kernel(generator, cfg, second=True))
        out["sinc_kernel"].append(_final_sinc(generator, cfg))
    return {k: torch.stack(v).to(torch.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- operators


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each sample of ``image`` (B, C, H, W) with its own odd kernel ``kernel`` (B, k, k).

    Borders are reflected (Real-ESRGAN's choice); when the image is too small to reflect
    ``k // 2`` pixels they are replicated instead. All our kernels are point-symmetric, so
    correlation equals convolution.
    """
    b, c, h, w = image.shape
    if kernel.ndim == 2:
        kernel = kernel.expand(b, -1, -1)
    if kernel.shape[0] != b or kernel.shape[-1] % 2 == 0 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"filter2d: need one odd square kernel per sample, got {tuple(kernel.shape)} for batch {b}"
        )
    p = kernel.shape[-1] // 2
    mode = "reflect" if p < h and p < w else "replicate"
    x = F.pad(image, (p, p, p, p), mode=mode).reshape(1, b * c, h + 2 * p, w + 2 * p)
    weight = kernel.to(image).repeat_interleave(c, dim=0).unsqueeze(1)
    return F.conv2d(x, weight, groups=b * c).reshape(b, c, h, w)


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device=device).manual_seed(seed)


def _rand(generator: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def add_gaussian_noise(
    image: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, noise_generator: torch.Generator
) -> torch.Tensor:
    """``clamp(image + n, 0, 1)`` with ``n ~ N(0, (σ/255)²)`` per pixel; grey samples share ``n`` over RGB.

    ``sigma``: (B,) noise levels on the 0–255 scale; ``gray``: (B,) booleans. ``noise_generator``
    must live on ``image.device``.
    """
    b, c, h, w = image.shape
    std = _per_sample(sigma, image) / 255
    noise = torch.randn(image.shape, generator=noise_generator, device=image.device, dtype=image.dtype) * std
    if bool(gray.any()):
        gray_noise = (
            torch.randn((b, 1, h, w), generator=noise_generator, device=image.device, dtype=image.dtype) * std
        )
        noise = torch.where(_per_sample(gray, image) > 0, gray_noise.expand(b, c, h, w), noise)
    return (image + noise).clamp(0, 1)


def _count_levels(quantised: torch.Tensor) -> torch.Tensor:
    """Per-sample number of distinct 8-bit levels, rounded up to a power of two (float, (B,))."""
    b = quantised.shape[0]
    idx = (quantised * 255).round().long().clamp(0, 255).reshape(b, -1)
    idx = idx + 256 * torch.arange(b, device=idx.device).unsqueeze(1)
    used = (torch.bincount(idx.flatten(), minlength=256 * b).reshape(b, 256) > 0).sum(1)
    return torch.exp2(torch.ceil(torch.log2(used.to(torch.float64))))


def _poisson_noise(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Real-ESRGAN treats the image as photon counts: with v distinct levels (rounded up to a power
    # of two), x·v ~ Poisson, so the noise variance is x / v (before the per-sample scale).
    x = (image * 255).round().clamp(0, 255) / 255
    vals = _per_sample(_count_levels(x), image)
    return torch.poisson(x * vals, generator=generator) / vals - x


def add_poisson_noise(
    image: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, noise_generator: torch.Generator
) -> torch.Tensor:
    """``clamp(image + scale · n, 0, 1)`` with Real-ESRGAN's Poisson (shot) noise ``n``.

    ``n = Poisson(x̂·v)/v - x̂`` with ``x̂`` the image rounded to 1/255 and ``v`` the number of its
    distinct levels rounded up to a power of two, so ``Var[scale·n] = scale²·x̂/v``. Grey samples
    use the noise of the luma image (ITU-R 601 weights 0.2989, 0.587, 0.114) on all channels.
    """
    b, c, h, w = image.shape
    noise = _poisson_noise(image, noise_generator)
    if bool(gray.any()):
        luma = (0.2989 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
        gray_noise = _poisson_noise(luma, noise_generator)
        noise = torch.where(_per_sample(gray, image) > 0, gray_noise.expand(b, c, h, w), noise)
    return (image + noise * _per_sample(scale, image)).clamp(0, 1)


def _interpolate(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(image, size=size, mode=mode, align_corners=False)
    return F.interpolate(image, size=size, mode=mode)


def _random_factor(generator: torch.Generator, probs: Sequence[float], rng: Sequence[float]) -> float:
    kind = _RESIZE_KINDS[K.choice(generator, probs)]
    if kind == "up":
        return K.uniform(generator, 1.0, rng[1])
    if kind == "down":
        return K.uniform(generator, rng[0], 1.0)
    return 1.0


def _random_mode(generator: torch.Generator, modes: Sequence[str]) -> str:
    return modes[K.choice(generator, [1.0] * len(modes))]


def _noise_stage(
    out: torch.Tensor,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    gaussian_prob: float,
    sigma_range: Sequence[float],
    poisson_range: Sequence[float],
    gray_prob: float,
) -> torch.Tensor:
    b = out.shape[0]
    if K.uniform(generator, 0.0, 1.0) < gaussian_prob:
        lo, hi = sigma_range
        sigma = lo + (hi - lo) * _rand(generator, b)
        gray = _rand(generator, b) < gray_prob
        return add_gaussian_noise(out, sigma, gray, noise_generator)
    lo, hi = poisson_range
    scale = lo + (hi - lo) * _rand(generator, b)
    gray = _rand(generator, b) < gray_prob
    return add_poisson_noise(out, scale, gray, noise_generator)


def _jpeg_stage(
    out: torch.Tensor, generator: torch.Generator, quality_range: Sequence[float]
) -> torch.Tensor:
    lo, hi = quality_range
    quality = lo + (hi - lo) * _rand(generator, out.shape[0])
    # Clamp first: JPEG of out-of-range values gives colour artefacts (Real-ESRGAN does the same).
    return jpeg_compress(out.clamp(0, 1), quality.to(out.device))


# ----------------------------------------------------------------------------- the pipeline


def degrade(
    hq: torch.Tensor,
    generator: torch.Generator,
    config: DegradationConfig | None = None,
    kernels: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Real-ESRGAN second-order degradation of ``hq`` (B, 3, H, W) in [0, 1] (docs/method.md#stage-1).

    Returns LQ of shape (B, 3, H // scale, W // scale) in [0, 1], rounded to multiples of 1/255.
    ``generator`` must be a CPU generator; ``kernels`` (optional) provides pre-drawn per-sample
    ``kernel1``/``kernel2``/``sinc_kernel`` (B, K, K) — e.g. from a dataset in "batch" mode.
    """
    cfg = config or DegradationConfig()
    if hq.ndim != 4 or hq.shape[1] != 3:
        raise ValueError(f"degrade: hq must be a (B, 3, H, W) batch in [0, 1], got shape {tuple(hq.shape)}")
    if generator.device.type != "cpu":
        raise ValueError(
            "degrade: pass a CPU torch.Generator (noise for GPU images is drawn from a derived one)"
        )
    b, _, h, w = hq.shape
    s = cfg.scale
    if h < s or w < s:
        raise ValueError(f"degrade: image {h}x{w} is smaller than the scale factor {s}")
    if kernels is None:
        kernels = sample_kernels(generator, cfg, b)
    else:
        missing = [k for k in KERNEL_KEYS if k not in kernels]
        if missing:
            raise ValueError(f"degrade: kernels mapping lacks {missing} (needs {list(KERNEL_KEYS)})")
    k1, k2, ksinc = (kernels[k].to(hq.device) for k in KERNEL_KEYS)
    noise_gen = _device_generator(generator, hq.device)
    # Half precision would round away the small noise and JPEG differences: compute in float32+.
    out = hq if hq.dtype == torch.float64 else hq.float()

    # ---- first degradation
    out = filter2d(out, k1)
    factor = _random_factor(generator, cfg.resize_probs, cfg.resize_range)
    mode = _random_mode(generator, cfg.resize_modes)
    size1 = (max(1, math.floor(h * factor)), max(1, math.floor(w * factor)))
    out = _interpolate(out, size1, mode)
    out = _noise_stage(
        out,
        generator,
        noise_gen,
        cfg.gaussian_noise_prob,
        cfg.noise_range,
        cfg.poisson_scale_range,
        cfg.gray_noise_prob,
    )
    out = _jpeg_stage(out, generator, cfg.jpeg_range)

    # ---- second degradation
    if K.uniform(generator, 0.0, 1.0) < cfg.second_blur_prob:
        out = filter2d(out, k2)
    factor = _random_factor(generator, cfg.resize_probs2, cfg.resize_range2)
    mode = _random_mode(generator, cfg.resize_modes)
    size2 = (max(1, int(h / s * factor)), max(1, int(w / s * factor)))
    out = _interpolate(out, size2, mode)
    out = _noise_stage(
        out, generator, noise_gen, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
        cfg.gray_noise_prob2,
    )  # fmt: skip

    # ---- final stage: [resize to H/s + sinc] and JPEG in random order (other orders give
    # twisted lines according to Real-ESRGAN).
    final_size = (h // s, w // s)
    resize_first = K.uniform(generator, 0.0, 1.0) < 0.5
    mode = _random_mode(generator, cfg.resize_modes)
    if resize_first:
        out = filter2d(_interpolate(out, final_size, mode), ksinc)
        out = _jpeg_stage(out, generator, cfg.jpeg_range2)
    else:
        out = _jpeg_stage(out, generator, cfg.jpeg_range2)
        out = filter2d(_interpolate(out, final_size, mode), ksinc)
    return (out * 255).round().clamp(0, 255) / 255


def resize_back(lq: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, h, w) in [0, 1] to ``size`` with ``mode``; clamped to [0, 1] (bicubic overshoots)."""
    return _interpolate(lq, size, mode).clamp(0, 1)


def random_resize_back(
    lq: torch.Tensor, size: tuple[int, int], generator: torch.Generator, modes: Sequence[str] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Resize each sample back to ``size`` with a mode drawn from ``modes`` (docs/method.md#stage-1)."""
    modes = tuple(modes or DegradationConfig.resize_back_modes)
    chosen = [_random_mode(generator, modes) for _ in range(lq.shape[0])]
    out = torch.empty((*lq.shape[:2], *size), dtype=lq.dtype, device=lq.device)
    for mode in set(chosen):
        idx = [i for i, m in enumerate(chosen) if m == mode]
        out[idx] = resize_back(lq[idx], size, mode)
    return out, chosen


class BatchDegrader:
    """Batched degradation for the training loop (data in [-1, 1], any device).

    ``degrader = BatchDegrader(config, seed=0)``; per step
    ``out = degrader(batch["hq"].to(device), kernels=batch)`` gives ``out["lq"]`` (B, 3, H, W) and
    ``out["lq_small"]`` (B, 3, H/scale, W/scale), both in [-1, 1], and ``out["resize_modes"]``.
    ``kernels`` may be omitted (drawn here) or be the dataset batch (``degrade_in="batch"``).
    """

    def __init__(self, config: DegradationConfig | None = None, seed: int = 0) -> None:
        self.config = config or DegradationConfig()
        self.generator = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def __call__(
        self, hq: torch.Tensor, kernels: Mapping[str, Any] | None = None, resize_to_hq: bool = True
    ) -> dict[str, Any]:
        if kernels is not None:
            # A dataset batch carries other keys too; keep only the kernels (degrade reports any missing).
            present = {k: kernels[k] for k in KERNEL_KEYS if k in kernels}
            kernels = present or None
        hq01 = ((hq.float() + 1) / 2).clamp(0, 1)
        lq_small = degrade(hq01, self.generator, self.config, kernels)
        result: dict[str, Any] = {"lq_small": lq_small * 2 - 1}
        if resize_to_hq:
            lq, modes = random_resize_back(
                lq_small, tuple(hq.shape[-2:]), self.generator, self.config.resize_back_modes
            )
            result["lq"] = lq * 2 - 1
            result["resize_modes"] = modes
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

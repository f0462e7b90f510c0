"""Baseline JPEG compression round trip in torch (batched, per-sample quality, CPU or GPU).

Used by the Real-ESRGAN degradation (docs/method.md#stage-1, JPEG quality [30, 95]). It follows the baseline
JPEG codec (ITU-T T.81) as libjpeg runs it with default settings:

1. RGB → YCbCr (JFIF, full range, offset 128 for chroma);
2. 4:2:0 chroma subsampling by 2×2 box averaging;
3. level shift by -128 and 8×8 type-II DCT of each block (the JPEG FDCT is the orthonormal 2-D DCT);
4. quantisation ``round(F / Q)`` with the standard Annex K tables scaled by quality as libjpeg's
   ``jpeg_quality_scaling`` + ``jpeg_add_quant_table`` do: ``s = 5000/q`` for ``q < 50`` else
   ``200 - 2q``, ``Q = clamp(floor((T·s + 50) / 100), 1, 255)`` (baseline);
5. dequantisation, inverse DCT, level shift back;
6. chroma upsampled ×2 with the triangle ("fancy") filter of libjpeg's decoder, which for a 2×
   upsample is exactly bilinear interpolation with half-pixel centres;
7. YCbCr → RGB, clamp to [0, 1].

Quality is rounded to an integer as libjpeg takes an integer. Images are edge-replicated to a
multiple of 16 (the 4:2:0 MCU) as libjpeg does and cropped back. Entropy coding is lossless and
is skipped. With ``differentiable=True`` the rounding in step 4 uses ``r + (x - r)³`` (a smooth
surrogate with the same forward values at integers) so gradients flow to the image.

The choice over ``kornia.enhance.jpeg_codec_differentiable``: kornia's codec works batched with
per-sample quality, but it always uses its smooth rounding surrogate and a smooth quality scaling
(different numbers than libjpeg) and nearest chroma upsampling; this implementation reproduces
libjpeg's decoded pixels to within the integer-DCT rounding (tested against Pillow).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["jpeg_compress", "quality_to_tables", "LUMA_TABLE", "CHROMA_TABLE"]

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), in natural (row-major) order.
LUMA_TABLE = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
CHROMA_TABLE = torch.tensor(
    [
        [17, 18, 24, 47, 99, 99, 99, 99],
        [18, 21, 26, 66, 99, 99, 99, 99],
        [24, 26, 56, 99, 99, 99, 99, 99],
        [47, 66, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
    ],
    dtype=torch.float32,
)


def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix ``D`` (coefficients = D @ block @ Dᵀ)."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def quality_to_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (B, 8, 8) luminance and chrominance tables for integer qualities in [1, 100]."""
    q = quality.to(torch.float32).round().clamp(1, 100)
    scale = torch.where(q < 50, torch.floor(5000 / q), 200 - 2 * q).view(-1, 1, 1)
    luma = torch.floor((LUMA_TABLE.to(q.device) * scale + 50) / 100).clamp(1, 255)
    chroma = torch.floor((CHROMA_TABLE.to(q.device) * scale + 50) / 100).clamp(1, 255)
    return luma, chroma


def _rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return torch.stack([y, cb, cr], 1)


def _ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    y, cb, cr = x.unbind(1)
    cb, cr = cb - 128, cr - 128
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return torch.stack([r, g, b], 1)


def _round(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    r = torch.round(x)
    return r + (x - r) ** 3 if differentiable else r


def _codec_plane(plane: torch.Tensor, table: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Quantise+dequantise one (B, H, W) plane (H, W multiples of 8) with per-sample (B, 8, 8) tables."""
    b, h, w = plane.shape
    d = _dct_matrix(plane.device, plane.dtype)
    blocks = (plane - 128).reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coeff = d @ blocks @ d.T
    t = table.to(plane.dtype)[:, None, None]
    coeff = _round(coeff / t, differentiable) * t
    blocks = d.T @ coeff @ d
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, h, w) + 128


def jpeg_compress(
    image: torch.Tensor,
    quality: torch.Tensor | float,
    *,
    differentiable: bool = False,
    round_output: bool = False,
) -> torch.Tensor:
    """JPEG-compress and decode a batch ``image`` (B, 3, H, W) in [0, 1] at per-sample ``quality``.

    ``quality``: a number or a (B,) tensor of qualities in [1, 100] (rounded to integers).
    ``round_output``: round the decoded pixels to 1/255 as a real decoder does (the degradation
    pipeline leaves this off and rounds once at the end, as Real-ESRGAN does).
    Returns a tensor of the same shape and dtype in [0, 1].
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"jpeg_compress expects a (B, 3, H, W) RGB batch, got shape {tuple(image.shape)}")
    b, _, h, w = image.shape
    quality = torch.as_tensor(quality, dtype=torch.float32).flatten()
    if quality.numel() == 1:
        quality = quality.expand(b)
    if quality.numel() != b:
        raise ValueError(f"quality needs 1 or {b} values (one per sample), got {quality.numel()}")
    if bool(((quality < 1) | (quality > 100)).any()):
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality.tolist()}")
    luma_t, chroma_t = quality_to_tables(quality.to(image.device))

    compute_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    x = image.to(compute_dtype) * 255
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    ycc = _rgb_to_ycbcr(x)
    y = _codec_plane(ycc[:, 0], luma_t, differentiable)
    chroma = F.avg_pool2d(ycc[:, 1:], 2)
    hc, wc = chroma.shape[-2:]
    chroma = torch.stack([_codec_plane(chroma[:, i], chroma_t, differentiable) for i in range(2)], 1)
    chroma = F.interpolate(chroma, size=(hc * 2, wc * 2), mode="bilinear", align_corners=False)
    out = _ycbcr_to_rgb(torch.cat([y[:, None], chroma], 1))[:, :, :h, :w]
    if round_output:
        out = _round(out, differentiable)
    return (out.clamp(0, 255) / 255).to(image.dtype)

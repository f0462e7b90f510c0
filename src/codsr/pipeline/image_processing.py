"""Conversions between user image types and tensors, and the release's resize rules (docs/method.md#inference)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

PROCESS_SIZE = 512  # the release's process_size: inputs are first brought to ≥ 512/upscale px


def to_tensor01(image: Any) -> torch.Tensor:
    """PIL image / list of PIL, H×W×C or B×H×W×C numpy (uint8, uint16 or float in [0,1]), or a
    B×3×H×W / 3×H×W tensor in [0,1]  →  float32 B×3×H×W tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return to_tensor01(_pil_to_array(image))
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("empty image list")
        return torch.cat([to_tensor01(im) for im in image])
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        else:
            raise TypeError(f"unsupported numpy image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"numpy image must be H×W, H×W×C or B×H×W×C, got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        return _check01(_to_rgb(t))
    if torch.is_tensor(image):
        t = image.float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"tensor image must be C×H×W or B×C×H×W, got shape {tuple(image.shape)}")
        return _check01(_to_rgb(t))
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array or tensor")


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I"):  # 16-bit grayscale ("I;16*", or "I" as PIL opens 16-bit PNGs)
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im.convert("RGB"))


def _to_rgb(t: torch.Tensor) -> torch.Tensor:
    c = t.shape[1]
    if c == 3:
        return t
    if c == 1:
        return t.expand(-1, 3, -1, -1)
    if c == 4:
        return t[:, :3]
    raise ValueError(f"image must have 1, 3 or 4 channels, got {c}")


def _check01(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        raise ValueError("empty image")
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or Inf values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"image values must be in [0, 1] (got [{lo:.3g}, {hi:.3g}]); scale uint8 images by 1/255")
    return t.clamp(0, 1).contiguous()


def _resize_pil_float(t: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize a 3×H×W float tensor with PIL's filter per channel in mode "F" (no 8-bit rounding)."""
    w, h = size
    chans = [
        torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize((w, h), resample), dtype=np.float32))
        for c in t.float().cpu()
    ]
    return torch.stack(chans)


def resize_image(t: torch.Tensor, size: tuple[int, int], resample: int = Image.BICUBIC) -> torch.Tensor:
    """Resize B×3×H×W [0,1] to ``size`` = (W, H) with a PIL filter, without quantising to 8 bits."""
    if tuple(t.shape[-1:-3:-1]) == tuple(size):
        return t
    return torch.stack([_resize_pil_float(im, size, resample) for im in t]).clamp(0, 1)


def release_input_size(w: int, h: int, upscale: float, process_size: int = PROCESS_SIZE) -> list[tuple[tuple[int, int], int]]:
    """The release's chain of resizes for a W×H input, as (size, filter) steps.

    1. if the short side < process_size/upscale: bicubic so it equals process_size/upscale;
    2. bicubic ×upscale;
    3. Lanczos to dimensions floored to multiples of 8.
    """
    steps: list[tuple[tuple[int, int], int]] = []
    min_side = process_size // upscale
    if min(w, h) < min_side:
        s = min_side / min(w, h)
        w, h = int(s * w), int(s * h)
        steps.append(((w, h), Image.BICUBIC))
    w, h = int(w * upscale), int(h * upscale)
    steps.append(((w, h), Image.BICUBIC))
    w8, h8 = w - w % 8, h - h % 8
    if (w8, h8) != (w, h):
        steps.append(((w8, h8), Image.LANCZOS))
    return steps

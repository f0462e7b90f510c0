"""Control maps: a per-pixel fidelity ↔ realism map, loaded, validated and resized to the latent grid.

A control map ``m`` is an H×W map in [0, 1]: 0 = most faithful, 1 = the method's normal behaviour.
The model multiplies the RGPA weight map by it, ``ε_a = (m · noise_scale · W(g_{x_L})) ε`` (paper
Eq. 3 with a user factor), per latent cell (docs/region-control.md).

This module only turns what a user passes (a float array or tensor, a PIL image, a grayscale image
file, or a list of those for a batch) into a B×1×h×w float32 tensor on the latent grid, by area
averaging, and rejects bad maps with a message that names the problem and the fix. It runs before
any model work, so a bad map costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "ControlMapError",
    "check_noise_scale",
    "control_map_to_latent",
    "is_identity_map",
    "load_control_map",
]


class ControlMapError(ValueError):
    """A control map that cannot be used (size, channels, values); the message says what to change."""


_INT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def check_noise_scale(noise_scale: float) -> float:
    """``noise_scale`` as a float; a ValueError unless it is finite and ≥ 0."""
    try:
        value = float(noise_scale)
    except (TypeError, ValueError):
        raise ValueError(f"noise_scale must be a number ≥ 0 (1.0 = the method), got {noise_scale!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"noise_scale must be a finite number ≥ 0 (1.0 = the method), got {noise_scale!r}")
    return value


def _from_pil(image: Image.Image, what: str) -> np.ndarray:
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        # Pillow opens 16-bit grayscale files as "I;16" or "I": 16-bit values.
        arr = np.asarray(image).astype(np.float64)
        if arr.max(initial=0) > 65535:
            raise ControlMapError(f"{what}: 32-bit integer map with values above 65535; save it as 8- or 16-bit")
        return (arr / 65535.0)[..., None]
    if mode == "F":
        return np.asarray(image, dtype=np.float64)[..., None]
    if mode == "1":
        return np.asarray(image, dtype=np.float64)[..., None]
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "LA":
        image = image.convert("L")  # a gray mask with alpha: the gray channel is the map
        mode = "L"
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if mode == "RGBA":
        arr = arr[..., :3]  # the colour channels; they must still be equal (below)
    return arr.astype(np.float64) / 255.0


def _as_hw1(value: Any, what: str) -> np.ndarray | torch.Tensor:
    """One map as an H×W×1 (numpy) array / 1×H×W tensor, or B×1×H×W tensor; values not yet checked."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ControlMapError(f"{what}: no such file {str(path)!r}; give a grayscale image file")
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im, f"{what} ({path.name})")
        except ControlMapError:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for unreadable files
            raise ControlMapError(f"{what}: cannot read {str(path)!r} as an image ({err})") from err
    if isinstance(value, Image.Image):
        return _from_pil(value, what)
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype == np.bool_:
            arr = arr.astype(np.float64)
        elif arr.dtype in _INT_SCALE:
            arr = arr.astype(np.float64) / _INT_SCALE[arr.dtype]
        elif not np.issubdtype(arr.dtype, np.floating):
            raise ControlMapError(
                f"{what}: numpy dtype {arr.dtype} not supported; use float in [0, 1], uint8, uint16 or bool"
            )
        if arr.ndim == 2:
            arr = arr[..., None]
        elif arr.ndim != 3:
            raise ControlMapError(f"{what}: expected an H×W or H×W×C array, got shape {arr.shape}")
        return arr
    if torch.is_tensor(value):
        t = value.detach()
        if t.dtype == torch.bool:
            t = t.float()
        elif t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif not t.is_floating_point():
            raise ControlMapError(f"{what}: tensor dtype {t.dtype} not supported; use a float tensor in [0, 1]")
        if t.ndim == 2:
            t = t[None]
        if t.ndim not in (3, 4):
            raise ControlMapError(
                f"{what}: expected an H×W, C×H×W or B×C×H×W tensor, got shape {tuple(t.shape)}"
            )
        return t
    raise ControlMapError(
        f"{what}: unsupported type {type(value).__name__}; give a float array or tensor in [0, 1], a PIL "
        "image or a grayscale image file"
    )


def _one_channel(t: torch.Tensor, what: str) -> torch.Tensor:
    """B×C×H×W → B×1×H×W: C must be 1, or 3 equal channels (a gray image saved as RGB)."""
    c = t.shape[1]
    if c == 1:
        return t
    if c == 3 and torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 0], t[:, 2]):
        return t[:, :1]
    detail = "3 channels that differ (a colour image)" if c == 3 else f"{c} channels"
    raise ControlMapError(
        f"{what}: a control map has one channel (grayscale), got {detail}; convert it to grayscale "
        "(e.g. PIL .convert('L')) or pass one channel"
    )


def load_control_map(value: Any, batch: int | None = None, what: str = "control_map") -> torch.Tensor:
    """Turn ``value`` into a float32 B×1×H×W CPU tensor in [0, 1] (values checked, size not yet).

    ``value``: a float array or tensor in [0, 1] (H×W, H×W×1, 1×H×W, B×1×H×W; uint8 / uint16 are
    divided by 255 / 65535, bool gives 0/1), a PIL image, a path to a grayscale image file, or a
    list of those, one per image of a batch. One map for a batch of ``batch`` images is repeated.
    """
    if isinstance(value, (list, tuple)):
        if batch is not None and len(value) != batch:
            raise ControlMapError(f"{what}: got {len(value)} maps for {batch} images; give one map or one per image")
        maps = [load_control_map(v, None, f"{what}[{i}]") for i, v in enumerate(value)]
        if any(m.shape[0] != 1 for m in maps):
            raise ControlMapError(f"{what}: a list holds one map per image, not batches")
        if len({tuple(m.shape) for m in maps}) != 1:
            raise ControlMapError(
                f"{what}: the maps of a list differ in size {[tuple(m.shape[-2:]) for m in maps]}; give one size"
            )
        return torch.cat(maps)
    raw = _as_hw1(value, what)
    if isinstance(raw, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1)))[None]
    else:
        t = raw if raw.ndim == 4 else raw[None]
    t = _one_channel(t.to("cpu", torch.float64), what).float()
    if not torch.isfinite(t).all():
        raise ControlMapError(f"{what}: contains NaN or Inf; a control map holds values in [0, 1]")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ControlMapError(
            f"{what}: values must be in [0, 1] (0 = most faithful, 1 = the method), got [{lo:.4g}, {hi:.4g}]; "
            "rescale or clip it"
        )
    if batch is not None and t.shape[0] != batch:
        if t.shape[0] != 1:
            raise ControlMapError(f"{what}: holds {t.shape[0]} maps for {batch} images; give one map or one per image")
        t = t.expand(batch, -1, -1, -1)
    return t


def _integer_related(size: tuple[int, int], ref: tuple[int, int]) -> bool:
    """``size`` is ``ref`` scaled by one integer factor, up or down, on both axes."""
    (h, w), (rh, rw) = size, ref
    if (h, w) == (rh, rw):
        return True
    if rh and rw and h % rh == 0 and w % rw == 0 and h // rh == w // rw:
        return True
    return bool(h and w and rh % h == 0 and rw % w == 0 and rh // h == rw // w)


def control_map_to_latent(
    value: Any,
    latent_size: tuple[int, int],
    sizes: dict[str, tuple[int, int]],
    batch: int | None = None,
    device: torch.device | str | None = None,
    what: str = "control_map",
) -> torch.Tensor:
    """Load, validate and resize a control map to the latent grid: B×1×h×w float32 on ``device``.

    ``sizes`` names the (H, W) sizes the map may have, e.g. ``{"input": ..., "output": ...}``; the
    latent grid itself is always allowed. A map is accepted when its size equals one of them or is
    one of them scaled by an integer factor (up or down, the same on both axes); anything else is an
    error naming the allowed sizes. Resizing is by area averaging (``adaptive_avg_pool2d``): each
    latent cell gets the mean of the map over the pixels it covers (a map coarser than the grid is
    repeated), so an all-0 or all-1 map stays exactly 0 or 1.
    """
    m = load_control_map(value, batch, what)
    size = tuple(m.shape[-2:])
    allowed = {**sizes, "latent grid": tuple(latent_size)}
    if not any(_integer_related(size, tuple(ref)) for ref in allowed.values()):
        listed = ", ".join(f"{name} {ref[1]}×{ref[0]}" for name, ref in allowed.items())
        raise ControlMapError(
            f"{what}: a map of {size[1]}×{size[0]} px (W×H) fits none of the sizes it may have ({listed}) nor an "
            "integer multiple or divisor of one; resize the map to the input or output size"
        )
    if size != tuple(latent_size):
        m = F.adaptive_avg_pool2d(m, latent_size)
    return m.contiguous().to(device) if device is not None else m.contiguous()


def is_identity_map(control_map: torch.Tensor | None) -> bool:
    """True when the map changes nothing (absent or all ones)."""
    return control_map is None or bool((control_map == 1).all())


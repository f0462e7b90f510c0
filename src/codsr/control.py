"""Making control maps for region control (docs/region-control.md).

A control map is an H×W float map in [0, 1]: 0 = most faithful (no generative noise there), 1 = the
method's normal behaviour. :func:`codsr.pipeline.control_map.control_map_to_latent` validates and
resizes it; this module makes maps and finds the map of each input of a batch run:

* :func:`from_mask` — from a mask image (the masked region is protected, or is the only one left free);
* :func:`from_edges` — protect where the local gradient is strong (text, line art, logos);
* :func:`from_text` — protect what a text query ("face", "text") finds, through the Grounding DINO +
  SAM 2 segmenter of stage 2 (:class:`codsr.stage2.grounding.GroundedSAM2`; needs ``transformers``
  with the two models);
* :func:`save_control_map` — write a map as a 16-bit grayscale PNG, atomically;
* :func:`control_map_for` — the map file of one input: one file for every input, or a folder
  matched by file name.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from codsr.atomic import atomic_write_bytes
from codsr.imageio import IMAGE_EXTENSIONS
from codsr.model.rgpa import sobel_magnitude
from codsr.pipeline.control_map import ControlMapError, load_control_map

__all__ = [
    "ControlMapError",
    "control_map_for",
    "feather",
    "from_edges",
    "from_mask",
    "from_text",
    "save_control_map",
]


def feather(control_map: np.ndarray, radius_px: int) -> np.ndarray:
    """Soften a map's edges with a (2r+1)² box blur, replicate-padded; r = 0 returns it unchanged."""
    if radius_px < 0:
        raise ValueError(f"feather radius must be ≥ 0 px, got {radius_px}")
    if radius_px == 0:
        return control_map
    t = torch.from_numpy(np.ascontiguousarray(control_map, dtype=np.float32))[None, None]
    k = 2 * radius_px + 1
    t = F.avg_pool2d(F.pad(t, (radius_px,) * 4, mode="replicate"), k, stride=1)
    return t[0, 0].clamp(0, 1).numpy()


def _mask_bool(mask: Any, threshold: float) -> np.ndarray:
    """Any mask (PIL image, file, array, tensor; values in [0, 1] or 8/16-bit) → bool H×W (value > threshold)."""
    if isinstance(mask, Image.Image) and mask.mode in ("RGBA", "LA", "PA"):
        alpha = mask.getchannel("A")
        # A painted layer (transparent where unpainted) is selected by its alpha; an opaque one by its gray.
        mask = alpha if alpha.getextrema()[0] < 255 else mask.convert("L")
    if isinstance(mask, Image.Image) and mask.mode not in ("1", "L", "I", "I;16", "F"):
        mask = mask.convert("L")  # a colour mask: selected by luma
    m = load_control_map(mask, what="mask")  # 1×1×H×W in [0, 1], validated
    return (m[0, 0] > threshold).numpy()


def from_mask(mask: Any, *, protect: bool = True, threshold: float = 0.5, feather_px: int = 0) -> np.ndarray:
    """A control map from a mask (white / > ``threshold`` = selected).

    ``protect=True``: the selected region gets 0 (most faithful), the rest 1 — e.g. a mask over
    faces or text. ``protect=False``: only the selected region keeps the method's noise (1), the
    rest gets 0. ``feather_px`` softens the border (box blur). Returns float32 H×W in [0, 1].
    """
    selected = _mask_bool(mask, threshold)
    out = np.where(selected, 0.0, 1.0) if protect else np.where(selected, 1.0, 0.0)
    return feather(out.astype(np.float32), feather_px)


def _image01(image: Any) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None]
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        arr = arr[..., None].repeat(3, -1) if arr.ndim == 2 else arr[..., :3]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    if torch.is_tensor(image):
        t = image.float()
        return (t[None] if t.ndim == 3 else t)[:, :3]
    raise TypeError(f"image: expected a PIL image, file, H×W×3 array or 3×H×W tensor, got {type(image).__name__}")


def from_edges(
    image: Any, threshold: float = 0.25, *, patch: int = 8, protect: bool = True, feather_px: int = 0
) -> np.ndarray:
    """A control map that protects regions of strong local gradient (text, line art, logos, edges).

    The gradient is RGPA's own measure (BT.601 luma, Sobel, |gx| + |gy|; paper §3.1), averaged over
    ``patch``×``patch`` pixel windows centred on each pixel; where the mean exceeds ``threshold``
    the map is 0 (``protect=False``: 1 there, 0 elsewhere). RGPA's own ramp runs from 0.15 to 0.25
    on 16-px patches, so the default threshold protects what RGPA would give the most noise.
    Returns float32 H×W (the image's size) in [0, 1].
    """
    if patch < 1:
        raise ValueError(f"patch must be ≥ 1 px, got {patch}")
    x01 = _image01(image)
    grad = sobel_magnitude(x01 * 2 - 1)  # B×1×H×W
    pad_lo, pad_hi = (patch - 1) // 2, patch // 2
    mean = F.avg_pool2d(F.pad(grad, (pad_lo, pad_hi, pad_lo, pad_hi), mode="replicate"), patch, stride=1)
    strong = (mean[0, 0] > threshold).numpy()
    out = np.where(strong, 0.0, 1.0) if protect else np.where(strong, 1.0, 0.0)
    return feather(out.astype(np.float32), feather_px)


def from_text(
    image: Any,
    query: str | Sequence[str],
    *,
    segmenter: Any = None,
    protect: bool = True,
    feather_px: int = 0,
    device: torch.device | str = "cpu",
    **segmenter_kwargs: Any,
) -> np.ndarray:
    """A control map that protects (``protect=True``) what a text query finds, e.g. ``"face"``, ``"text"``.

    Each query (a string or several) is segmented by Grounding DINO + SAM 2 as stage 2 does
    (:class:`codsr.stage2.grounding.GroundedSAM2`); the union of the masks is passed to
    :func:`from_mask`. ``segmenter``: an existing ``GroundedSAM2`` (or anything with its
    ``segment(image, nouns)``); by default one is loaded with ``segmenter_kwargs``
    (``grounding_dino=``, ``sam2=`` ids or folders). Nothing found → an all-ones map (no change).
    """
    queries = [query] if isinstance(query, str) else list(query)
    if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ValueError(f"query: give one or more non-empty words, got {query!r}")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(np.round(_image01(image)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    if segmenter is None:
        try:
            from codsr.stage2.grounding import GroundedSAM2
        except ImportError as err:  # pragma: no cover - transformers is a core dependency today
            raise ImportError(
                "from_text needs the stage-2 grounding extra (transformers with Grounding DINO and SAM 2)"
            ) from err
        segmenter = GroundedSAM2.from_pretrained(device=device, **segmenter_kwargs)
    union = np.zeros((image.size[1], image.size[0]), dtype=bool)
    for result in segmenter.segment(image, queries):
        if result.mask is not None:
            union |= np.asarray(result.mask, dtype=bool)
    return from_mask(union, protect=protect, feather_px=feather_px)


def save_control_map(control_map: Any, path: str | os.PathLike) -> Path:
    """Write a map (anything :func:`~codsr.pipeline.control_map.load_control_map` reads) as a 16-bit
    grayscale PNG, atomically."""
    m = load_control_map(control_map, what="control_map")
    if m.shape[0] != 1:
        raise ControlMapError(f"save_control_map writes one map, got {m.shape[0]}")
    arr = np.round(m[0, 0].numpy().astype(np.float64) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def control_map_for(input_path: str | os.PathLike, source: str | os.PathLike, input_root: str | os.PathLike) -> Path:
    """The control-map file of one input of a run.

    ``source`` a file: that map, for every input. ``source`` a folder: the map with the input's
    path below ``input_root`` and the same stem (any image extension; ``photo.jpg`` →
    ``maps/photo.png``; ``sub/a.jpg`` → ``maps/sub/a.png``), else the same stem directly in the folder.
    No map for an input is an error for that input (FileNotFoundError): a silent fallback to the
    method's normal noise would generate detail exactly where a map was meant to protect.
    """
    src = Path(source)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"control map {str(src)!r}: no such file or folder")
    inp = Path(input_path)
    try:
        rel = inp.resolve().relative_to(Path(input_root).resolve())
    except ValueError:
        rel = Path(inp.name)
    candidates = [src / rel.parent, src] if rel.parent != Path(".") else [src]
    for folder in candidates:
        exact = folder / rel.name  # a map with the input's own name and extension
        if exact.is_file() and exact.resolve() != inp.resolve():
            return exact
        hits = sorted(
            p for p in folder.glob(f"{glob.escape(rel.stem)}.*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )  # fmt: skip
        if len(hits) > 1:
            raise FileNotFoundError(
                f"control map for {inp.name!r}: several candidates in {str(folder)!r} "
                f"({', '.join(p.name for p in hits)}); keep one"
            )
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"no control map for {str(rel)!r} in {str(src)!r} (looked for {rel.stem}.<image ext>); add one or "
        "leave the image out"
    )


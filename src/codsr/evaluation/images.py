"""Reading images for evaluation, listing image folders, and the resize rule (docs/method.md#evaluation).

Images are read the way pyiqa reads them (``PIL.Image.open(path).convert("RGB")``): grayscale is
replicated to three channels, an alpha channel is dropped (not composited), 16-bit PNGs arrive as
8-bit from Pillow, and EXIF orientation is ignored. Keeping this identical to pyiqa is what makes
our numbers comparable to logs produced with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from codsr.imageio import IMAGE_EXTENSIONS

# IMAGE_EXTENSIONS (codsr.imageio, lower case): the files treated as images when listing folders.

RESIZE_RULE = (
    "prediction resized to the ground-truth size with Pillow bicubic (Image.BICUBIC) on 8-bit RGB "
    "when the shapes differ; ground truth never resized; no-reference metrics see the prediction as saved"
)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name; hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (pass an existing directory)")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_rgb_u8(path: str | Path) -> np.ndarray:
    """Read an image file as a uint8 array (H, W, 3) in RGB order."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def resize_to(img_u8: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic (Pillow) resize of a uint8 RGB array to ``size_hw`` = (height, width)."""
    h, w = size_hw
    if img_u8.shape[:2] == (h, w):
        return img_u8
    resized = Image.fromarray(img_u8).resize((w, h), Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)

"""What the JSON sidecar records about how the numbers were made: protocol, versions, seed."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from codsr.evaluation import full_reference as fr
from codsr.evaluation.images import RESIZE_RULE

# Distribution names whose versions can change a number (or explain why it changed).
VERSIONED_PACKAGES: tuple[str, ...] = (
    "codsr",
    "numpy",
    "pillow",
    "torch",
    "torchvision",
    "pyiqa",
    "timm",
    "huggingface_hub",
    "diffusers",
    "transformers",
    "peft",
)

# The file ``codsr benchmark-sets`` writes beside its outputs; ``evaluate`` reads the seed from it.
RUN_MANIFEST_NAME = "benchmark_manifest.json"


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when not installed), plus Python's, without importing anything heavy."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def protocol_record() -> dict[str, Any]:
    """The fixed evaluation protocol (docs/method.md#evaluation) in machine-readable form."""
    return {
        "crop_border": 0,
        "colour_space": "Y of YCbCr, ITU-R BT.601: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, RGB in [0, 255]",
        "image_loading": "PIL Image.open(path).convert('RGB'): grayscale replicated, alpha dropped, EXIF ignored",
        "channel_order": "RGB",
        "resize_rule": RESIZE_RULE,
        "psnr": {
            "input": "Y not rounded, scaled to [0, 1]",
            "formula": "10*log10(1 / (MSE + eps))",
            "eps": fr.PSNR_EPS,
            "matches": "pyiqa create_metric('psnr', test_y_channel=True, color_space='ycbcr')",
        },
        "ssim": {
            "input": "Y rounded to integers (ties to even), data range 255",
            "window": f"Gaussian {fr.SSIM_WINDOW_SIZE}x{fr.SSIM_WINDOW_SIZE}, sigma {fr.SSIM_SIGMA}, "
            "normalised, 'valid' (no padding)",
            "K1": fr.SSIM_K1,
            "K2": fr.SSIM_K2,
            "downsample": False,
            "cs_clipped_at_zero": True,
            "dtype": "float64",
            "matches": "pyiqa create_metric('ssim', test_y_channel=True, color_space='ycbcr')",
        },
        "averaging": "arithmetic mean of per-image scores",
    }


def _find_seed(obj: Any) -> int | None:
    if isinstance(obj, dict):
        for key in ("seed", "base_seed"):
            if isinstance(obj.get(key), int):
                return obj[key]
        for value in obj.values():
            found = _find_seed(value)
            if found is not None:
                return found
    return None


def find_run_manifest(pred_dir: Path) -> Path | None:
    """The benchmark manifest beside a prediction folder (in it, or in its parent), if any."""
    for candidate in (pred_dir / RUN_MANIFEST_NAME, pred_dir.parent / RUN_MANIFEST_NAME):
        if candidate.is_file():
            return candidate
    return None


def seed_from_manifest(path: Path) -> int | None:
    """The integer ``seed`` (or ``base_seed``) recorded anywhere in a JSON run manifest."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read run manifest {path}: {exc}") from exc
    return _find_seed(data)

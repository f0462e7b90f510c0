"""Region control on the web page: the brush layer or an uploaded map → a control map (docs/region-control.md).

The Image tab has a brush editor (the input image as background: paint over faces, text, ...) and
an upload for a ready-made grayscale map. An uploaded map wins over the brush; the brush's painted
pixels (any layer, alpha > 0) are protected, or are the only area with generated detail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from codsr.control import from_mask

BRUSH_MODES = ("protect painted area", "generated detail only in painted area")

__all__ = ["BRUSH_MODES", "control_map_from_editor", "painted_mask"]


def painted_mask(editor_value: Any) -> np.ndarray | None:
    """Union of the painted pixels (alpha > 0) of an ImageEditor value's layers, bool H×W; None if nothing is painted."""
    if not isinstance(editor_value, dict):
        return None
    union = None
    for layer in editor_value.get("layers") or []:
        if layer is None:
            continue
        im = layer if isinstance(layer, Image.Image) else Image.open(layer)
        if im.mode not in ("RGBA", "LA", "PA"):
            continue  # a layer without alpha has no brush strokes to read
        alpha = np.asarray(im.getchannel("A")) > 0
        union = alpha if union is None else union | alpha
    return union if union is not None and union.any() else None


def control_map_from_editor(editor_value: Any, mode: str = BRUSH_MODES[0], uploaded: Any = None) -> Any:
    """The control map for a job: ``uploaded`` (a grayscale file or image, used as is: 0 = faithful,
    1 = the method) if given, else the brush strokes of ``editor_value`` by ``mode``, else None."""
    if mode not in BRUSH_MODES:
        raise ValueError(f"brush mode must be one of {BRUSH_MODES}, got {mode!r}")
    if uploaded is not None and not (isinstance(uploaded, str) and not uploaded):
        return uploaded
    mask = painted_mask(editor_value)
    if mask is None:
        return None
    return from_mask(mask, protect=mode == BRUSH_MODES[0])

"""Inference: the image-to-image CODSR pipeline, tile plans, tiling and colour correction.

``codsr.pipeline.TilePlan`` and ``codsr.pipeline.CODSRPipeline`` are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CODSRPipeline": "codsr.pipeline.pipeline",
    "TilePlan": "codsr.pipeline.tiling",
    "MemoryBudgetError": "codsr.pipeline.tiling",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from codsr.pipeline.pipeline import CODSRPipeline  # noqa: F401
    from codsr.pipeline.tiling import MemoryBudgetError, TilePlan  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'codsr.pipeline' has no attribute {name!r}")

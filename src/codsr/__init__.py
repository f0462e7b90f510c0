"""codsr: CODSR one-step diffusion image super-resolution (CVPR 2026).

The public API is small and re-exported here; heavy modules are imported lazily so that
``import codsr`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "CODSRPipeline": "codsr.pipeline.pipeline",
    "TilePlan": "codsr.pipeline.tiling",
    "CODSRModel": "codsr.model.codsr",
    "CODSRCheckpoint": "codsr.model.checkpoint",
    "load_checkpoint": "codsr.model.checkpoint",
    "rgpa_weight_map": "codsr.model.rgpa",
    "SFTModulator": "codsr.model.lqfm",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from codsr.model.checkpoint import CODSRCheckpoint, load_checkpoint  # noqa: F401
    from codsr.model.codsr import CODSRModel  # noqa: F401
    from codsr.model.lqfm import SFTModulator  # noqa: F401
    from codsr.model.rgpa import rgpa_weight_map  # noqa: F401
    from codsr.pipeline.pipeline import CODSRPipeline  # noqa: F401
    from codsr.pipeline.tiling import TilePlan  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'codsr' has no attribute {name!r}")

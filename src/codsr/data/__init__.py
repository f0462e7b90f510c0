"""Training data for CODSR (docs/method.md#stage-1): Real-ESRGAN degradation in torch and the datasets.

* :mod:`codsr.data.kernels` — blur/sinc kernels (closed forms, seeded random draws);
* :mod:`codsr.data.jpeg` — batched JPEG round trip in torch (libjpeg tables, 4:2:0);
* :mod:`codsr.data.degradation` — :class:`DegradationConfig`, :func:`degrade`, :class:`BatchDegrader`;
* :mod:`codsr.data.datasets` — :class:`HQImageDataset`, :class:`PairedImageDataset`, :func:`collate`;
* :mod:`codsr.data.make_lq` — the ``codsr make-lq`` command.

The names below are imported lazily so that ``codsr --help`` (which imports the command module)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchDegrader": "codsr.data.degradation",
    "DegradationConfig": "codsr.data.degradation",
    "degrade": "codsr.data.degradation",
    "random_resize_back": "codsr.data.degradation",
    "resize_back": "codsr.data.degradation",
    "sample_kernels": "codsr.data.degradation",
    "HQImageDataset": "codsr.data.datasets",
    "PairedImageDataset": "codsr.data.datasets",
    "collate": "codsr.data.datasets",
    "derive_seed": "codsr.data.datasets",
    "list_images": "codsr.data.datasets",
    "load_image": "codsr.data.datasets",
    "jpeg_compress": "codsr.data.jpeg",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'codsr.data' has no attribute {name!r}")

"""Builders of tiny and random-weight models for tests, benchmarks and CPU recipes.

Nothing here loads real weights; real models come from :mod:`codsr.model` and
:class:`codsr.CODSRPipeline`. Each tiny config has one source of truth here:

* :mod:`codsr.testing.tiny_sd21` — the tiny SD 2.1 base (``codsr make-tiny-model``);
* :mod:`codsr.testing.release` — a complete tiny CODSR model (tiny SD 2.1 + synthetic checkpoint in
  the release's format): :func:`tiny_pipeline` in memory, :func:`save_tiny_release` as files;
* :mod:`codsr.testing.grounding` — tiny Grounding DINO and SAM 2 (``codsr make-tiny-model --grounding``);
* :mod:`codsr.testing.ram` — tiny RAM / DAPE taggers;
* :mod:`codsr.testing.sd21` — the full-size SD 2.1-base architecture with random weights (benchmarks).

Names are imported lazily so that ``import codsr.testing`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TinyModelConfig": "tiny_sd21",
    "build_tiny_components": "tiny_sd21",
    "build_tokenizer": "tiny_sd21",
    "save_tiny_model": "tiny_sd21",
    "tiny_pipeline": "release",
    "save_tiny_release": "release",
    "build_tiny_release": "release",
    "tiny_release_checkpoint": "release",
    "assemble_pipeline": "release",
    "save_tiny_grounding_models": "grounding",
    "TINY_GROUNDING_VOCAB": "grounding",
    "build_sd21_pipeline": "sd21",
    "build_sd21_components": "sd21",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"codsr.testing.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'codsr.testing' has no attribute {name!r}")

"""Stage-2 building blocks (docs/method.md#stage-2): TMG nouns, masks, attention capture, losses, VSD.

Submodules (imported lazily so that ``codsr --help`` stays fast):

- ``nouns``: RAM tag string → nouns (adjectives dropped; NLTK or spaCy tagger)
- ``grounding``: Grounding DINO + SAM 2 masks of nouns (transformers)
- ``masks``: crop definition, on-disk format and the precompute loop behind ``codsr masks``
- ``dataset``: :class:`Stage2Dataset` (HQ crop, LQ, caption, nouns, masks) and its collate
- ``attention``: cross-attention probability capture on the UNet's attn2 layers
- ``tmg``: token positions of nouns and the TMG area / BCE losses
- ``vsd``: the VSD regulariser (real/fake score on one shared SD UNet)
- ``cli``: the ``codsr masks`` command
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "extract_nouns": "codsr.stage2.nouns",
    "NounBackendError": "codsr.stage2.nouns",
    "GroundedSAM2": "codsr.stage2.grounding",
    "NounMask": "codsr.stage2.grounding",
    "Stage2Dataset": "codsr.stage2.dataset",
    "stage2_collate": "codsr.stage2.dataset",
    "realesrgan_degrade": "codsr.stage2.dataset",
    "CrossAttentionCapture": "codsr.stage2.attention",
    "TMGLoss": "codsr.stage2.tmg",
    "tmg_losses": "codsr.stage2.tmg",
    "noun_token_positions": "codsr.stage2.tmg",
    "VSDLoss": "codsr.stage2.vsd",
    "NEGATIVE_PROMPT": "codsr.stage2.vsd",
    "encode_prompts": "codsr.stage2.vsd",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'codsr.stage2' has no attribute {name!r}")

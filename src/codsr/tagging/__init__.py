"""RAM Swin-L / DAPE image tagger for CODSR's prompts (docs/method.md#inference, #stage-1, #stage-2).

>>> from codsr.tagging import RAMTagger
>>> tagger = RAMTagger.from_pretrained("ram_swin_large_14m.pth", dape_path="DAPE.pth")
>>> tagger(images_01)            # [B, 3, H, W] RGB in [0, 1] -> list of "tag, tag, ..." strings

Submodules: ``model`` (network on timm + transformers), ``convert`` (release files -> state
dict, LoRA merge), ``hub`` (paths / ``hf://`` references), ``taglist`` (names, thresholds),
``tagger`` (preprocessing + API), ``cache`` (per-key tag cache for training), ``cli``
(``codsr tag``). Imports are lazy so that ``codsr --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "RAMTagger": "codsr.tagging.tagger",
    "preprocess": "codsr.tagging.tagger",
    "RAMSwinL": "codsr.tagging.model",
    "RAMConfig": "codsr.tagging.model",
    "CheckpointError": "codsr.tagging.convert",
    "load_tagger_state_dict": "codsr.tagging.convert",
    "DEFAULT_RAM": "codsr.tagging.hub",
    "DEFAULT_DAPE": "codsr.tagging.hub",
    "resolve_weight": "codsr.tagging.hub",
    "tag_list": "codsr.tagging.taglist",
    "class_thresholds": "codsr.tagging.taglist",
    "tags_from_logits": "codsr.tagging.taglist",
    "TagCache": "codsr.tagging.cache",
    "cached_tags": "codsr.tagging.cache",
}

__all__ = [
    "DEFAULT_DAPE",
    "DEFAULT_RAM",
    "CheckpointError",
    "RAMConfig",
    "RAMSwinL",
    "RAMTagger",
    "TagCache",
    "cached_tags",
    "class_thresholds",
    "load_tagger_state_dict",
    "preprocess",
    "resolve_weight",
    "tag_list",
    "tags_from_logits",
]

if TYPE_CHECKING:  # pragma: no cover
    from codsr.tagging.cache import TagCache, cached_tags
    from codsr.tagging.convert import CheckpointError, load_tagger_state_dict
    from codsr.tagging.hub import DEFAULT_DAPE, DEFAULT_RAM, resolve_weight
    from codsr.tagging.model import RAMConfig, RAMSwinL
    from codsr.tagging.tagger import RAMTagger, preprocess
    from codsr.tagging.taglist import class_thresholds, tag_list, tags_from_logits


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'codsr.tagging' has no attribute {name!r}")

"""RAM's 4,585 tag names and per-class thresholds (shipped in ``codsr/tagging/data``, Apache-2.0).

Decision rule of the release (docs/method.md#inference): class ``c`` is on when
``sigmoid(logit_c) > threshold_c`` (strict); the prompt is the names of the classes that are on, in
ascending class index, joined with ``", "``. Ten classes have threshold 1.0 and never fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import torch

__all__ = ["NUM_CLASSES", "class_thresholds", "join_tags", "tag_list", "tags_from_logits"]

NUM_CLASSES = 4585
_TAG_FILE = "ram_tag_list.txt"
_THRESHOLD_FILE = "ram_tag_list_threshold.txt"


def _read_data(name: str) -> str:
    return resources.files("codsr.tagging").joinpath("data", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def tag_list() -> tuple[str, ...]:
    """The English tag names, one per class (lines of ``ram_tag_list.txt``)."""
    tags = tuple(_read_data(_TAG_FILE).splitlines())
    if len(tags) != NUM_CLASSES:
        raise RuntimeError(f"{_TAG_FILE} has {len(tags)} lines, expected {NUM_CLASSES}: reinstall codsr")
    return tags


@lru_cache(maxsize=1)
def _thresholds_tuple() -> tuple[float, ...]:
    values = tuple(float(line) for line in _read_data(_THRESHOLD_FILE).split())
    if len(values) != NUM_CLASSES:
        raise RuntimeError(
            f"{_THRESHOLD_FILE} has {len(values)} values, expected {NUM_CLASSES}: reinstall codsr"
        )
    return values


def class_thresholds() -> torch.Tensor:
    """Per-class thresholds ``[4585]`` float32, the file's values unchanged.

    The release applies ``v if v > 0.9 else min(v, 0.9)``, which is the identity on this file.
    """
    return torch.tensor(_thresholds_tuple(), dtype=torch.float32)


def join_tags(indices: Sequence[int]) -> str:
    """Tag string for the given class indices (ascending order, ``", "`` separator)."""
    names = tag_list()
    return ", ".join(names[i] for i in sorted(indices))


def tags_from_logits(logits: torch.Tensor, thresholds: torch.Tensor | None = None) -> list[str]:
    """``[B, 4585]`` logits -> one tag string per row (sigmoid in float32, strict ``>``)."""
    thresholds = class_thresholds() if thresholds is None else thresholds
    on = torch.sigmoid(logits.detach().float().cpu()) > thresholds.float().cpu()
    return [join_tags(row.nonzero().flatten().tolist()) for row in on]

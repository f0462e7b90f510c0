"""Prompt sources for training (docs/method.md#stage-1: RAM tags of the HQ crop, optional null-text dropout).

* ``none``: the empty prompt for every sample;
* ``file``: one prompt per image file from a ``codsr tag`` output (``name<TAB>tags`` TSV or a JSON
  object), looked up by relative path, file name or stem; the same prompt for every crop;
* ``ram``: RAM tags of each HQ crop, computed on the training device and cached per crop
  (:class:`codsr.tagging.TagCache`), keyed by file, crop box and flip.

Null-text dropout replaces a sample's prompt by ``""`` with probability ``null_text_prob``; one
uniform number is drawn per sample from the trainer's ``prompts`` generator whatever the rate,
so changing the rate never shifts other random streams.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from codsr.tagging.tagfile import read_tag_table

__all__ = ["FilePrompts", "RAMCropPrompts", "apply_null_text", "crop_key", "read_prompt_file"]


def read_prompt_file(path: str | os.PathLike) -> dict[str, str]:
    """``{name: prompt}`` from a TSV (``name<TAB>prompt`` per line) or JSON object file."""
    return read_tag_table(path, "prompts.file")


class FilePrompts:
    """Dataset ``prompt_fn``: the prompt of an image file from a prompt table (picklable)."""

    def __init__(self, table: Mapping[str, str], source: str = "<prompts>") -> None:
        self.table = dict(table)
        self.source = source
        self.by_stem: dict[str, str] = {}
        for key, value in self.table.items():
            self.by_stem.setdefault(Path(key).stem, value)

    def lookup(self, path: str) -> str | None:
        parts = Path(path).parts
        for k in range(len(parts)):
            key = "/".join(parts[k:])
            if key in self.table:
                return self.table[key]
        if str(path) in self.table:
            return self.table[str(path)]
        return self.by_stem.get(Path(path).stem)

    def check(self, paths: Sequence[str | os.PathLike]) -> None:
        missing = [str(p) for p in paths if self.lookup(str(p)) is None]
        if missing:
            raise KeyError(
                f"prompts.file {self.source} has no prompt for {len(missing)} training image(s), e.g. {missing[:3]}; "
                "re-run `codsr tag` on the training folder"
            )

    def __call__(self, path: str, crop_box: tuple[int, int, int, int]) -> str:
        prompt = self.lookup(path)
        if prompt is None:
            raise KeyError(f"prompts.file {self.source} has no prompt for {path}")
        return prompt


def crop_key(path: str, crop_box: Sequence[int], flipped: bool) -> str:
    """Cache key of an HQ crop: ``path|top,left,height,width|flip0/1``."""
    top, left, h, w = (int(v) for v in crop_box)
    return f"{path}|{top},{left},{h},{w}|flip{int(bool(flipped))}"


class RAMCropPrompts:
    """RAM tags of HQ crops (docs/method.md#stage-1), computed lazily on ``device`` and cached per crop."""

    def __init__(self, ram_weights: str | None, cache_dir: str | os.PathLike, device: torch.device) -> None:
        from codsr.tagging import DEFAULT_RAM, RAMTagger, TagCache

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.tagger = RAMTagger.from_pretrained(ram_weights or DEFAULT_RAM, device=device, torch_dtype=dtype)
        self.cache = TagCache(cache_dir, self.tagger.name)

    def __call__(self, hq_m11: torch.Tensor, batch: Mapping) -> list[str]:
        keys = [crop_key(p, box.tolist(), bool(f)) for p, box, f in
                zip(batch["path"], batch["crop_box"], batch["flipped"], strict=True)]  # fmt: skip
        return self.cache.get_or_compute(self.tagger, ((hq_m11.float() + 1) / 2).clamp(0, 1), keys)


def apply_null_text(prompts: Sequence[str], rate: float, generator: torch.Generator) -> list[str]:
    """Replace each prompt by ``""`` with probability ``rate`` (one draw per sample, always)."""
    draws = torch.rand(len(prompts), generator=generator)
    return ["" if float(u) < rate else p for p, u in zip(prompts, draws, strict=True)]

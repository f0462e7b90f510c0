"""Seeded rule weights for the RAM Swin-L tagger and its DAPE LoRA, in the release's file layouts.

The rule (one ``torch.randn`` per key in sorted key order, then a fixed transform per kind of key)
gives full-size RAM / DAPE state dicts without downloading anything. It is the rule of the
release-parity RAM fixture, for which logits of the authors' tagger exist; the same weights test
the file readers, the key mapping and the DAPE merge on their own.

* RAM (file layout of ``ram_swin_large_14m.pth``: ``{"model": sd}``): the 366 tagging-path parameters,
  generator seeded ``seed``; ``label_embed`` → x; LayerNorm weights → 0.1·x + 1; biases → 0.02·x;
  relative-position tables → x; other weights → x/√fan_in.
* DAPE (flat file layout of ``DAPE.pth``): the 248 LoRA tensors, generator seeded ``seed + 1``;
  ``lora_A`` → x/√in_features; ``lora_B`` of the Swin blocks and the tagging head → 0.05·x; the other
  ``lora_B`` → 0 (drawn, then zeroed). ``tied_variant`` keeps the four tag-encoder cross-attention
  ``lora_B`` whose base weights are tied to the tagging head (a file no real DAPE has).

All arithmetic is float32, constants rounded to float32 first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["RAM_RULE_SEED", "dape_rule_state_dict", "dape_shapes", "ram_rule_state_dict", "ram_shapes",
           "write_rule_files"]  # fmt: skip

RAM_RULE_SEED = 2026
_TEXT_LAYERS = 12  # BERT layers of RAM's tag encoder and text decoder
_HIDDEN = 768
_ENCODER_WIDTH = 512
_LORA_R = 8
_LN_WEIGHTS = ("norm.weight", "norm1.weight", "norm2.weight", "LayerNorm.weight")
_TIED = tuple(
    f"tag_encoder.encoder.layer.{i}.crossattention.self.{p}.lora_B" for i in (0, 1) for p in ("query", "key")
)


def _f32(v: float) -> float:
    return float(np.float32(v))


def ram_shapes() -> dict[str, torch.Size]:
    """File-layout names and shapes of the RAM tagging-path parameters (no buffers)."""
    from codsr.tagging.convert import _on_tagging_path, expected_model_shapes, model_key_to_file_key

    return {
        model_key_to_file_key(k): s
        for k, s in expected_model_shapes().items()
        if _on_tagging_path(k) and not k.endswith(("relative_position_index", "attn_mask"))
    }


def dape_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of every LoRA tensor in a release ``DAPE.pth``."""
    from codsr.tagging.convert import expected_model_shapes

    out: dict[str, tuple[int, ...]] = {}
    for key, shape in expected_model_shapes().items():
        if key.startswith("visual_encoder.") and key.endswith(".attn.qkv.weight"):
            c = shape[1]
            out[key.replace(".weight", ".lora_A")] = (2 * _LORA_R, c)  # q and v rows
            out[key.replace(".weight", ".lora_B")] = (2 * c, _LORA_R)
    for i in (0, 1):
        for proj, width in (("query", _HIDDEN), ("key", _ENCODER_WIDTH)):
            name = f"tagging_head.encoder.layer.{i}.crossattention.self.{proj}"
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = (_LORA_R, width), (_HIDDEN, _LORA_R)
    for prefix, cross_key_width in (("tag_encoder.encoder", _ENCODER_WIDTH), ("text_decoder.bert.encoder", _HIDDEN)):
        for i in range(_TEXT_LAYERS):
            for attn in ("attention", "crossattention"):
                for proj in ("query", "key"):
                    width = cross_key_width if (attn, proj) == ("crossattention", "key") else _HIDDEN
                    name = f"{prefix}.layer.{i}.{attn}.self.{proj}"
                    out[f"{name}.lora_A"], out[f"{name}.lora_B"] = (_LORA_R, width), (_HIDDEN, _LORA_R)
    return out


def ram_rule_state_dict(seed: int = RAM_RULE_SEED) -> dict[str, torch.Tensor]:
    """The rule's RAM tensors (file layout, 366 keys, ~212 M values, float32)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in sorted(ram_shapes().items()):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if key == "label_embed" or key.endswith(".relative_position_bias_table"):
            y = x * _f32(1.0)
        elif key.endswith(_LN_WEIGHTS):
            y = x * _f32(0.1) + _f32(1.0)
        elif key.endswith(".bias"):
            y = x * _f32(0.02)
        else:
            y = x * _f32(1 / math.sqrt(math.prod(shape[1:])))
        out[key] = y
    return out


def dape_rule_state_dict(seed: int = RAM_RULE_SEED + 1, tied_variant: bool = False) -> dict[str, torch.Tensor]:
    """The rule's DAPE tensors (flat file layout, 248 keys)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in sorted(dape_shapes().items()):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if key.endswith("lora_A"):
            y = x * _f32(1 / math.sqrt(shape[1]))
        elif key.startswith(("visual_encoder.", "tagging_head.")) or (tied_variant and key in _TIED):
            y = x * _f32(0.05)
        else:
            y = torch.zeros(shape)
        out[key] = y
    return out


def write_rule_files(out_dir: str | os.PathLike, seed: int = RAM_RULE_SEED) -> dict[str, Path]:
    """Write ``ram_rule.pth`` (``{"model": sd}``), ``DAPE_rule.pth`` and ``DAPE_rule_tied.pth`` (~0.85 GB)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"ram": out / "ram_rule.pth", "dape": out / "DAPE_rule.pth", "dape_tied": out / "DAPE_rule_tied.pth"}
    ram = ram_rule_state_dict(seed)
    torch.save({"model": ram}, files["ram"])
    del ram
    torch.save(dape_rule_state_dict(seed + 1), files["dape"])
    torch.save(dape_rule_state_dict(seed + 1, tied_variant=True), files["dape_tied"])
    return files

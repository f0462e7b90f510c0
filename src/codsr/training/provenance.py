"""Which base model a trained checkpoint belongs to, and the warning when a run mixes two.

A CODSR checkpoint holds only LoRA/SFT tensors: they are meaningful on the base model they were
trained on (docs/method.md#checkpoint-format). Training records that base with every checkpoint
it writes: ``.safetensors`` carry it in their header (``base_model``, ``base_model_revision``),
and every checkpoint also gets a sidecar ``<checkpoint>.json`` (the release ``.pkl`` format has no
room for it). A run that starts from a checkpoint (stage 2 from stage 1, or stage 1 continuing)
calls :func:`check_base_model`, which warns once when the recorded base differs from the run's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codsr.atomic import atomic_write_json

__all__ = [
    "BaseModelMismatchWarning",
    "check_base_model",
    "read_provenance",
    "sidecar_path",
    "write_provenance",
]


class BaseModelMismatchWarning(UserWarning):
    """A checkpoint is used with a base model other than the one it was trained on."""


def sidecar_path(checkpoint: str | Path) -> Path:
    """``runs/stage1/codsr_stage1.pkl`` → ``runs/stage1/codsr_stage1.pkl.json``."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".json")


def write_provenance(checkpoint: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata`` (base model, revision, stage, step, ...) beside ``checkpoint``, atomically."""
    return atomic_write_json(sidecar_path(checkpoint), dict(metadata))


def read_provenance(checkpoint: str | Path, header: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The recorded metadata of ``checkpoint``: its sidecar, else the checkpoint's own header
    metadata (``header``, e.g. ``load_checkpoint(path).metadata``) when it names a base model;
    ``None`` when nothing was recorded (e.g. the release's ``codsr.pkl``)."""
    side = sidecar_path(checkpoint)
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(
                f"{side}: unreadable checkpoint metadata ({e}); base model not checked", stacklevel=2
            )
            return None
        return data if isinstance(data, dict) else None
    if header and header.get("base_model"):
        return dict(header)
    return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return False


def check_base_model(
    checkpoint: str | Path,
    base_model: str,
    revision: str | None = None,
    header: Mapping[str, Any] | None = None,
) -> bool:
    """Warn (:class:`BaseModelMismatchWarning`) when ``checkpoint`` was trained on another base
    model (or revision) than ``base_model``; returns True when they match or nothing is recorded."""
    meta = read_provenance(checkpoint, header)
    if not meta or not meta.get("base_model"):
        return True
    trained_on, trained_rev = str(meta["base_model"]), meta.get("base_model_revision")
    same = _same_model(trained_on, str(base_model)) and (trained_rev or None) == (revision or None)
    if not same:
        warnings.warn(
            f"{checkpoint} was trained on base model {trained_on!r}"
            + (f" (revision {trained_rev})" if trained_rev else "")
            + f" but this run uses {str(base_model)!r}"
            + (f" (revision {revision})" if revision else "")
            + ": its LoRA/SFT weights only fit the base they were trained on. Set model.base_model to "
            f"{trained_on!r} (or retrain the checkpoint on this base).",
            BaseModelMismatchWarning,
            stacklevel=2,
        )
    return same

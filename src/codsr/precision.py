"""Precision names → torch dtypes, and the default precision of a device: the one map codsr uses.

Every ``--dtype`` / ``--precision`` option, ``torch_dtype="bf16"`` argument and config key is read
with :func:`resolve_dtype`. ``torch`` is imported only when a dtype is actually resolved, so CLI
modules can use :data:`PRECISIONS` for ``argparse`` choices without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PRECISIONS", "default_precision", "precision_name", "resolve_dtype"]

# Canonical names, in CLI-choice order.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
}  # fmt: skip
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    kind = getattr(device, "type", None)  # torch.device
    return kind if isinstance(kind, str) else str(device).split(":", 1)[0]


def default_precision(device: Any = None) -> str:
    """The precision used when none is given: "fp16" on CUDA and MPS devices, "fp32" elsewhere (CPU).

    ``device`` is a ``torch.device``, a string such as ``"cuda:1"``, or None (= CPU).
    """
    return "fp16" if _device_type(device) in ("cuda", "mps") else "fp32"


def precision_name(value: Any) -> str:
    """Canonical name ("fp32", "bf16", "fp16") of a name ("bfloat16", "half", "torch.float16", ...
    any case) or a ``torch.dtype``. ValueError naming the accepted names for anything else."""
    text = str(value).strip().lower().removeprefix("torch.")
    try:
        return _ALIASES[text]
    except KeyError:
        raise ValueError(
            f"unknown precision {value!r}; use one of {', '.join(PRECISIONS)} "
            f"(also accepted: {', '.join(sorted(set(_ALIASES) - set(PRECISIONS)))}, or one of those torch dtypes)"
        ) from None


def resolve_dtype(value: Any = None, device: Any = None) -> torch.dtype:
    """The ``torch.dtype`` for ``value``: a name (see :func:`precision_name`), a ``torch.dtype``, or
    None / "auto" for the device's default (:func:`default_precision`)."""
    import torch

    if isinstance(value, torch.dtype):
        name = precision_name(value)  # refuses float64, int8, ...
    elif value is None or str(value).strip().lower() == "auto":
        name = default_precision(device)
    else:
        name = precision_name(value)
    return getattr(torch, _TORCH_NAMES[name])

"""The metrics of the paper's Table 1 and how each one is computed (docs/method.md#evaluation).

``psnr`` and ``ssim`` are built in (numpy, :mod:`codsr.evaluation.full_reference`); the learned
metrics run through pyiqa, pinned to the variants the paper names. This table is the single
source of names, directions, display labels and pyiqa variant names for the CLI, the reports
and the JSON sidecar.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricSpec:
    """How one Table 1 metric is computed and displayed."""

    name: str  # our name (CLI, CSV column)
    label: str  # Table 1 row label
    higher_is_better: bool
    needs_gt: bool  # full-reference
    backend: str  # "builtin" | "pyiqa"
    pyiqa_name: str | None = None  # pyiqa.create_metric name
    decimals: int = 4  # as printed in the paper's Table 1
    description: str = ""

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


def _spec(
    name: str, label: str, higher: bool, fr: bool, pyiqa_name: str | None = None, **kw: Any
) -> MetricSpec:
    backend = "builtin" if pyiqa_name is None else "pyiqa"
    return MetricSpec(
        name, label, higher_is_better=higher, needs_gt=fr, backend=backend, pyiqa_name=pyiqa_name, **kw
    )


#: Table 1 order. higher = ↑; fr = full-reference (needs ground truth).
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _spec("psnr", "PSNR (dB)", higher=True, fr=True, decimals=2,
              description="Y-channel (BT.601) PSNR, whole image, pyiqa-compatible (eps 1e-8)"),
        _spec("ssim", "SSIM", higher=True, fr=True,
              description="Y-channel (BT.601, rounded) SSIM, Gaussian 11x11 sigma 1.5, valid window"),
        _spec("lpips", "LPIPS", higher=False, fr=True, pyiqa_name="lpips", description="LPIPS v0.1, AlexNet"),
        _spec("dists", "DISTS", higher=False, fr=True, pyiqa_name="dists"),
        _spec("niqe", "NIQE", higher=False, fr=False, pyiqa_name="niqe", decimals=2),
        _spec("musiq", "MUSIQ", higher=True, fr=False, pyiqa_name="musiq", decimals=2, description="KonIQ-10k"),
        _spec("maniqa", "MANIQA", higher=True, fr=False, pyiqa_name="maniqa-pipal", description="PIPAL"),
        _spec("clipiqa", "CLIPQA", higher=True, fr=False, pyiqa_name="clipiqa+_vitL14_512",
              description="CLIP-IQA+ ViT-L/14 512 ('CLIPQA' / 'CLIPQA+' in the paper)"),
    )
}  # fmt: skip

# Other spellings users type (paper labels, pyiqa names).
ALIASES: dict[str, str] = {
    "clipqa": "clipiqa",
    "clipqa+": "clipiqa",
    "clipiqa+": "clipiqa",
    "clipiqa+_vitl14_512": "clipiqa",
    "maniqa-pipal": "maniqa",
    "psnry": "psnr",
    "lpips-alex": "lpips",
}

TABLE1_ORDER: tuple[str, ...] = tuple(METRICS)


def resolve_metric(name: str) -> MetricSpec:
    """The spec for ``name`` (case-insensitive, aliases accepted)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METRICS:
        raise ValueError(
            f"unknown metric {name!r}; choose from {', '.join(METRICS)} (aliases: {', '.join(ALIASES)})"
        )
    return METRICS[key]


def parse_metric_list(names: str | Iterable[str]) -> list[MetricSpec]:
    """Parse ``"psnr,ssim,lpips"`` (or a list) into specs in Table 1 order, without duplicates."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    specs = {resolve_metric(n).name for n in names}
    if not specs:
        raise ValueError("no metrics selected; pass e.g. --metrics psnr,ssim")
    return [METRICS[n] for n in TABLE1_ORDER if n in specs]


def default_metric_names(*, pyiqa_available: bool, has_gt: bool) -> list[str]:
    """The metrics run when none are requested: every one that can run here.

    Without pyiqa that is PSNR and SSIM (which need ground truth); the learned metrics are only
    added when pyiqa imports (their weights may still be missing, which then raises clearly).
    """
    names = [n for n, s in METRICS.items() if (s.backend == "builtin" or pyiqa_available)]
    return [n for n in names if has_gt or not METRICS[n].needs_gt]

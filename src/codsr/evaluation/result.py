"""Containers for evaluation results: per-image scores, means, and the provenance record."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from codsr.evaluation.metrics import METRICS, MetricSpec


@dataclass
class ImageScores:
    """Scores of one prediction (file names only; folders are in the provenance record)."""

    image: str
    gt: str | None
    pair_rule: str
    resized: bool
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Everything one evaluation produced; ``record`` is the JSON sidecar minus the scores."""

    dataset: str
    method: str
    metrics: list[str]
    images: list[ImageScores]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def specs(self) -> list[MetricSpec]:
        return [METRICS[m] for m in self.metrics]

    def values(self, metric: str) -> list[float]:
        """Per-image values of one metric, in image order."""
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} was not evaluated (have {', '.join(self.metrics)})")
        return [im.scores[metric] for im in self.images]

    def mean(self, metric: str) -> float:
        """Arithmetic mean over images (NaN when there are none)."""
        vals = self.values(metric)
        return math.fsum(vals) / len(vals) if vals else float("nan")

    @property
    def means(self) -> dict[str, float]:
        return {m: self.mean(m) for m in self.metrics}

    def to_dict(self) -> dict[str, Any]:
        """The JSON sidecar: provenance record plus means and the pairing of every image."""
        return {
            **self.record,
            "dataset": self.dataset,
            "method": self.method,
            "num_images": len(self.images),
            "means": self.means,
            "images": [
                {"image": im.image, "gt": im.gt, "pair_rule": im.pair_rule, "resized_to_gt": im.resized}
                for im in self.images
            ],
        }

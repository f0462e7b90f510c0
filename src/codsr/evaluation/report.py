"""Writing evaluation results: per-image CSV, Table 1 markdown, JSON sidecar."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from codsr.atomic import atomic_write_json, atomic_write_text
from codsr.evaluation.metrics import METRICS, TABLE1_ORDER
from codsr.evaluation.result import EvaluationResult

CSV_NAME = "per_image.csv"
MARKDOWN_NAME = "summary.md"
JSON_NAME = "evaluation.json"


def per_image_csv(result: EvaluationResult) -> str:
    """CSV text: an ``image`` column (prediction file name) and one column per metric (6 decimals)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *result.metrics])
    for im in result.images:
        writer.writerow([im.image, *(f"{im.scores[m]:.6f}" for m in result.metrics)])
    return buf.getvalue()


def format_value(metric: str, value: float) -> str:
    """A mean as printed in the paper's Table 1 (PSNR/NIQE/MUSIQ 2 decimals, others 4)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{METRICS[metric].decimals}f}"


def table1_markdown(results: Sequence[EvaluationResult]) -> str:
    """The paper's Table 1 layout: rows = dataset × metric (with ↑/↓), columns = methods.

    Several results (e.g. methods × datasets) share one table; a missing cell prints "-".
    """
    if not results:
        raise ValueError("table1_markdown: no results")
    methods = list(dict.fromkeys(r.method for r in results))
    datasets = list(dict.fromkeys(r.dataset for r in results))
    cell = {(r.dataset, r.method): r for r in results}
    lines = [
        "| Dataset | Metric | " + " | ".join(methods) + " |",
        "|---|---|" + "---:|" * len(methods),
    ]
    for ds in datasets:
        present = {m for r in results if r.dataset == ds for m in r.metrics}
        first = True
        for metric in (m for m in TABLE1_ORDER if m in present):
            spec = METRICS[metric]
            row = [ds if first else "", f"{spec.label} {spec.arrow}"]
            for method in methods:
                r = cell.get((ds, method))
                row.append(format_value(metric, r.mean(metric)) if r and metric in r.metrics else "-")
            lines.append("| " + " | ".join(row) + " |")
            first = False
    counts = ", ".join(f"{r.dataset}/{r.method}: {len(r.images)} images" for r in results)
    lines += [
        "",
        f"↑ higher is better, ↓ lower is better. Means over {counts}.",
        "PSNR/SSIM on the BT.601 Y channel, whole image (no border crop); predictions resized to the "
        "ground-truth size with bicubic only where shapes differ. Learned metrics via pyiqa "
        "(LPIPS = lpips/AlexNet, MANIQA = maniqa-pipal, CLIPQA = clipiqa+_vitL14_512). "
        "Full provenance in evaluation.json.",
    ]
    return "\n".join(lines) + "\n"


def write_reports(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``per_image.csv``, ``summary.md`` and ``evaluation.json`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / CSV_NAME, "markdown": out / MARKDOWN_NAME, "json": out / JSON_NAME}
    atomic_write_text(paths["csv"], per_image_csv(result))
    atomic_write_text(paths["markdown"], table1_markdown([result]))
    atomic_write_json(paths["json"], result.to_dict(), indent=2, allow_nan=True)
    return paths

"""Evaluate a folder of SR outputs with the paper's Table 1 protocol (docs/method.md#evaluation)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codsr.evaluation import pyiqa_backend
from codsr.evaluation.full_reference import psnr_y, ssim_y
from codsr.evaluation.images import load_rgb_u8, resize_to
from codsr.evaluation.metrics import (
    METRICS,
    MetricSpec,
    default_metric_names,
    parse_metric_list,
)
from codsr.evaluation.pairing import ImagePair, pair_folders
from codsr.evaluation.provenance import (
    find_run_manifest,
    package_versions,
    protocol_record,
    seed_from_manifest,
)
from codsr.evaluation.report import write_reports
from codsr.evaluation.result import EvaluationResult, ImageScores

_BUILTIN: dict[str, Callable[[Any, Any], float]] = {"psnr": psnr_y, "ssim": ssim_y}

ProgressFn = Callable[[int, int, ImageScores], None]


def select_metrics(metrics: str | Sequence[str] | None, *, has_gt: bool) -> list[MetricSpec]:
    """The requested metrics, or by default every metric that can run here.

    Default: PSNR and SSIM (with ground truth), plus each pyiqa metric whose weights are already
    cached, when pyiqa is installed. Asking for a full-reference metric without ground truth is
    an error.
    """
    if metrics is None or (not isinstance(metrics, str) and len(metrics) == 0):
        available = pyiqa_backend.pyiqa_available()
        names = [
            n
            for n in default_metric_names(pyiqa_available=available, has_gt=has_gt)
            if METRICS[n].backend == "builtin" or pyiqa_backend.weights_present(METRICS[n])
        ]
        if not names:
            raise ValueError(
                "no metric can run: PSNR/SSIM need ground truth (--gt) and no-reference metrics need "
                f"pyiqa ({pyiqa_backend.PYIQA_INSTALL_HINT}) with its weights cached"
            )
        return parse_metric_list(names)
    specs = parse_metric_list(metrics)
    needs_gt = [s.name for s in specs if s.needs_gt]
    if needs_gt and not has_gt:
        raise ValueError(
            f"full-reference metric(s) {', '.join(needs_gt)} need ground truth: pass gt_dir (CLI: --gt DIR) "
            "or choose no-reference metrics (niqe, musiq, maniqa, clipiqa)"
        )
    return specs


# Folder names that say nothing about the dataset/method; the parent folder's name is used instead.
_GENERIC_DIR_NAMES = frozenset(
    {"hr", "gt", "hq", "test_hr", "test_gt", "target", "images", "outputs", "output", "sr", "results"}
)


def _label_from_dir(path: Path) -> str:
    path = path.resolve()
    if path.name.casefold() in _GENERIC_DIR_NAMES and path.parent.name:
        return path.parent.name
    return path.name


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_pairs(
    pairs: Sequence[ImagePair],
    specs: Sequence[MetricSpec],
    *,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[ImageScores], dict[str, Any]]:
    """Score every pair; returns per-image scores and the per-metric provenance records.

    pyiqa metrics are created before the first image so that a missing package or weight file
    fails at once, not after minutes of work.
    """
    learned = [s for s in specs if s.backend == "pyiqa"]
    models: dict[str, Any] = {}
    if learned:
        device = device or _default_device()
        for spec in learned:
            models[spec.name] = pyiqa_backend.create_pyiqa_metric(spec, device=device)
    images: list[ImageScores] = []
    for i, pair in enumerate(pairs):
        pred = load_rgb_u8(pair.pred)
        gt = load_rgb_u8(pair.gt) if pair.gt is not None else None
        pred_fr = pred
        resized = False
        if gt is not None and pred.shape != gt.shape:
            pred_fr = resize_to(pred, gt.shape[:2])
            resized = True
        scores: dict[str, float] = {}
        for spec in specs:
            if spec.backend == "builtin":
                scores[spec.name] = _BUILTIN[spec.name](pred_fr, gt)
            elif spec.needs_gt:
                scores[spec.name] = pyiqa_backend.score_pyiqa(models[spec.name], pred_fr, gt)
            else:
                scores[spec.name] = pyiqa_backend.score_pyiqa(models[spec.name], pred)
        item = ImageScores(
            image=pair.pred.name,
            gt=None if pair.gt is None else pair.gt.name,
            pair_rule=pair.rule,
            resized=resized,
            scores=scores,
        )
        images.append(item)
        if progress is not None:
            progress(i + 1, len(pairs), item)
    metric_records = {}
    for spec in specs:
        rec: dict[str, Any] = {
            "label": spec.label,
            "higher_is_better": spec.higher_is_better,
            "full_reference": spec.needs_gt,
            "implementation": "codsr.evaluation (numpy)" if spec.backend == "builtin" else "pyiqa",
            "pyiqa_name": spec.pyiqa_name,
            "description": spec.description,
        }
        if spec.backend == "pyiqa":
            rec["device"] = device
            rec["weights"] = pyiqa_backend.weight_file_records(spec)
        metric_records[spec.name] = rec
    return images, metric_records


def evaluate_dirs(
    pred_dir: str | Path,
    gt_dir: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    *,
    dataset: str | None = None,
    method: str | None = None,
    device: str | None = None,
    seed: int | None = None,
    manifest: str | Path | None = None,
    allow_unpaired: bool = False,
    progress: ProgressFn | None = None,
    command: Sequence[str] | None = None,
) -> EvaluationResult:
    """Evaluate SR outputs in ``pred_dir`` against ``gt_dir`` (Table 1 protocol, docs/method.md#evaluation).

    Args:
        pred_dir: folder of SR outputs (not recursive).
        gt_dir: folder of ground truths, paired by file name (see :mod:`codsr.evaluation.pairing`);
            None for no-reference metrics only.
        metrics: names (``"psnr,ssim,lpips"`` or a list); None = every metric that can run here.
        out_dir: where to write ``per_image.csv``, ``summary.md`` and ``evaluation.json``.
        dataset, method: column labels for the Table 1 summary (default: the folder names).
        device: torch device for pyiqa metrics (default cuda if available, else cpu).
        seed: seed that produced the outputs, recorded only; by default read from a
            ``benchmark_manifest.json`` in or beside ``pred_dir``, or from ``manifest``.
        manifest: JSON run manifest to read the seed from.
        allow_unpaired: evaluate only matched pairs instead of raising on unmatched files.
        progress: called after each image with (done, total, scores).
        command: the command line, recorded in the sidecar.

    Raises:
        PairingError: the folders do not pair one-to-one (and ``allow_unpaired`` is False).
        PyiqaNotInstalledError, MetricWeightsMissingError: a learned metric cannot run.
    """
    pred_dir = Path(pred_dir)
    gt_path = None if gt_dir is None else Path(gt_dir)
    specs = select_metrics(metrics, has_gt=gt_path is not None)
    report = pair_folders(pred_dir, gt_path, allow_unpaired=allow_unpaired)

    seed_source = "argument" if seed is not None else None
    manifest_path = Path(manifest) if manifest is not None else find_run_manifest(pred_dir)
    if seed is None and manifest_path is not None:
        seed = seed_from_manifest(manifest_path)
        seed_source = f"manifest {manifest_path}" if seed is not None else None

    images, metric_records = evaluate_pairs(report.pairs, specs, device=device, progress=progress)
    record: dict[str, Any] = {
        "format": "codsr-evaluation/1",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "pred_dir": str(pred_dir.resolve()),
        "gt_dir": None if gt_path is None else str(gt_path.resolve()),
        "metrics": metric_records,
        "protocol": protocol_record(),
        "seed": seed,
        "seed_source": seed_source,
        "run_manifest": None if manifest_path is None else str(manifest_path),
        "unpaired": {
            "predictions": [p.name for p in report.unmatched_pred],
            "ground_truths": [p.name for p in report.unmatched_gt],
        },
        "versions": package_versions(),
    }
    result = EvaluationResult(
        dataset=dataset or _label_from_dir(gt_path if gt_path is not None else pred_dir),
        method=method or _label_from_dir(pred_dir),
        metrics=[s.name for s in specs],
        images=images,
        record=record,
    )
    if out_dir is not None:
        write_reports(result, out_dir)
    return result

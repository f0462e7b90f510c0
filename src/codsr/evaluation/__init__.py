"""Evaluation by the paper's Table 1 protocol (docs/method.md#evaluation), with every number's provenance.

- :func:`psnr_y`, :func:`ssim_y`: Y-channel (BT.601) PSNR/SSIM of uint8 RGB arrays, numpy only,
  reproducing pyiqa's ``psnr``/``ssim`` (``test_y_channel=True, color_space='ycbcr'``).
- :func:`evaluate_dirs`: pair a prediction folder with a ground-truth folder, score it, write
  ``per_image.csv``, ``summary.md`` (Table 1 layout) and ``evaluation.json``.
- Learned metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPQA) through the optional pyiqa extra.
- :func:`restore_folder`, :func:`run_benchmark`: resumable "restore a benchmark folder, then
  evaluate it" with per-image seeds (:func:`image_seed`, the formula ``codsr upscale`` uses).
"""

from codsr.evaluation.benchmark import (
    RestoreSummary,
    ResumeMismatchError,
    make_pipeline_restorer,
    restore_folder,
    run_benchmark,
)
from codsr.evaluation.color import rgb_to_y, rgb_to_y_u8
from codsr.evaluation.evaluate import evaluate_dirs, select_metrics
from codsr.evaluation.full_reference import psnr, psnr_y, ssim, ssim_y
from codsr.evaluation.images import list_images, load_rgb_u8, resize_to
from codsr.evaluation.metrics import METRICS, MetricSpec, parse_metric_list, resolve_metric
from codsr.evaluation.pairing import ImagePair, PairingError, PairingReport, pair_folders, pair_images
from codsr.evaluation.pyiqa_backend import (
    MetricsUnavailableError,
    MetricWeightsMissingError,
    PyiqaNotInstalledError,
)
from codsr.evaluation.report import table1_markdown, write_reports
from codsr.evaluation.result import EvaluationResult, ImageScores
from codsr.seeding import image_seed

__all__ = [
    "METRICS",
    "EvaluationResult",
    "ImagePair",
    "ImageScores",
    "MetricSpec",
    "MetricWeightsMissingError",
    "MetricsUnavailableError",
    "PairingError",
    "PairingReport",
    "PyiqaNotInstalledError",
    "RestoreSummary",
    "ResumeMismatchError",
    "evaluate_dirs",
    "image_seed",
    "list_images",
    "load_rgb_u8",
    "make_pipeline_restorer",
    "pair_folders",
    "pair_images",
    "parse_metric_list",
    "psnr",
    "psnr_y",
    "resize_to",
    "resolve_metric",
    "restore_folder",
    "rgb_to_y",
    "rgb_to_y_u8",
    "run_benchmark",
    "select_metrics",
    "ssim",
    "ssim_y",
    "table1_markdown",
    "write_reports",
]

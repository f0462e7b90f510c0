"""Run a restorer over a paired LQ/GT benchmark folder and evaluate it, resumably.

The restoring part takes any callable ``restore(pil_rgb, seed) -> pil`` so it can be tested with
a trivial restorer (bicubic) and used with :class:`codsr.CODSRPipeline` through
:func:`make_pipeline_restorer`.

Reproducibility: each image gets its own seed, :func:`codsr.seeding.image_seed` of the run's base
seed and the LQ file name (the same formula ``codsr upscale`` uses), so a run that is interrupted
and resumed produces exactly the files an uninterrupted run would, in any order. Outputs and the
manifest are written atomically (:mod:`codsr.atomic`), so a kill never leaves a truncated image
that a resumed run would skip. ``benchmark_manifest.json`` records the settings and the seed rule;
resuming with different settings is refused (mixing outputs of two configurations would silently
corrupt the benchmark).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from codsr.atomic import atomic_write, atomic_write_json, remove_temp_files
from codsr.evaluation.images import list_images, load_rgb_u8
from codsr.evaluation.provenance import RUN_MANIFEST_NAME, package_versions
from codsr.evaluation.result import EvaluationResult
from codsr.seeding import SEED_RULE, image_seed

RestoreFn = Callable[[Image.Image, int], Image.Image]
ProgressFn = Callable[[int, int, str, bool], None]  # (done, total, file name, skipped)

IMAGES_SUBDIR = "images"
METRICS_SUBDIR = "metrics"


class ResumeMismatchError(RuntimeError):
    """The output folder holds a run made with different settings."""


def output_name(lq_path: Path) -> str:
    """Output file name for an LQ file: same stem, always PNG (lossless)."""
    return Path(lq_path).stem + ".png"


def save_image_atomic(img: Image.Image, path: Path) -> None:
    """Save as PNG atomically (:func:`codsr.atomic.atomic_write`)."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


@dataclass
class RestoreSummary:
    """What :func:`restore_folder` did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _load_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResumeMismatchError(
            f"run manifest {path} is not valid JSON ({exc}); pass overwrite to start over"
        ) from exc


def restore_folder(
    lq_dir: str | Path,
    out_dir: str | Path,
    restore: RestoreFn,
    *,
    seed: int = 42,
    config: Mapping[str, Any] | None = None,
    manifest_path: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> RestoreSummary:
    """Restore every image of ``lq_dir`` into ``out_dir`` (``<stem>.png``), skipping existing outputs.

    Args:
        lq_dir: folder of low-quality inputs (not recursive).
        out_dir: folder for the outputs (created).
        restore: ``restore(pil_rgb, image_seed) -> PIL image``.
        seed: base seed; each image uses :func:`codsr.seeding.image_seed` (seed, LQ file name).
        config: settings that determine the outputs (model, checkpoint, scale, ...); stored in the
            manifest and compared on resume.
        manifest_path: the run manifest (default ``out_dir/benchmark_manifest.json``).
        overwrite: recompute every image even if its output exists, and replace the manifest.
        progress: called after each image with (done, total, file name, skipped).

    Raises:
        ResumeMismatchError: ``out_dir`` holds outputs of a run with another seed/config, or
            outputs without a manifest.
    """
    lq_dir, out_dir = Path(lq_dir), Path(out_dir)
    lqs = list_images(lq_dir)
    if not lqs:
        raise FileNotFoundError(f"no images in LQ folder {lq_dir}")
    names: dict[str, Path] = {}
    for p in lqs:
        other = names.setdefault(output_name(p), p)
        if other != p:
            raise ValueError(f"LQ files {other.name} and {p.name} would both be written as {output_name(p)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir, recursive=False)
    manifest_path = Path(manifest_path) if manifest_path is not None else out_dir / RUN_MANIFEST_NAME
    # JSON round trip: the comparison on resume sees exactly what the manifest stores.
    config = json.loads(json.dumps(dict(config or {})))

    previous = None if overwrite else _load_manifest(manifest_path)
    existing = [n for n in names if (out_dir / n).exists()]
    if previous is None and existing and not overwrite:
        raise ResumeMismatchError(
            f"{out_dir} already holds {len(existing)} output(s) (e.g. {existing[0]}) but no run manifest "
            f"{manifest_path.name}; choose an empty folder or pass overwrite (CLI: --overwrite)"
        )
    if previous is not None:
        diffs = {
            k: (previous.get("config", {}).get(k), config.get(k))
            for k in set(previous.get("config", {})) | set(config)
            if previous.get("config", {}).get(k) != config.get(k)
        }
        if previous.get("seed") != seed:
            diffs["seed"] = (previous.get("seed"), seed)
        if previous.get("seed_rule") != SEED_RULE:  # made with another per-image seed formula
            diffs["seed_rule"] = (previous.get("seed_rule"), SEED_RULE)
        if diffs:
            shown = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise ResumeMismatchError(
                f"{out_dir} holds a run with other settings ({shown}); resume with the same settings, "
                "use another output folder, or pass overwrite (CLI: --overwrite)"
            )

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    previous = previous or {}
    manifest: dict[str, Any] = {
        "format": "codsr-benchmark/1",
        "created_utc": previous.get("created_utc") or now,
        "lq_dir": str(lq_dir.resolve()),
        "out_dir": str(out_dir.resolve()),
        "seed": seed,
        "seed_rule": SEED_RULE,
        "config": config,
        # One entry per (resumed) session: a resume under other package versions stays visible.
        "sessions": [*previous.get("sessions", []), {"started_utc": now, "versions": package_versions()}],
        "images": dict(previous.get("images", {})),
    }
    atomic_write_json(manifest_path, manifest)

    summary = RestoreSummary(out_dir=out_dir)
    start = time.perf_counter()
    for i, (name, lq_path) in enumerate(names.items()):
        target = out_dir / name
        if target.exists() and not overwrite:
            summary.skipped.append(name)
            if progress is not None:
                progress(i + 1, len(names), name, True)
            continue
        seed_i = image_seed(seed, lq_path.name)
        lq = Image.fromarray(load_rgb_u8(lq_path))
        t0 = time.perf_counter()
        out = restore(lq, seed_i)
        if not isinstance(out, Image.Image):
            raise TypeError(f"restore() must return a PIL.Image for {lq_path.name}, got {type(out).__name__}")
        save_image_atomic(out, target)
        manifest["images"][name] = {
            "lq": lq_path.name,
            "seed": seed_i,
            "size": list(out.size),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_json(manifest_path, manifest)
        summary.written.append(name)
        if progress is not None:
            progress(i + 1, len(names), name, False)
    summary.seconds = time.perf_counter() - start
    return summary


def run_benchmark(
    lq_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path,
    restore: RestoreFn,
    *,
    seed: int = 42,
    config: Mapping[str, Any] | None = None,
    metrics: str | Sequence[str] | None = None,
    dataset: str | None = None,
    method: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    allow_unpaired: bool = False,
    progress: ProgressFn | None = None,
    command: Sequence[str] | None = None,
) -> tuple[RestoreSummary, EvaluationResult]:
    """Restore ``lq_dir`` into ``out_dir/images`` (resumable), then evaluate against ``gt_dir``.

    Layout: ``out_dir/images/*.png``, ``out_dir/benchmark_manifest.json``, and the reports of
    :func:`~codsr.evaluation.evaluate.evaluate_dirs` in ``out_dir/metrics/``.
    """
    from codsr.evaluation.evaluate import evaluate_dirs, select_metrics
    from codsr.evaluation.pyiqa_backend import import_pyiqa

    out_dir = Path(out_dir)
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    # Fail before hours of restoration, not after: unknown metric names, missing pyiqa.
    if any(spec.backend == "pyiqa" for spec in select_metrics(metrics, has_gt=True)):
        import_pyiqa()
    manifest_path = out_dir / RUN_MANIFEST_NAME
    summary = restore_folder(
        lq_dir,
        out_dir / IMAGES_SUBDIR,
        restore,
        seed=seed,
        config=config,
        manifest_path=manifest_path,
        overwrite=overwrite,
        progress=progress,
    )
    result = evaluate_dirs(
        out_dir / IMAGES_SUBDIR,
        gt_dir,
        metrics=metrics,
        out_dir=out_dir / METRICS_SUBDIR,
        dataset=dataset,
        method=method,
        device=device,
        seed=seed,
        manifest=manifest_path,
        allow_unpaired=allow_unpaired,
        command=command,
    )
    return summary, result


def make_pipeline_restorer(
    pipe: Any,
    *,
    upscale: int = 4,
    timestep: int = 100,
    prompt: str | None = None,
    color_fix: str = "adain",
) -> RestoreFn:
    """Wrap a :class:`codsr.CODSRPipeline` as ``restore(pil, seed)``.

    Each call seeds one CPU ``torch.Generator`` (docs/method.md#generator-forward: posterior noise
    first, RGPA noise second, both from this generator).
    """
    import torch

    def restore(img: Image.Image, seed: int) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(
            img,
            upscale=upscale,
            prompt=prompt,
            timestep=timestep,
            color_fix=color_fix,
            generator=generator,
            output_type="pil",
        )
        # Accept diffusers-style outputs (``.images``) and one-element lists as well as a bare image.
        out = getattr(out, "images", out)
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        return out

    return restore

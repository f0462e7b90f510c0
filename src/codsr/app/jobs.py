"""Run the app's jobs: one image (result PNG + bicubic preview + what was done) or many (a zip).

Both go through :func:`codsr.batch.run_batch`, the engine of ``codsr upscale``: the same per-image
seeds (:func:`codsr.batch.image_seed` of the base seed and the file name), the same atomic writer
keeping 16-bit depth, alpha, ICC profile and EXIF (:func:`codsr.imageio.write_image`), and the
same out-of-memory retry with smaller tiles. A result is therefore what ``codsr upscale`` writes
for the same file and settings (:func:`codsr.app.settings.upscale_command`). No Gradio here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from codsr.app.progress import StageTracker
from codsr.app.settings import (
    JobSettings,
    OutputTooLargeError,
    check_output_size,
    describe_plan,
    plan_kwargs,
    processing_size,
    tile_plan,
)

# Limits of the batch tab's zip input: refuse archives that would unpack to more than this.
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_BYTES = 8 * 1024**3

EventFn = Callable[[str, int], None]


class JobError(RuntimeError):
    """A job that could not run or failed; the message is meant for the page."""


@dataclass
class SingleResult:
    """One restored image: ``output`` the full-resolution PNG, ``preview`` the bicubic-upscaled
    input at the same size (the slider's left side, 8-bit), ``plan`` the tiling actually used."""

    output: Path
    preview: Path
    seed: int
    seconds: float
    peak_bytes: int
    plan: str
    size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    """A batch: ``archive`` (zip of the results, None when nothing succeeded), the run's report."""

    archive: Path | None
    report: Any
    seconds: float
    refused: list[tuple[str, str]] = field(default_factory=list)


def _job_folder(work_dir: str | os.PathLike[str], prefix: str) -> Path:
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - any decoder error is the user's file
        raise JobError(f"cannot read {path.name}: not an image Pillow can decode ({exc})") from None


def _restorer(pipe: Any, settings: JobSettings, on_event: EventFn | None, plans: list[str], notes: list[str],
              region: dict[str, Any] | None = None):  # fmt: skip
    """``process(image, seed)`` for :func:`codsr.batch.run_batch`, as ``codsr upscale`` builds it;
    ``region``: ``control_map`` / ``noise_scale`` keyword arguments of the pipeline (docs/region-control.md)."""
    import torch

    from codsr.hostmem import configure_host_allocator
    from codsr.pipeline.tiling import MemoryBudgetError, restore_with_oom_retry

    def process(image, seed: int):
        chw = torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1)
        width, height = processing_size(chw.shape[-1], chw.shape[-2], settings.scale)
        try:
            plan = tile_plan(settings, pipe, chw.shape[-1], chw.shape[-2])
        except MemoryBudgetError as e:
            raise RuntimeError(str(e)) from None
        # the app is the application: the CLI's glibc heap rule, per image
        configure_host_allocator(budgeted=settings.max_memory not in (None, ""), tiled=plan.vae_tiled,
                                 device=pipe.device)  # fmt: skip

        current = {"plan": plan}

        def attempt(run_plan):
            current["plan"] = run_plan
            return pipe(
                chw,
                upscale=settings.scale,
                prompt=settings.prompt,
                tags=settings.tags,
                timestep=settings.timestep,
                color_fix=settings.color_fix,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
                **plan_kwargs(current["plan"]),
                **(region or {}),
            )

        def on_retry(_err: BaseException, smaller) -> None:
            notes.append(f"out of memory at {width}×{height}: retried with smaller tiles")

        if on_event is None:
            out = restore_with_oom_retry(attempt, plan, pipe.device, on_retry=on_retry)
        else:
            with StageTracker(pipe, on_event):
                out = restore_with_oom_retry(attempt, plan, pipe.device, on_retry=on_retry)
        plans.append(describe_plan(current["plan"]))
        return out

    return process


def restore_image(
    pipe: Any,
    path: str | os.PathLike[str],
    settings: JobSettings,
    work_dir: str | os.PathLike[str],
    *,
    max_output_pixels: int,
    on_event: EventFn | None = None,
    control_map: Any = None,
    noise_scale: float = 1.0,
) -> SingleResult:
    """Restore one image file into a new folder under ``work_dir`` and return what was done.

    ``control_map`` / ``noise_scale``: region control (docs/region-control.md), e.g. from the page's
    brush (:func:`codsr.app.region.control_map_from_editor`); a bad map is a :class:`JobError`.

    Raises :class:`~codsr.app.settings.OutputTooLargeError` (before any compute) when the output
    would exceed ``max_output_pixels``, and :class:`JobError` when the image cannot be read or
    restored (the reason is the batch runner's: "read: ...", "process: ...", "write: ...").
    """
    import torch

    from codsr.batch import run_batch
    from codsr.hostmem import PeakMemoryMeter

    src = Path(path)
    width, height = _image_size(src)
    check_output_size(width, height, settings.scale, max_output_pixels)
    job = _job_folder(work_dir, "job-")
    plans: list[str] = []
    notes: list[str] = []
    if settings.tile > 0 and settings.effective_tile_overlap != settings.tile_overlap:
        notes.append(f"UNet tile overlap lowered from {settings.tile_overlap} to {settings.effective_tile_overlap} px "
                     "(at most a third of the tile)")  # fmt: skip
    meter = PeakMemoryMeter(pipe.device)
    meter.reset()
    started = time.perf_counter()
    report = run_batch(
        [src],
        _restorer(pipe, settings, on_event, plans, notes,
                  None if control_map is None and noise_scale == 1.0 else
                  {"control_map": control_map, "noise_scale": noise_scale}),  # fmt: skip
        out_dir=job / "out",
        skip_existing=False,
        input_root=src.parent,
        ext="png",
        seed=settings.seed,
        progress=False,
    )
    seconds = time.perf_counter() - started
    peak = meter.peak()
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    if not report.done:
        reason = report.failed[0].reason if report.failed else (report.aborted or "no output was written")
        shutil.rmtree(job, ignore_errors=True)
        raise JobError(f"{src.name}: {reason}")
    output = report.done[0].output
    from codsr.batch import image_seed

    with Image.open(output) as im:
        size = im.size
    preview = job / "input-bicubic.png"
    _bicubic_preview(src, size, preview)
    return SingleResult(output, preview, image_seed(settings.seed, src.name), seconds, peak,
                        plans[-1] if plans else "", size, notes)  # fmt: skip


def _bicubic_preview(src: Path, size: tuple[int, int], dest: Path) -> None:
    """The input as the pipeline sees it (upright, 16-bit and gray decoded by codsr.imageio),
    resized bicubically to ``size``, as an 8-bit PNG (RGBA when the input has alpha)."""
    from codsr.imageio import read_image

    image = read_image(src)
    planes = [image.rgb] if image.alpha is None else [image.rgb, image.alpha[..., None]]
    arr = np.round(np.concatenate(planes, axis=-1).clip(0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr, "RGB" if image.alpha is None else "RGBA").resize(size, Image.BICUBIC).save(dest)


def _safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip's regular files under ``dest`` (no absolute paths, no ``..``, bounded size)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise JobError(f"{archive.name}: not a readable zip archive ({exc})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise JobError(f"{archive.name}: {len(members)} files, more than the limit of {MAX_ZIP_MEMBERS}")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise JobError(f"{archive.name}: unpacks to more than {MAX_ZIP_BYTES // 1024**3} GB")
        root = dest.resolve()
        out: list[Path] = []
        for m in members:
            target = (dest / m.filename).resolve()
            if root not in target.parents:
                raise JobError(f"{archive.name}: member {m.filename!r} points outside the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            out.append(target)
    return out


def restore_many(
    pipe: Any,
    files: Sequence[str | os.PathLike[str]],
    settings: JobSettings,
    work_dir: str | os.PathLike[str],
    *,
    max_output_pixels: int,
    on_image: Callable[[int, int, str], None] | None = None,
) -> BatchResult:
    """Restore image files and the images inside zip files; zip the results.

    Images over the size limit are refused (listed in ``refused``); unreadable or failing ones
    are in ``report.failed`` with the reason; the others are in the archive under their names
    (sub-folders of a zip kept). ``on_image(done, total, name)`` is called before each image.
    """
    from codsr.batch import collect_inputs, run_batch

    job = _job_folder(work_dir, "batch-")
    inputs_dir = job / "in"
    inputs_dir.mkdir()
    for i, f in enumerate(files):
        f = Path(f)
        if f.suffix.lower() == ".zip" or zipfile.is_zipfile(f):
            _safe_extract(f, inputs_dir / f.stem if len(files) > 1 else inputs_dir)
        else:
            # Each upload lives in its own folder: keep the name, avoid collisions between folders.
            target = inputs_dir / f.name
            if target.exists():
                target = inputs_dir / f"{i}" / f.name
                target.parent.mkdir()
            shutil.copyfile(f, target)
    found = collect_inputs(inputs_dir, recursive=True)
    accepted: list[Path] = []
    refused: list[tuple[str, str]] = []
    for p in found:
        name = p.relative_to(inputs_dir).as_posix()
        try:
            with Image.open(p) as im:
                w, h = im.size
            check_output_size(w, h, settings.scale, max_output_pixels)
        except OutputTooLargeError as exc:
            refused.append((name, str(exc)))
            continue
        except Exception:  # noqa: BLE001 - unreadable: let the batch runner report it
            pass
        accepted.append(p)
    total = len(accepted)
    done_count = {"n": 0}
    process = _restorer(pipe, settings, None, [], [])

    def counted(image, seed: int):
        if on_image is not None:
            on_image(done_count["n"], total, image.path.name)
        done_count["n"] += 1
        return process(image, seed)

    started = time.perf_counter()
    out_dir = job / "out"
    report = run_batch(accepted, counted, out_dir=out_dir, skip_existing=False, input_root=inputs_dir,
                       ext="auto", seed=settings.seed, progress=False)  # fmt: skip
    archive = None
    if report.done:
        archive = job / "codsr-results.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for item in report.done:
                zf.write(item.output, item.output.relative_to(out_dir).as_posix())
    return BatchResult(archive, report, time.perf_counter() - started, refused)


def tag_image(pipe: Any, path: str | os.PathLike[str], scale: float) -> str:
    """The tagger's tags for ``path`` at ``scale``, computed on the image the pipeline tags (the
    input after the release's resize chain), so they equal what ``codsr upscale --tagger`` uses.
    Empty when the pipeline has no tagger."""
    if pipe.tagger is None:
        return ""
    from codsr.imageio import read_image
    from codsr.pipeline.image_processing import release_input_size, resize_image, to_tensor01

    image = read_image(path)
    x = to_tensor01(np.ascontiguousarray(image.rgb))
    for size, resample in release_input_size(image.width, image.height, scale):
        x = resize_image(x, size, resample)
    return str(list(pipe.tagger(x.to(pipe.device)))[0])


def prune_jobs(work_dir: str | os.PathLike[str], keep: int = 16) -> None:
    """Delete all but the ``keep`` newest job folders under ``work_dir``."""
    folders = sorted((p for p in Path(work_dir).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in folders[:-keep] if keep else folders:
        shutil.rmtree(p, ignore_errors=True)

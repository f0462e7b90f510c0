"""Batch-job semantics for running a super-resolution step over folders of images (model-agnostic).

A run is: collect inputs → plan one output path per input (collisions and overwrites of inputs are
caught before anything is processed) → for each input, skip it if its output exists and
``skip_existing``, else read → ``process(image, seed)`` → atomic write. One bad image is reported
and the run goes on; Ctrl-C stops after cleaning up the half-written file; a full disk stops the
run (every later write would fail too). Per-image seeds come from the base seed and the image's
relative name (:func:`codsr.seeding.image_seed`, the formula the benchmark runner uses too), so a
resumed run produces the same outputs as an uninterrupted one.
See docs/batch.md for the rules in user terms.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import features

from codsr.imageio import (
    FORMAT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    probe_image,
    read_image,
    remove_temp_files,
    resolve_output_format,
    upscale_alpha,
    write_image,
)
from codsr.seeding import image_seed

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
    "BatchItem",
    "BatchReport",
    "ProcessFn",
    "collect_inputs",
    "image_seed",
    "input_root_for",
    "output_path_for",
    "plan_outputs",
    "run_batch",
    "sniff_image_format",
]

# IMAGE_EXTENSIONS (codsr.imageio): a file with one of these counts as an image input even if its
# content does not sniff as one (it is then reported as unreadable instead of silently ignored).
# ``ext`` choices for output_path_for / run_batch.
OUTPUT_EXTENSIONS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tif": "TIFF"}

_GLOB_CHARS = re.compile(r"[*?\[]")
# Errors after which every later write fails as well: stop instead of wasting hours of compute.
# (Permission problems are per folder, and the output folder itself is created up front.)
_FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}

ProcessFn = Callable[[LoadedImage, int], Any]
"""``process(image, seed) -> (rgb, alpha)``, or just ``rgb``: float arrays at the output size."""


# --------------------------------------------------------------------------------------------
# collecting inputs
# --------------------------------------------------------------------------------------------


def sniff_image_format(path: str | os.PathLike[str]) -> str | None:
    """Image format from the first bytes of a file ("PNG", "JPEG", ...), None if not recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is too weak (text files start with it); also require a known DIB header size.
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    ):
        return "BMP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis") and features.check("avif"):
        return "AVIF"
    return None


def _is_image_candidate(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS or sniff_image_format(path) is not None


def _natural_key(path: Path) -> tuple[Any, ...]:
    # "img2" before "img10"; the plain string breaks ties so the order is total.
    text = path.as_posix()
    parts = re.split(r"(\d+)", text.lower())
    return (tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts), text)


def _hidden(name: str) -> bool:
    # Dotfiles: our own temp files, macOS "._x.jpg" resource forks, .DS_Store, .thumbnails/...
    return name.startswith(".")


def input_root_for(spec: str | os.PathLike[str]) -> Path:
    """The folder that output sub-paths are relative to: the folder itself, a file's folder, or
    the part of a glob pattern before the first wildcard."""
    text = os.path.expanduser(os.fspath(spec))
    if _GLOB_CHARS.search(text) and not Path(text).exists():
        head: list[str] = []
        for part in Path(text).parts:
            if _GLOB_CHARS.search(part):
                break
            head.append(part)
        return Path(*head) if head else Path(".")
    p = Path(text)
    return p if p.is_dir() else p.parent


def collect_inputs(
    spec: str | os.PathLike[str],
    recursive: bool = False,
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Image files named by ``spec``: a file, a folder (``recursive``: with sub-folders) or a glob
    pattern (``**`` matches sub-folders when ``recursive``).

    A single file is always returned as is. From folders and globs, a file is an input if its
    extension is an image extension (:data:`IMAGE_EXTENSIONS`, any case) or its first bytes are
    an image signature (PNG, JPEG, GIF, WebP, TIFF, BMP), so files with missing or wrong
    extensions are found; hidden files and folders (names starting with ".") are skipped, and so
    is anything under an ``exclude`` folder (pass the output folder when it is inside the input
    folder). The result is de-duplicated and sorted naturally ("2.png" before "10.png").
    Raises FileNotFoundError when ``spec`` is neither an existing path nor a glob pattern.
    """
    text = os.path.expanduser(os.fspath(spec))
    path = Path(text)
    excluded = [Path(os.path.abspath(e)) for e in exclude]

    def keep(p: Path) -> bool:
        absolute = Path(os.path.abspath(p))
        return not any(absolute == e or e in absolute.parents for e in excluded)

    if path.is_file():
        return [path]
    found: list[Path] = []
    if path.is_dir():
        if recursive:
            for folder, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not _hidden(d)]  # os.walk honours the pruning
                found.extend(Path(folder) / name for name in files if not _hidden(name))
        else:
            found = [p for p in path.iterdir() if p.is_file() and not _hidden(p.name)]
    elif _GLOB_CHARS.search(text):
        found = [Path(m) for m in glob.glob(text, recursive=recursive) if Path(m).is_file()]
        found = [
            p for p in found if not any(_hidden(part) for part in p.parts[len(input_root_for(text).parts) :])
        ]
    else:
        raise FileNotFoundError(
            f"input {text!r} does not exist (give an image file, a folder or a glob pattern)"
        )
    unique = {os.path.abspath(p): p for p in found if keep(p) and _is_image_candidate(p)}
    return sorted(unique.values(), key=_natural_key)


# --------------------------------------------------------------------------------------------
# output names and seeds
# --------------------------------------------------------------------------------------------


def _relative(input_path: Path, input_root: Path) -> Path:
    try:
        return Path(os.path.abspath(input_path)).relative_to(os.path.abspath(input_root))
    except ValueError:  # not under the root (e.g. a single file given with another root)
        return Path(input_path.name)


def output_path_for(
    input_path: str | os.PathLike[str],
    input_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    suffix: str = "",
    ext: str = "auto",
) -> Path:
    """``out_dir / <sub-folders of input_path below input_root> / <stem><suffix><extension>``.

    ``ext``: "png", "jpg", "webp", "tif" or "auto". "auto" keeps the format detected from the
    input's content (a JPEG named ``.png`` gives ``.jpg``; formats we do not write — GIF, BMP,
    AVIF — give PNG). Either way the format is then resolved like ``write_image`` does (alpha
    with JPEG → PNG; 16-bit → PNG unless a plain-gray TIFF), so the planned path is the path that
    will be written. The input's own extension spelling (".jpeg", ".JPG", ".tiff") is kept when
    it names the chosen format; otherwise the canonical one is used.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    rel = _relative(input_path, Path(input_root))
    probe = probe_image(input_path)
    if ext == "auto":
        detected = probe.format if probe is not None else None
        if detected is None:  # unreadable: it will fail later; name it after its extension
            detected = next(
                (f for f, e in FORMAT_EXTENSIONS.items() if input_path.suffix.lower() in e), "PNG"
            )
        fmt = detected if detected in FORMAT_EXTENSIONS else "PNG"
    else:
        key = ext.lower().lstrip(".")
        key = {"jpeg": "jpg", "tiff": "tif"}.get(key, key)
        if key not in OUTPUT_EXTENSIONS:
            raise ValueError(f"unknown output extension {ext!r}; use auto, {', '.join(OUTPUT_EXTENSIONS)}")
        fmt = OUTPUT_EXTENSIONS[key]
    if probe is not None:
        fmt = resolve_output_format(
            fmt, has_alpha=probe.has_alpha, bit_depth=probe.bit_depth, gray=probe.is_gray
        )
    own = input_path.suffix
    extension = own if own.lower() in FORMAT_EXTENSIONS[fmt] else FORMAT_EXTENSIONS[fmt][0]
    return out_dir / rel.parent / f"{rel.stem}{suffix}{extension}"


def plan_outputs(
    inputs: Sequence[Path],
    input_root: Path,
    out_dir: Path,
    suffix: str = "",
    ext: str = "auto",
) -> list[Path]:
    """Output path for every input, with name collisions resolved and input overwrites refused.

    Inputs that would share an output (``a.jpg`` and ``a.png`` with ``ext="png"``) each get their
    own extension added to the stem (``a_jpg.png``, ``a_png.png``). Raises ValueError if an output
    would replace one of the inputs (same folder, no suffix, same extension).
    """
    planned = [output_path_for(p, input_root, out_dir, suffix, ext) for p in inputs]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, out in enumerate(planned):
        groups[os.path.normcase(os.path.abspath(out))].append(i)
    for members in groups.values():
        if len(members) > 1:
            for i in members:
                out, src = planned[i], inputs[i]
                tag = src.suffix.lstrip(".") or "noext"
                planned[i] = out.with_name(f"{_relative(src, input_root).stem}_{tag}{suffix}{out.suffix}")
    seen: dict[str, Path] = {}
    for src, out in zip(inputs, planned, strict=True):
        key = os.path.normcase(os.path.abspath(out))
        if key in seen:
            raise ValueError(f"inputs {seen[key]} and {src} both map to output {out}; rename one of them")
        seen[key] = src
    input_keys = {os.path.normcase(os.path.realpath(p)): p for p in inputs}
    for out in planned:
        key = os.path.normcase(os.path.realpath(out))
        if key in input_keys:
            raise ValueError(
                f"output {out} would overwrite input {input_keys[key]}; choose another output folder or set a suffix"
            )
    return planned


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class BatchItem:
    """One input's outcome: ``output`` is the file written / found; ``reason`` says why it was
    skipped or failed (failed items start with the stage: "read: ", "process: ", "write: ")."""

    input: Path
    output: Path | None = None
    seconds: float = 0.0
    reason: str = ""
    seed: int | None = None


@dataclass
class BatchReport:
    """What a run did. ``exit_code``: 0 all good, 1 some images failed, 3 the run was aborted by
    an output error that would repeat (disk full, read-only, permission), 130 interrupted."""

    done: list[BatchItem] = field(default_factory=list)
    skipped: list[BatchItem] = field(default_factory=list)
    failed: list[BatchItem] = field(default_factory=list)
    not_processed: list[Path] = field(default_factory=list)
    interrupted: bool = False
    aborted: str | None = None
    removed_temp_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.aborted:
            return 3
        return 1 if self.failed else 0

    def summary(self) -> str:
        lines = [
            f"{len(self.done)} done, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed"
            + (f", {len(self.not_processed)} not processed" if self.not_processed else "")
            + f" in {self.seconds:.1f} s"
        ]
        if self.interrupted:
            lines.append("interrupted: run again with skip-existing to resume")
        if self.aborted:
            lines.append(f"aborted: {self.aborted}")
        if self.failed:
            lines.append("failed:")
            lines.extend(f"  {item.input}: {item.reason}" for item in self.failed)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""

        def item(i: BatchItem) -> dict[str, Any]:
            return {"input": str(i.input), "output": None if i.output is None else str(i.output),
                    "seconds": round(i.seconds, 3), "reason": i.reason}  # fmt: skip

        return {
            "done": [item(i) for i in self.done],
            "skipped": [item(i) for i in self.skipped],
            "failed": [item(i) for i in self.failed],
            "not_processed": [str(p) for p in self.not_processed],
            "interrupted": self.interrupted,
            "aborted": self.aborted,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
        }


def _unpack_result(result: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(result, tuple):
        if len(result) != 2:
            raise ValueError(f"process must return rgb or (rgb, alpha), got a tuple of {len(result)}")
        return result[0], result[1]
    return result, None


def run_batch(
    inputs: Sequence[str | os.PathLike[str]],
    process: ProcessFn,
    *,
    out_dir: str | os.PathLike[str],
    skip_existing: bool,
    input_root: str | os.PathLike[str] | None = None,
    suffix: str = "",
    ext: str = "auto",
    seed: int = 0,
    quality: int = 95,
    keep_metadata: bool = True,
    progress: bool = True,
    outputs: Sequence[str | os.PathLike[str]] | None = None,
    on_item: Callable[[str, BatchItem], None] | None = None,
    remove_stale_temp: bool = True,
) -> BatchReport:
    """Run ``process`` over ``inputs`` and write one output per input into ``out_dir``.

    ``process(image, seed)`` gets a :class:`~codsr.imageio.LoadedImage` and the image's seed
    (:func:`image_seed` of ``seed`` and the path relative to ``input_root``) and returns
    ``(rgb, alpha)`` or ``rgb`` as float arrays in [0, 1] at the output size. If it returns no
    alpha for an image that has one, the input alpha is resized bicubically to the output size.
    Outputs keep the input's bit depth and grayness, and (``keep_metadata``) its ICC profile and
    EXIF. ``input_root`` defaults to the inputs' common folder (pass :func:`input_root_for` of the
    user's spec to keep sub-folders predictable). Temp files left in ``out_dir`` by a killed run
    are removed first. Planning errors (two inputs mapping to one output, an output replacing an
    input, a bad ``ext``) raise ValueError before anything runs; per-image problems are reported.
    Ctrl-C ends the run with ``interrupted=True`` (the image being written leaves no file).

    For runs split over workers (docs/scale-out.md): ``outputs`` gives each input's planned output
    (from :func:`plan_outputs` over the WHOLE input set, so names do not depend on the split);
    ``on_item(status, item)`` is called after each input with "done", "skipped" or "failed" (e.g.
    :meth:`codsr.scaleout.RunRecord.on_item`); ``remove_stale_temp=False`` skips the clean-up scan.
    The clean-up only removes temp files of writers that are gone (dead pid on this host, old on
    other hosts: :func:`codsr.atomic.remove_temp_files`), so workers may share ``out_dir``.
    """
    started = time.perf_counter()
    paths = [Path(p) for p in inputs]
    out_root = Path(out_dir)
    if input_root is None:
        input_root = (
            Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths])) if paths else out_root
        )
    root = Path(input_root)
    if outputs is None:
        outputs = plan_outputs(paths, root, out_root, suffix, ext)
    else:
        outputs = [Path(o) for o in outputs]
        if len(outputs) != len(paths):
            raise ValueError(f"outputs: {len(outputs)} paths for {len(paths)} inputs; give one per input")
    out_root.mkdir(parents=True, exist_ok=True)  # fail before any compute if it cannot be made
    report = BatchReport(removed_temp_files=remove_temp_files(out_root) if remove_stale_temp else [])
    for leftover in report.removed_temp_files:
        logger.info("removed leftover temp file %s", leftover)

    from tqdm.auto import tqdm  # import here: keeps `import codsr.batch` light for CLI --help

    bar = tqdm(total=len(paths), unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def note(message: str) -> None:
        if progress:
            bar.write(message, file=sys.stderr)
        else:
            logger.warning(message)

    index = 0
    try:
        for index, (src, out) in enumerate(zip(paths, outputs, strict=True)):
            bar.set_postfix_str(src.name, refresh=False)
            item_start = time.perf_counter()
            item_seed = image_seed(seed, _relative(src, root))
            if skip_existing and out.exists():
                report.skipped.append(BatchItem(src, out, 0.0, "output exists", item_seed))
                if on_item is not None:
                    on_item("skipped", report.skipped[-1])
                bar.update(1)
                continue
            final, failure = _process_one(src, out, root, process, seed, quality, keep_metadata)
            seconds = time.perf_counter() - item_start
            if failure is None:
                report.done.append(BatchItem(src, final, seconds, seed=item_seed))
                if on_item is not None:
                    on_item("done", report.done[-1])
            else:
                stage, reason, fatal = failure
                report.failed.append(BatchItem(src, None, seconds, f"{stage}: {reason}", item_seed))
                if on_item is not None:
                    on_item("failed", report.failed[-1])
                note(f"failed {src}: {stage}: {reason}")
                if fatal:
                    report.aborted = f"cannot write to {out.parent}: {reason}"
                    report.not_processed = paths[index + 1 :]
                    note(f"stopping: {report.aborted}")
                    break
            bar.update(1)
    except KeyboardInterrupt:
        report.interrupted = True
        report.not_processed = paths[index:]
        note(f"interrupted at {paths[index]}; no partial output was left")
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _process_one(
    src: Path,
    out: Path,
    root: Path,
    process: ProcessFn,
    seed: int,
    quality: int,
    keep_metadata: bool,
) -> tuple[Path | None, tuple[str, str, bool] | None]:
    """Read, process and write one image → (final path, None) or (None, (stage, reason, fatal))."""
    try:
        image = read_image(src)
    except ImageReadError as exc:
        return None, ("read", exc.reason, False)
    try:
        rgb, alpha = _unpack_result(process(image, image_seed(seed, _relative(src, root))))
    except Exception as exc:  # noqa: BLE001 - the caller's model may raise anything (OOM, ...)
        return None, ("process", f"{type(exc).__name__}: {exc}", False)
    try:
        if alpha is None and image.alpha is not None:
            alpha = upscale_alpha(image.alpha, np.shape(rgb)[:2])
        final = write_image(
            out,
            rgb,
            alpha,
            bit_depth=image.bit_depth,
            gray=image.is_gray,
            icc_profile=image.icc_profile if keep_metadata else None,
            exif=image.exif if keep_metadata else None,
            quality=quality,
        )
    except OSError as exc:
        return None, ("write", f"{type(exc).__name__}: {exc}", exc.errno in _FATAL_WRITE_ERRNOS)
    except (ValueError, TypeError) as exc:  # the process output was unusable
        return None, ("write", f"{type(exc).__name__}: {exc}", False)
    return final, None

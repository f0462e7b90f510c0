"""Precomputed TMG masks: crop definition, on-disk format, resumable shardable loop (docs/method.md#stage-2).

Layout under the output folder, for an image whose key (path relative to the data root, e.g.
``sub/0001.png``) is ``KEY``::

    KEY.json            sidecar, written last (atomically): its presence marks the item done
    KEY.masks/000.png   1-bit PNG mask of noun 0 at the crop size (only for status "ok")
    KEY.masks/001.png   ...
    summary-<i>-of-<n>.json   counts of the last run of shard i/n

Sidecar (``format`` 1)::

    {"format": 1, "image": KEY, "image_size": [H, W],
     "crop": {"top": t, "left": l, "size": C, "mode": "center"|"random", "seed": s},
     "caption": "...", "caption_source": "ram"|"file", "nouns": [...], "noun_backend": "spacy",
     "masks": [{"noun": "cat", "status": "ok", "file": "KEY.masks/000.png", "pixels": 1234,
                "boxes": [[x0, y0, x1, y1], ...], "scores": [...], "error": null}, ...],
     "models": {...}, "thresholds": {...}}

Crop: images smaller than C on a side are first mirror-padded at the bottom/right (reflect,
as the stage-1 dataset pads), then the C×C window at (top, left) is taken — the centre by
default (as the release's stage-2 data), or a position drawn from (seed, KEY). The stage-2
dataset re-applies exactly this crop, then flips image and masks together.

No pickle anywhere: masks are PNGs, metadata JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codsr.atomic import atomic_write, atomic_write_json
from codsr.seeding import image_seed
from codsr.tagging.tagfile import read_tag_table

SIDECAR_FORMAT = 1
CROP_MODES = ("center", "random")

__all__ = [
    "SIDECAR_FORMAT",
    "CROP_MODES",
    "CropBox",
    "source_root",
    "item_key",
    "sidecar_path",
    "mask_dir_for",
    "choose_crop",
    "apply_crop",
    "reflect_pad",
    "load_captions",
    "lookup_caption",
    "read_sidecar",
    "write_item",
    "load_masks",
    "parse_shard",
    "shard_items",
    "MaskJob",
    "precompute_masks",
]


@dataclass(frozen=True)
class CropBox:
    """C×C window at (top, left) of the bottom/right reflect-padded image."""

    top: int
    left: int
    size: int
    mode: str = "center"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"top": self.top, "left": self.left, "size": self.size, "mode": self.mode, "seed": self.seed}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CropBox:
        return cls(
            int(d["top"]), int(d["left"]), int(d["size"]), str(d.get("mode", "center")), int(d.get("seed", 0))
        )


# ---------------------------------------------------------------------- keys and paths
def source_root(source: str | os.PathLike) -> Path:
    """Folder that item keys are relative to: the folder itself, or a list/image file's folder."""
    p = Path(source)
    return p if p.is_dir() else p.parent


def item_key(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Stable POSIX key of an image: its path relative to ``root`` (``_abs/...`` when outside)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    try:
        return p.relative_to(r).as_posix()
    except ValueError:
        return "_abs/" + p.as_posix().lstrip("/").replace(":", "")


def sidecar_path(out_dir: str | os.PathLike, key: str) -> Path:
    return Path(out_dir) / f"{key}.json"


def mask_dir_for(out_dir: str | os.PathLike, key: str) -> Path:
    return Path(out_dir) / f"{key}.masks"


# ---------------------------------------------------------------------- crops
def choose_crop(height: int, width: int, size: int, key: str, mode: str = "center", seed: int = 0) -> CropBox:
    """The crop of an image of (height, width): centred, or drawn from (seed, key) — reproducible."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    h, w = max(height, size), max(width, size)
    if mode == "center":
        return CropBox((h - size) // 2, (w - size) // 2, size, mode, seed)
    rng = np.random.default_rng(image_seed(seed, key))  # the per-image seed of codsr upscale
    return CropBox(int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), size, mode, seed)


def reflect_pad(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad bottom/right to at least (height, width) by reflection, as the stage-1 dataset pads.

    ``a b c d | c b a`` (OpenCV's REFLECT_101); sides of one pixel repeat the edge.
    """
    ph, pw = max(0, height - arr.shape[0]), max(0, width - arr.shape[1])
    if not (ph or pw):
        return arr
    mode = "edge" if min(arr.shape[:2]) <= 1 else "reflect"
    return np.pad(arr, ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2), mode=mode)


def apply_crop(arr: np.ndarray, crop: CropBox) -> np.ndarray:
    """The crop of an (H, W, ...) array, padding first when the image is smaller than the crop."""
    arr = reflect_pad(arr, crop.size, crop.size)
    if crop.top + crop.size > arr.shape[0] or crop.left + crop.size > arr.shape[1]:
        raise ValueError(f"crop {crop} does not fit an image of {arr.shape[:2]}")
    return arr[crop.top : crop.top + crop.size, crop.left : crop.left + crop.size]


# ---------------------------------------------------------------------- captions
def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions from a JSON object {path: caption} or a TSV file (``path<TAB>caption`` per line).

    The TSV form is what ``codsr tag -o tags.tsv`` writes. Keys may be the image key (path
    relative to the data root), its file name, or an absolute path.
    """
    return read_tag_table(path, "--captions")


def lookup_caption(captions: Mapping[str, str], key: str, path: Path) -> str | None:
    """The caption of an image by key, absolute path, file name or key without extension."""
    for k in (key, str(path), str(path.resolve()), path.name, key.rsplit(".", 1)[0]):
        if k in captions:
            return captions[k]
    return None


# ---------------------------------------------------------------------- storage
def read_sidecar(out_dir: str | os.PathLike, key: str) -> dict[str, Any] | None:
    """The item's sidecar, or None when absent or unreadable (an unfinished item)."""
    path = sidecar_path(out_dir, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else None


def write_item(
    out_dir: str | os.PathLike,
    key: str,
    *,
    image_size: tuple[int, int],
    crop: CropBox,
    caption: str,
    caption_source: str,
    nouns: Sequence[str],
    noun_backend: str,
    results: Sequence[Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the masks of ``results`` (:class:`~codsr.stage2.grounding.NounMask`) and then the sidecar."""
    from PIL import Image

    mdir = mask_dir_for(out_dir, key)
    entries = []
    for i, res in enumerate(results):
        entry: dict[str, Any] = {
            "noun": res.noun,
            "status": res.status,
            "file": None,
            "pixels": res.pixels,
            "boxes": res.boxes,
            "scores": res.scores,
            "error": res.error,
        }
        if res.status == "ok":
            if res.mask is None or res.mask.shape != (crop.size, crop.size):
                raise ValueError(f"{key}: mask of {res.noun!r} is not {crop.size}×{crop.size}")
            mdir.mkdir(parents=True, exist_ok=True)
            rel = f"{Path(key).name}.masks/{i:03d}.png"
            png = Image.fromarray(np.asarray(res.mask, dtype=bool))
            atomic_write(mdir / f"{i:03d}.png", lambda f, png=png: png.save(f, format="PNG", optimize=True))
            entry["file"] = rel
        entries.append(entry)
    meta = {
        "format": SIDECAR_FORMAT,
        "image": key,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "crop": crop.to_json(),
        "caption": caption,
        "caption_source": caption_source,
        "nouns": list(nouns),
        "noun_backend": noun_backend,
        "masks": entries,
        **dict(extra or {}),
    }
    atomic_write_json(sidecar_path(out_dir, key), meta, indent=1)
    return meta


def load_masks(
    out_dir: str | os.PathLike, key: str, meta: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(N×C×C float32 masks, N bool "stored ok") of a sidecar; failed nouns get zero masks."""
    size = int(meta["crop"]["size"])
    entries = meta["masks"]
    masks = np.zeros((len(entries), size, size), dtype=np.float32)
    ok = np.zeros(len(entries), dtype=bool)
    base = sidecar_path(out_dir, key).parent
    from PIL import Image

    for i, entry in enumerate(entries):
        if entry.get("status") != "ok":
            continue
        path = base / entry["file"]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L")) > 127
        if arr.shape != (size, size):
            raise ValueError(
                f"mask {path} is {arr.shape}, expected {size}×{size} (from {sidecar_path(out_dir, key)})"
            )
        masks[i] = arr
        ok[i] = True
    return masks, ok


# ---------------------------------------------------------------------- sharding
def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n; None → (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from err
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def shard_items(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Every ``count``-th item starting at ``index`` (stable across runs for a sorted input)."""
    return list(items[index::count])


# ---------------------------------------------------------------------- the loop
@dataclass
class MaskJob:
    """Settings of one precompute run (see ``codsr masks --help``)."""

    out_dir: Path
    crop_size: int = 512
    crop_mode: str = "center"
    seed: int = 0
    noun_backend: str = "auto"
    overwrite: bool = False
    models: Mapping[str, Any] | None = None


def _summary_counts() -> dict[str, Any]:
    return {
        "items": 0,
        "done": 0,
        "skipped_existing": 0,
        "failed": 0,
        "nouns": 0,
        "status": {},
        "failures": [],
    }


def precompute_masks(
    paths: Sequence[Path],
    root: Path,
    job: MaskJob,
    segmenter,
    caption_fn: Callable[[str, Path, Any], tuple[str, str]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Caption, nouns and masks for every image of ``paths`` (one shard); returns the summary.

    ``caption_fn(key, path, crop_image) -> (caption, source)`` supplies the caption (RAM tags of
    the crop or a captions file); it may raise ``LookupError`` to fail just that item.
    ``segmenter.segment(image, nouns)`` returns one ``NounMask`` per noun. Items whose
    sidecar exists (same crop size) are skipped unless ``job.overwrite``.
    """
    from PIL import Image

    from codsr.data.datasets import load_image
    from codsr.stage2.nouns import available_backend, extract_nouns

    backend = available_backend(job.noun_backend)
    summary = _summary_counts()
    summary["noun_backend"] = backend
    for n, path in enumerate(paths, 1):
        key = item_key(path, root)
        summary["items"] += 1
        existing = read_sidecar(job.out_dir, key)
        if existing is not None and not job.overwrite and int(existing["crop"]["size"]) == job.crop_size:
            summary["skipped_existing"] += 1
            continue
        try:
            # the stage-2 dataset reads images with the same function, so crops match exactly
            rgb = load_image(path)
        except Exception as err:  # unreadable files fail the item, the run goes on
            _fail(summary, key, f"cannot read image: {type(err).__name__}: {err}", log)
            continue
        crop = choose_crop(rgb.shape[0], rgb.shape[1], job.crop_size, key, job.crop_mode, job.seed)
        crop_image = Image.fromarray(np.ascontiguousarray(apply_crop(rgb, crop)))
        try:
            caption, source = caption_fn(key, path, crop_image)
        except LookupError as err:
            _fail(summary, key, str(err), log)
            continue
        nouns = extract_nouns(caption, backend)
        results = segmenter.segment(crop_image, nouns) if nouns else []
        write_item(
            job.out_dir,
            key,
            image_size=(rgb.shape[0], rgb.shape[1]),
            crop=crop,
            caption=caption,
            caption_source=source,
            nouns=nouns,
            noun_backend=backend,
            results=results,
            extra={"models": dict(job.models or {})},
        )
        summary["done"] += 1
        summary["nouns"] += len(results)
        for res in results:
            summary["status"][res.status] = summary["status"].get(res.status, 0) + 1
        bad = [
            f"{r.noun}: {r.status}" + (f" ({r.error})" if r.error else "")
            for r in results
            if r.status != "ok"
        ]
        log(f"[{n}/{len(paths)}] {key}: {len(nouns)} nouns, {sum(r.status == 'ok' for r in results)} masks"
            + (f"; failed: {', '.join(bad)}" if bad else ""))  # fmt: skip
    return summary


def _fail(summary: dict[str, Any], key: str, reason: str, log: Callable[[str], None]) -> None:
    summary["failed"] += 1
    summary["failures"].append({"image": key, "reason": reason})
    log(f"{key}: FAILED: {reason}")


def write_summary(out_dir: Path, shard: tuple[int, int], summary: Mapping[str, Any]) -> Path:
    """``summary-<i>-of-<n>.json`` in the output folder."""
    path = Path(out_dir) / f"summary-{shard[0]}-of-{shard[1]}.json"
    atomic_write_json(path, summary, indent=1)
    return path

"""Training datasets for stage 1 (docs/method.md#stage-1): synthetic (Real-ESRGAN) and pre-degraded pairs.

Items are dicts (stack them with :func:`collate`)::

    {
        "hq": (3, C, C) float in [-1, 1],        # random C×C crop (default 512), random h-flip
        "lq": (3, C, C) float in [-1, 1],        # degraded ×scale then resized back to C×C
        "path": str,                             # HQ file
        "prompt": str,                           # prompt_fn(path, crop_box), default ""
        "crop_box": (4,) int64 (top, left, height, width) in the (padded) HQ image,
        "flipped": bool, "index": int,
        "num_skipped": int,                      # files skipped (corrupt / too small) to make it
    }

:class:`HQImageDataset` ``degrade_in`` modes: ``"worker"`` (default) degrades each crop in the
DataLoader worker and returns ``lq``; ``"batch"`` returns no ``lq`` but the sample's
``kernel1``/``kernel2``/``sinc_kernel`` (K, K) so that the training loop can run
:class:`codsr.data.degradation.BatchDegrader` on the GPU batch (``degrader(batch["hq"],
kernels=batch)``, as Real-ESRGAN does); ``"none"`` returns HQ only.

Reproducibility: every random choice of item ``i`` comes from a generator seeded by
``(seed, epoch, i)`` (:func:`derive_seed`), so items do not depend on the number of DataLoader
workers or the access order. Call ``set_epoch(e)`` before each epoch (with
``persistent_workers=True`` the workers keep their own copy of the dataset; leave it off or
re-create the loader so that the epoch reaches them).

Bad files: corrupt or unreadable images, and (with ``small_images="skip"``) images smaller than
the crop, are skipped with a ``UserWarning`` naming the file; the item then comes from the next
index. ``dataset.skipped`` maps path → reason for this process (each worker has its own copy);
``item["num_skipped"]`` lets the training loop sum them across workers.

Resizing the LQ back to the crop size (``lq_resize``, docs/training.md#lq-resize): ``"release"``
(default) follows the authors' training data loader: the 8-bit LQ crop is resized ×scale with
PIL (``Image.resize``) and a filter drawn from ``resize_back_modes`` (nearest, bilinear,
bicubic), the result rounded to 8 bits. ``"inference"`` uses what inference uses for every
input (``codsr.pipeline.image_processing.resize_image``): PIL bicubic in float, no rounding,
so training sees the same upsampler as inference. ``"torch"`` is ``torch.nn.functional.interpolate``
with a mode drawn from ``resize_back_modes`` (the earlier behaviour; its bicubic uses a = -0.75
where PIL's uses a = -0.5).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from codsr.data import kernels as K
from codsr.data.degradation import DegradationConfig, degrade, random_resize_back, sample_kernels
from codsr.imageio import IMAGE_EXTENSIONS  # the one list of image extensions (re-exported)

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "load_image",
    "pad_to_size",
    "derive_seed",
    "HQImageDataset",
    "PairedImageDataset",
    "collate",
    "PromptFn",
    "LQ_RESIZES",
    "pil_resize",
    "resize_lq_back",
    "SyntheticLQ",
]

LQ_RESIZES: tuple[str, ...] = ("release", "inference", "torch")
"""How the LQ crop is resized back to the HQ crop size in training (module doc, ``lq_resize``)."""

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

PromptFn = Callable[[str, tuple[int, int, int, int]], str]
"""Prompt hook: ``prompt_fn(path, (top, left, height, width)) -> text``."""


class _SkipImage(Exception):
    """An image that cannot be used (corrupt, or too small with small_images="skip")."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _images_in_list(list_file: Path) -> list[Path]:
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        paths.append(p if p.is_absolute() else list_file.parent / p)
    return paths


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image paths from a folder (recursive, sorted), a ``.txt`` list, or a sequence of these.

    In a list file, one path per line; relative paths are relative to the list file; blank lines
    and lines starting with ``#`` are ignored. Raises ``FileNotFoundError``/``ValueError`` naming
    the source when it is missing or holds no image.
    """
    if isinstance(source, (str, Path)):
        sources = [Path(source)]
    else:
        sources = [Path(s) for s in source]
    paths: list[Path] = []
    for src in sources:
        if src.is_dir():
            found = _images_in(src)
        elif src.is_file() and src.suffix.lower() == ".txt":
            found = _images_in_list(src)
        elif src.is_file() and src.suffix.lower() in IMAGE_EXTENSIONS:
            found = [src]
        else:
            raise FileNotFoundError(f"image source {src} is not a folder, a .txt list or an image file")
        if not found:
            raise ValueError(f"image source {src} contains no images (extensions {sorted(IMAGE_EXTENSIONS)})")
        paths.extend(found)
    return paths


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array (EXIF orientation applied).

    Grey, palette and alpha images are converted to RGB (alpha dropped); 16-bit grey images are
    scaled to 8 bits. Raises ``OSError``/``ValueError`` for unreadable files.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            if arr.max(initial=0) > 255:
                arr = arr / 257.0  # 16-bit full range → 8-bit
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
            return np.repeat(arr[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def derive_seed(seed: int, epoch: int, index: int) -> int:
    """63-bit seed for item ``index`` of ``epoch``; independent streams for nearby triples."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _to_tensor01(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255


def _randint(generator: torch.Generator, high_inclusive: int) -> int:
    return int(torch.randint(0, high_inclusive + 1, (1,), generator=generator).item())


def pad_to_size(arr: np.ndarray, height: int, width: int, mode: str = "reflect") -> np.ndarray:
    """Pad bottom/right to at least (height, width) by mirroring.

    ``mode="reflect"``: ``a b c d | c b a`` (edge not repeated, OpenCV's REFLECT_101, as
    Real-ESRGAN pads); ``"symmetric"``: ``a b c d | d c b``, which commutes with ×s block
    downscaling and so keeps LQ/HQ pairs aligned. Sides of 1 pixel repeat the edge.
    """
    ph, pw = max(0, height - arr.shape[0]), max(0, width - arr.shape[1])
    if not (ph or pw):
        return arr
    if min(arr.shape[:2]) <= 1:
        mode = "edge"
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode=mode)


def pil_resize(lq01: torch.Tensor, size: tuple[int, int], mode: str, quantize: bool) -> torch.Tensor:
    """Resize (B, C, h, w) in [0, 1] to ``size`` = (H, W) with PIL's ``mode`` filter, on the CPU.

    ``quantize=True``: on the 8-bit image (``Image.resize`` of an RGB image, as the authors' training
    loader does; the input is rounded to 8 bits first, the output is 8-bit). ``quantize=False``:
    per channel in float (PIL mode "F"), as inference resizes (``resize_image``); clamped to [0, 1].
    """
    if mode not in _PIL_FILTERS:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(_PIL_FILTERS)}")
    flt, (height, width) = _PIL_FILTERS[mode], (int(size[0]), int(size[1]))
    out = []
    for im in lq01.detach().float().cpu().clamp(0, 1):
        if quantize:
            u8 = (im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            img = Image.fromarray(u8 if u8.shape[2] != 1 else u8[:, :, 0])
            arr = np.asarray(img.resize((width, height), flt), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(arr.reshape(height, width, -1)).permute(2, 0, 1))
        else:
            chans = [
                np.asarray(
                    Image.fromarray(c.numpy(), mode="F").resize((width, height), flt), dtype=np.float32
                )
                for c in im
            ]
            out.append(torch.from_numpy(np.stack(chans)).clamp(0, 1))
    return torch.stack(out).to(lq01.device, lq01.dtype)


def resize_lq_back(
    lq01: torch.Tensor,
    size: tuple[int, int],
    generator: torch.Generator,
    how: str = "release",
    modes: Sequence[str] = ("nearest", "bilinear", "bicubic"),
) -> tuple[torch.Tensor, list[str]]:
    """Resize each LQ sample (B, C, h, w) in [0, 1] back to ``size`` = (H, W) the ``how`` way
    (:data:`LQ_RESIZES`, module doc); returns the images and the filter used for each sample.

    ``"release"`` and ``"torch"`` draw one filter per sample from ``modes`` with ``generator`` (the
    same draws for both); ``"inference"`` always uses bicubic and draws nothing.
    """
    if how not in LQ_RESIZES:
        raise ValueError(f"lq_resize must be one of {', '.join(LQ_RESIZES)}, got {how!r}")
    if how == "torch":
        return random_resize_back(lq01, size, generator, modes)
    if how == "inference":
        return pil_resize(lq01, size, "bicubic", quantize=False), ["bicubic"] * lq01.shape[0]
    modes = tuple(modes)
    chosen = [modes[K.choice(generator, [1.0] * len(modes))] for _ in range(lq01.shape[0])]
    out = torch.cat([pil_resize(lq01[i : i + 1], size, m, quantize=True) for i, m in enumerate(chosen)])
    return out, chosen


class SyntheticLQ:
    """``SyntheticLQ(config, lq_resize)(hq01, generator)``: the LQ of a (3, C, C) HQ crop in [0, 1]:
    Real-ESRGAN degradation (docs/method.md#stage-1), then resized back to C×C the ``lq_resize``
    way. A picklable ``degrade`` callable for :class:`codsr.stage2.dataset.Stage2Dataset`."""

    def __init__(self, config: DegradationConfig | None = None, lq_resize: str = "release") -> None:
        if lq_resize not in LQ_RESIZES:
            raise ValueError(f"lq_resize must be one of {', '.join(LQ_RESIZES)}, got {lq_resize!r}")
        self.config = config or DegradationConfig()
        self.lq_resize = lq_resize

    def __call__(self, hq01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        small = degrade(hq01[None], generator, self.config)
        size = (int(hq01.shape[-2]), int(hq01.shape[-1]))
        lq, _ = resize_lq_back(small, size, generator, self.lq_resize, self.config.resize_back_modes)
        return lq[0]


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn numbers/bools into tensors, keep strings and others as lists."""
    if not items:
        raise ValueError("collate: empty batch")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class _SkippingDataset(torch.utils.data.Dataset):
    """Shared logic: epoch, seeds, skipping bad files with a warning and a counter."""

    def __init__(self, seed: int, small_images: str, prompt_fn: PromptFn | None) -> None:
        if small_images not in ("pad", "skip"):
            raise ValueError(f"small_images must be 'pad' or 'skip', got {small_images!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.small_images = small_images
        self.prompt_fn = prompt_fn
        self.skipped: dict[str, str] = {}

    @property
    def num_skipped(self) -> int:
        """Files skipped so far in this process."""
        return len(self.skipped)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            warnings.warn(f"skipping image {path}: {reason}", UserWarning, stacklevel=3)
        self.skipped[path] = reason

    def _load(self, path: Path) -> np.ndarray:
        try:
            return load_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise _SkipImage(f"cannot read ({type(err).__name__}: {err})") from err

    def _make_item(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def _path_of(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        generator = self._generator(index)
        for attempt in range(n):
            j = (index + attempt) % n
            try:
                item = self._make_item(j, generator)
            except _SkipImage as err:
                self._skip(self._path_of(j), str(err))
                continue
            item["index"] = index
            item["num_skipped"] = attempt
            return item
        raise RuntimeError(
            f"every one of the {n} images was skipped (see the warnings); reasons: {self.skipped}"
        )


class HQImageDataset(_SkippingDataset):
    """HQ → random crops, h-flip, on-the-fly Real-ESRGAN LQ (docs/method.md#stage-1). See the module doc.

    Args:
        source: folder (recursive), ``.txt`` list, image file, or a sequence of these.
        crop_size: HQ crop side (multiple of ``degradation.scale``); 512 in the paper.
        flip: random horizontal flip with probability 0.5.
        degradation: parameters (docs/method.md#stage-1 defaults); ``None`` is the default config.
        degrade_in: ``"worker"``, ``"batch"`` or ``"none"`` (see the module doc).
        seed: base seed; items depend on (seed, epoch, index) only.
        small_images: ``"pad"`` (reflect-pad bottom/right to the crop) or ``"skip"`` (warn, skip).
        prompt_fn: optional ``prompt_fn(path, crop_box) -> str``; the prompt is "" without it.
        lq_resize: how ``lq`` is resized back to the crop (:data:`LQ_RESIZES`, module doc).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        crop_size: int = 512,
        flip: bool = True,
        degradation: DegradationConfig | None = None,
        degrade_in: str = "worker",
        seed: int = 0,
        small_images: str = "pad",
        prompt_fn: PromptFn | None = None,
        lq_resize: str = "release",
    ) -> None:
        super().__init__(seed, small_images, prompt_fn)
        if lq_resize not in LQ_RESIZES:
            raise ValueError(f"lq_resize must be one of {', '.join(LQ_RESIZES)}, got {lq_resize!r}")
        self.lq_resize = lq_resize
        if degrade_in not in ("worker", "batch", "none"):
            raise ValueError(f"degrade_in must be 'worker', 'batch' or 'none', got {degrade_in!r}")
        self.degradation = degradation or DegradationConfig()
        if crop_size < 1 or crop_size % self.degradation.scale:
            raise ValueError(
                f"crop_size {crop_size} must be a positive multiple of scale {self.degradation.scale}"
            )
        self.paths = list_images(source)
        self.crop_size = int(crop_size)
        self.flip = flip
        self.degrade_in = degrade_in

    def __len__(self) -> int:
        return len(self.paths)

    def _path_of(self, index: int) -> str:
        return str(self.paths[index])

    def _make_item(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        path = self.paths[index]
        arr = self._load(path)
        c = self.crop_size
        h, w = arr.shape[:2]
        if h < c or w < c:
            if self.small_images == "skip":
                raise _SkipImage(f"{w}x{h} is smaller than the {c}x{c} crop (small_images='skip')")
            arr = pad_to_size(arr, c, c)
            h, w = arr.shape[:2]
        top, left = _randint(generator, h - c), _randint(generator, w - c)
        hq = _to_tensor01(arr[top : top + c, left : left + c])
        flipped = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            hq = hq.flip(-1)
        box = (top, left, c, c)
        item: dict[str, Any] = {
            "hq": hq * 2 - 1,
            "path": str(path),
            "prompt": self.prompt_fn(str(path), box) if self.prompt_fn else "",
            "crop_box": torch.tensor(box, dtype=torch.int64),
            "flipped": flipped,
        }
        if self.degrade_in == "worker":
            lq_small = degrade(hq[None], generator, self.degradation)
            lq, modes = resize_lq_back(
                lq_small, (c, c), generator, self.lq_resize, self.degradation.resize_back_modes
            )
            item["lq"] = lq[0] * 2 - 1
            item["resize_mode"] = modes[0]
        elif self.degrade_in == "batch":
            kernels = sample_kernels(generator, self.degradation, 1)
            item.update({k: v[0] for k, v in kernels.items()})
        return item


class PairedImageDataset(_SkippingDataset):
    """Pre-degraded LQ/HQ folder pairs (docs/method.md#stage-1: pre-degraded paired LR folders work too).

    Files are paired by name stem (after removing ``lq_suffix``/``hq_suffix`` from the stems), found
    recursively by relative folder + stem. Unpaired or duplicate stems raise ``ValueError`` listing
    the files. Each pair's scale is ``HQ width // LQ width`` (HQ may exceed ``scale × LQ`` by
    less than ``scale`` pixels, as after a mod-crop); aligned crops of ``crop_size`` (HQ) and
    ``crop_size / scale`` (LQ) are taken, flipped together, and LQ is resized back to the HQ crop
    size with a random mode from ``resize_back_modes`` the ``lq_resize`` way (module doc; pass
    ``resize_back=False`` to keep it small).
    ``crop_size=None`` uses the whole images (then batch only same-size images).
    """

    def __init__(
        self,
        lq_dir: str | Path,
        hq_dir: str | Path,
        crop_size: int | None = 512,
        flip: bool = True,
        seed: int = 0,
        small_images: str = "pad",
        prompt_fn: PromptFn | None = None,
        lq_suffix: str = "",
        hq_suffix: str = "",
        resize_back: bool = True,
        resize_back_modes: Sequence[str] = ("nearest", "bilinear", "bicubic"),
        lq_resize: str = "release",
    ) -> None:
        super().__init__(seed, small_images, prompt_fn)
        if lq_resize not in LQ_RESIZES:
            raise ValueError(f"lq_resize must be one of {', '.join(LQ_RESIZES)}, got {lq_resize!r}")
        self.lq_resize = lq_resize
        self.crop_size = crop_size
        self.flip = flip
        self.resize_back = resize_back
        self.resize_back_modes = tuple(resize_back_modes)
        self.pairs = self._pair(Path(lq_dir), Path(hq_dir), lq_suffix, hq_suffix)

    @staticmethod
    def _keyed(folder: Path, suffix: str, role: str) -> dict[str, Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{role} folder {folder} does not exist")
        keyed: dict[str, Path] = {}
        duplicates: list[str] = []
        for p in _images_in(folder):
            stem = p.stem[: -len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
            key = str(p.relative_to(folder).parent / stem)
            if key in keyed:
                duplicates.append(f"{keyed[key]} and {p}")
            keyed[key] = p
        if duplicates:
            raise ValueError(
                f"{role} folder {folder} has several files with the same stem: " + "; ".join(duplicates)
            )
        if not keyed:
            raise ValueError(f"{role} folder {folder} contains no images")
        return keyed

    @classmethod
    def _pair(cls, lq_dir: Path, hq_dir: Path, lq_suffix: str, hq_suffix: str) -> list[tuple[Path, Path]]:
        lq = cls._keyed(lq_dir, lq_suffix, "LQ")
        hq = cls._keyed(hq_dir, hq_suffix, "HQ")
        no_hq = sorted(str(lq[k]) for k in lq.keys() - hq.keys())
        no_lq = sorted(str(hq[k]) for k in hq.keys() - lq.keys())
        if no_hq or no_lq:
            lines = []
            if no_hq:
                lines.append(f"LQ files without an HQ match in {hq_dir}: " + ", ".join(no_hq))
            if no_lq:
                lines.append(f"HQ files without an LQ match in {lq_dir}: " + ", ".join(no_lq))
            raise ValueError("unpaired files (pairing is by name stem):\n" + "\n".join(lines))
        return [(lq[k], hq[k]) for k in sorted(lq)]

    def __len__(self) -> int:
        return len(self.pairs)

    def _path_of(self, index: int) -> str:
        return str(self.pairs[index][1])

    def _make_item(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        lq_path, hq_path = self.pairs[index]
        lq, hq = self._load(lq_path), self._load(hq_path)
        (lh, lw), (hh, hw) = lq.shape[:2], hq.shape[:2]
        scale = hw // lw
        if scale < 1 or hh // lh != scale or hw - scale * lw >= scale or hh - scale * lh >= scale:
            raise ValueError(
                f"HQ {hq_path} ({hw}x{hh}) is not an integer multiple of LQ {lq_path} ({lw}x{lh}); "
                "fix or remove this pair"
            )
        hq = hq[: scale * lh, : scale * lw]
        c = self.crop_size
        if c is None:
            top = left = 0
            c_h, c_w = hq.shape[:2]
        else:
            if c % scale:
                raise ValueError(f"crop_size {c} is not a multiple of the pair's scale {scale} ({hq_path})")
            cl = c // scale
            if lh < cl or lw < cl:
                if self.small_images == "skip":
                    raise _SkipImage(f"LQ {lw}x{lh} is smaller than the {cl}x{cl} crop (small_images='skip')")
                # symmetric padding of both keeps HQ = ×s of LQ in the padded area too
                lq = pad_to_size(lq, cl, cl, "symmetric")
                hq = pad_to_size(hq, lq.shape[0] * scale, lq.shape[1] * scale, "symmetric")
                lh, lw = lq.shape[:2]
            top_l, left_l = _randint(generator, lh - cl), _randint(generator, lw - cl)
            lq = lq[top_l : top_l + cl, left_l : left_l + cl]
            top, left = top_l * scale, left_l * scale
            hq = hq[top : top + c, left : left + c]
            c_h = c_w = c
        hq_t, lq_t = _to_tensor01(hq), _to_tensor01(lq)
        flipped = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            hq_t, lq_t = hq_t.flip(-1), lq_t.flip(-1)
        box = (top, left, c_h, c_w)
        item: dict[str, Any] = {
            "hq": hq_t * 2 - 1,
            "path": str(hq_path),
            "lq_path": str(lq_path),
            "prompt": self.prompt_fn(str(hq_path), box) if self.prompt_fn else "",
            "crop_box": torch.tensor(box, dtype=torch.int64),
            "flipped": flipped,
        }
        if self.resize_back:
            lq_t, modes = resize_lq_back(
                lq_t[None], (c_h, c_w), generator, self.lq_resize, self.resize_back_modes
            )
            lq_t = lq_t[0]
            item["resize_mode"] = modes[0]
        item["lq"] = lq_t * 2 - 1
        return item

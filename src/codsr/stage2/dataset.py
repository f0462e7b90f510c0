"""Stage-2 training data: HQ crops with their precomputed caption, nouns and masks (docs/method.md#stage-2).

Each item re-applies the crop stored in the image's sidecar (:mod:`codsr.stage2.masks`), flips
image and masks together, and degrades the HQ crop with the callable it is given::

    {
        "hq": 3×C×C in [-1, 1], "lq": 3×C×C in [-1, 1] (only with ``degrade``),
        "caption": str, "prompt": str (the same; "" after text dropout),
        "nouns": list[str] (N), "masks": N×C×C float {0, 1}, "mask_valid": N bool,
        "path": str, "key": str, "crop_box": (top, left, C, C) int64, "flipped": bool, "index": int,
    }

``mask_valid`` is False for nouns whose segmentation failed (status other than "ok"), masks
with fewer than ``min_mask_pixels`` pixels, and every noun of a text-dropped item. Batch items
with :func:`stage2_collate`, which pads the masks to the largest N of the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codsr.stage2.masks import (
    CropBox,
    apply_crop,
    item_key,
    load_masks,
    read_sidecar,
    sidecar_path,
    source_root,
)

Degrade = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``degrade(hq01 3×C×C, generator) -> lq01 3×C×C`` (both in [0, 1])."""

__all__ = ["Degrade", "Stage2Dataset", "stage2_collate", "realesrgan_degrade"]


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"stage2/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def realesrgan_degrade(config=None) -> Degrade:
    """Real-ESRGAN degradation (docs/method.md#stage-1) + random resize back to the crop size, as stage 1 does."""
    from codsr.data.degradation import DegradationConfig, degrade, random_resize_back

    cfg = config or DegradationConfig()

    def run(hq01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        small = degrade(hq01[None], generator, cfg)
        lq, _ = random_resize_back(small, tuple(hq01.shape[-2:]), generator, cfg.resize_back_modes)
        return lq[0]

    return run


class Stage2Dataset(torch.utils.data.Dataset):
    """HQ images + the mask folder of ``codsr masks`` → stage-2 items (see the module doc).

    Args:
        hq_source: the same ``--data`` given to ``codsr masks`` (folder, .txt list or image);
            keys are paths relative to it.
        mask_dir: the ``--out`` folder of ``codsr masks``.
        degrade: LQ synthesis callable (e.g. :func:`realesrgan_degrade`); None → no "lq".
        flip: random horizontal flip (p = 0.5) shared by image and masks.
        text_drop_rate: probability of an empty caption with no valid mask (release stage 2: 0.2).
        min_mask_pixels: fewer positive pixels make a mask invalid (paper: "validity check").
        missing: "error" (default) or "skip" for images without a finished sidecar.
        seed: items depend on (seed, epoch, index) only; call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        hq_source: str | Path,
        mask_dir: str | Path,
        degrade: Degrade | None = None,
        flip: bool = True,
        text_drop_rate: float = 0.2,
        min_mask_pixels: int = 1,
        missing: str = "error",
        seed: int = 0,
    ) -> None:
        from codsr.data.datasets import list_images

        if missing not in ("error", "skip"):
            raise ValueError(f'missing must be "error" or "skip", got {missing!r}')
        if not 0.0 <= text_drop_rate <= 1.0:
            raise ValueError(f"text_drop_rate must be in [0, 1], got {text_drop_rate}")
        self.mask_dir = Path(mask_dir)
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(
                f"mask folder {self.mask_dir} does not exist; run `codsr masks --out {mask_dir}` first"
            )
        root = source_root(hq_source)
        self.items: list[tuple[Path, str, dict[str, Any]]] = []
        absent: list[str] = []
        for path in list_images(hq_source):
            key = item_key(path, root)
            meta = read_sidecar(self.mask_dir, key)
            if meta is None:
                absent.append(key)
                continue
            self.items.append((path, key, meta))
        if absent and missing == "error":
            raise FileNotFoundError(
                f"{len(absent)} image(s) have no finished mask sidecar in {self.mask_dir}, e.g. "
                f"{sidecar_path(self.mask_dir, absent[0])}; run `codsr masks` on them (it resumes) or pass missing='skip'"
            )
        if not self.items:
            raise ValueError(f"no image of {hq_source} has a mask sidecar in {self.mask_dir}")
        self.num_missing = len(absent)
        self.degrade = degrade
        self.flip = flip
        self.text_drop_rate = float(text_drop_rate)
        self.min_mask_pixels = int(min_mask_pixels)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from codsr.data.datasets import load_image

        path, key, meta = self.items[index]
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        arr = load_image(path)
        if list(arr.shape[:2]) != list(meta["image_size"]):
            raise ValueError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but its sidecar {sidecar_path(self.mask_dir, key)} was made "
                f"for {meta['image_size'][1]}x{meta['image_size'][0]}; recompute it with `codsr masks --overwrite`"
            )
        crop = CropBox.from_json(meta["crop"])
        hq = torch.from_numpy(np.ascontiguousarray(apply_crop(arr, crop))).permute(2, 0, 1).float() / 255
        masks_np, ok = load_masks(self.mask_dir, key, meta)
        masks = torch.from_numpy(masks_np)
        valid = torch.from_numpy(ok) & (masks.flatten(1).sum(dim=1) >= self.min_mask_pixels)
        flipped = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            hq, masks = hq.flip(-1), masks.flip(-1)
        caption = str(meta["caption"])
        if self.text_drop_rate > 0 and bool(torch.rand((), generator=generator) < self.text_drop_rate):
            caption = ""
            valid = torch.zeros_like(valid)
        item: dict[str, Any] = {
            "hq": hq * 2 - 1,
            "caption": caption,
            "prompt": caption,
            "nouns": list(meta["nouns"]),
            "masks": masks,
            "mask_valid": valid,
            "path": str(path),
            "key": key,
            "crop_box": torch.tensor([crop.top, crop.left, crop.size, crop.size], dtype=torch.int64),
            "flipped": flipped,
            "index": index,
        }
        if self.degrade is not None:
            item["lq"] = self.degrade(hq, generator).clamp(0, 1) * 2 - 1
        return item


def stage2_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images; pad masks to B×N_max×C×C (zeros) and mask_valid to B×N_max (False).

    ``nouns`` stays a list of per-sample lists (unpadded); ``num_nouns`` gives each N.
    """
    if not items:
        raise ValueError("stage2_collate: empty batch")
    out: dict[str, Any] = {}
    n_max = max(len(it["nouns"]) for it in items)
    size = items[0]["hq"].shape[-2:]
    masks = torch.zeros((len(items), n_max, *size))
    valid = torch.zeros((len(items), n_max), dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["nouns"])
        if n:
            masks[b, :n] = it["masks"]
            valid[b, :n] = it["mask_valid"]
    out["masks"], out["mask_valid"] = masks, valid
    out["num_nouns"] = torch.tensor([len(it["nouns"]) for it in items])
    for key in items[0]:
        if key in ("masks", "mask_valid"):
            continue
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out

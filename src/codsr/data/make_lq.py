"""``codsr make-lq``: pre-degrade HQ images into a paired LQ folder (docs/method.md#stage-1).

Writes ``OUT/lq/<relative path>.png`` (Real-ESRGAN degradation, LQ at HQ/scale). With ``--crop N``
a random N×N crop is degraded and the crop is written to ``OUT/hq/<relative path>.png`` too, so
that ``OUT/lq`` and ``OUT/hq`` form a :class:`codsr.data.PairedImageDataset`; without it, ``OUT/lq``
pairs with the input folder. Image ``i`` uses the seed ``derive_seed(seed, 0, i)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "make-lq",
        help="pre-degrade HQ images (Real-ESRGAN, x4) into a paired LQ folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hq", required=True, help="HQ folder (recursive) or .txt list of images")
    p.add_argument("--out", required=True, help="output folder (lq/ and, with --crop, hq/ are created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=None, help="degrade one random NxN crop per image")
    p.add_argument(
        "--config",
        default=None,
        help="YAML with DegradationConfig fields (top level or under a 'degradation' key)",
    )
    p.set_defaults(func=run)


def _load_config(path: str | None) -> Any:
    from codsr.data.degradation import DegradationConfig

    if path is None:
        return DegradationConfig()
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of degradation settings")
    return DegradationConfig.from_dict(data.get("degradation", data))


def _write_png(path: Path, arr: Any) -> None:
    """uint8 H×W×3 array → PNG at ``path``, atomically (a killed run leaves no truncated file)."""
    from PIL import Image

    from codsr.atomic import atomic_write

    image = Image.fromarray(arr)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from codsr.data.datasets import derive_seed, list_images, load_image, pad_to_size
    from codsr.data.degradation import degrade

    cfg = _load_config(args.config)
    sources = list_images(args.hq)
    root = Path(args.hq) if Path(args.hq).is_dir() else None
    out = Path(args.out)
    s = cfg.scale
    if args.crop is not None and (args.crop < s or args.crop % s):
        raise SystemExit(f"--crop {args.crop} must be a positive multiple of the scale {s}")
    failed = 0
    for i, path in enumerate(sources):
        rel = path.relative_to(root).with_suffix(".png") if root else Path(f"{i:06d}_{path.stem}.png")
        try:
            arr = load_image(path)
        except (OSError, ValueError, SyntaxError) as err:
            print(f"skipping {path}: cannot read ({err})")
            failed += 1
            continue
        g = torch.Generator().manual_seed(derive_seed(args.seed, 0, i))
        if args.crop is not None:
            c = args.crop
            arr = pad_to_size(arr, c, c)
            top = int(torch.randint(0, arr.shape[0] - c + 1, (1,), generator=g))
            left = int(torch.randint(0, arr.shape[1] - c + 1, (1,), generator=g))
            arr = arr[top : top + c, left : left + c]
            _write_png(out / "hq" / rel, arr)
        h, w = arr.shape[:2]
        arr = arr[: h - h % s, : w - w % s]
        hq = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()[None] / 255
        lq = degrade(hq, g, cfg)[0]
        lq8 = (lq * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        _write_png(out / "lq" / rel, lq8)
    print(f"wrote {len(sources) - failed} LQ images to {out / 'lq'} ({failed} skipped)")
    return 1 if failed == len(sources) else 0

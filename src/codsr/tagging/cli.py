"""``codsr tag``: RAM / DAPE tags of image files (the prompts CODSR uses, docs/method.md#inference).

``codsr tag -i photo.jpg`` prints ``photo.jpg<TAB>tags`` (plain RAM);
``codsr tag -i lq_dir/ --dape DAPE.pth -o tags.tsv`` writes the DAPE tags of every image in a folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codsr.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    from codsr.tagging.hub import DEFAULT_DAPE, DEFAULT_RAM

    p = subparsers.add_parser(
        "tag",
        help="RAM / DAPE tags of images (the prompts CODSR uses)",
        description="Tag images with RAM Swin-L (optionally with the DAPE LoRA), as CODSR builds its prompts.",
    )
    p.add_argument("-i", "--input", required=True, help="an image file or a folder of images")
    p.add_argument(
        "-o", "--output", help="write results to OUT.tsv (filename<TAB>tags) or OUT.json; default: stdout"
    )
    p.add_argument(
        "--ram", default=DEFAULT_RAM, help=f"RAM checkpoint: path or hf:// reference (default {DEFAULT_RAM})"
    )
    p.add_argument(
        "--dape",
        default=None,
        help=f"DAPE LoRA file: path or hf:// reference, e.g. {DEFAULT_DAPE} (default: plain RAM)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=PRECISIONS,
        help="weights dtype (default: fp16 on cuda/mps, fp32 on cpu)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("-r", "--recursive", action="store_true", help="also tag images in sub-folders")
    p.set_defaults(func=run)


def list_images(root: Path, recursive: bool = False) -> list[Path]:
    """An explicit file as is; a folder's files with an image suffix, sorted."""
    from codsr.imageio import IMAGE_EXTENSIONS  # here: keeps `codsr --help` from importing PIL

    if root.is_file():
        return [root]
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_rgb(path: Path):
    """PIL RGB image with its EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _write(results: list[tuple[str, str]], output: Path) -> None:
    from codsr.atomic import atomic_write_json, atomic_write_text

    if output.suffix.lower() == ".json":
        atomic_write_json(output, dict(results), indent=1)
    else:
        atomic_write_text(output, "".join(f"{name}\t{tags}\n" for name, tags in results))


def run(args: argparse.Namespace) -> int:
    import torch

    from codsr.imageio import IMAGE_EXTENSIONS
    from codsr.tagging.tagger import RAMTagger

    root = Path(args.input)
    if not root.exists():
        print(f"codsr tag: input not found: {root}", file=sys.stderr)
        return 2
    if args.output and Path(args.output).suffix.lower() not in (".tsv", ".json", ".txt"):
        print(f"codsr tag: --output {args.output}: use a .tsv or .json file name", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("codsr tag: --batch-size must be >= 1", file=sys.stderr)
        return 2
    files = list_images(root, args.recursive)
    if not files:
        known = ", ".join(sorted(IMAGE_EXTENSIONS))
        print(f"codsr tag: no images ({known}) in {root}", file=sys.stderr)
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tagger = RAMTagger.from_pretrained(args.ram, args.dape, device=device, torch_dtype=args.dtype)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        print(f"codsr tag: {exc}", file=sys.stderr)
        return 2

    def display(p: Path) -> str:
        return p.name if root.is_file() else p.relative_to(root).as_posix()

    results: list[tuple[str, str]] = []
    failed = 0
    for start in range(0, len(files), args.batch_size):
        names, images = [], []
        for path in files[start : start + args.batch_size]:
            try:
                images.append(read_rgb(path))
                names.append(display(path))
            except Exception as exc:  # unreadable / corrupt / unsupported: report and go on
                failed += 1
                print(f"codsr tag: cannot read {path}: {exc}", file=sys.stderr)
        if not images:
            continue
        for name, tags in zip(names, tagger.tags(images), strict=True):
            results.append((name, tags))
            if not args.output:
                print(f"{name}\t{tags}", flush=True)
    if args.output:
        _write(results, Path(args.output))
        print(f"codsr tag: {len(results)} images tagged -> {args.output}", file=sys.stderr)
    if failed:
        print(f"codsr tag: {failed} file(s) could not be read", file=sys.stderr)
        return 1
    return 0

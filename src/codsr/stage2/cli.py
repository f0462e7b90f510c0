"""``codsr masks``: precompute stage-2 TMG data (caption, nouns, Grounded-SAM2 masks) per crop.

    codsr masks --data hq/ --out masks/                          # RAM tags of each HQ crop
    codsr masks --data hq/ --out masks/ --captions tags.tsv      # captions from a file
    codsr masks --data list.txt --out masks/ --shard 1/4         # one of four parallel shards

Resumable: items whose sidecar exists are skipped. See :mod:`codsr.stage2.masks` for the format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "masks",
        help="precompute stage-2 masks (captions, nouns, Grounded-SAM2 masks) of training crops",
        description=(
            "For every HQ image: take a reproducible crop, caption it (RAM tags or --captions), keep the nouns, "
            "segment each noun with Grounding DINO + SAM 2 and store the masks (PNG) and a JSON sidecar."
        ),
    )
    p.add_argument(
        "--data", required=True, help="HQ image folder (recursive), .txt list of images, or one image"
    )
    p.add_argument("--out", required=True, help="output folder for sidecars and masks")
    p.add_argument("--crop", type=int, default=512, help="crop side in pixels (default 512)")
    p.add_argument("--crop-mode", choices=["center", "random"], default="center",
                   help="center (the release) or a position drawn from --seed and the image's path")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of --crop-mode random (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--shard", default=None, help="process shard i of n, written i/n (default: everything)")
    p.add_argument("--grounding-dino", default=None,
                   help="Grounding DINO: Hub id or local folder (default IDEA-Research/grounding-dino-tiny)")  # fmt: skip
    p.add_argument(
        "--sam2", default=None, help="SAM 2: Hub id or local folder (default facebook/sam2.1-hiera-large)"
    )
    p.add_argument("--captions", default=None,
                   help="JSON {path: caption} or TSV path<TAB>caption (as `codsr tag -o` writes) instead of RAM")  # fmt: skip
    p.add_argument("--ram", default=None, help="RAM checkpoint (path or hf:// reference) for captions")
    p.add_argument("--noun-backend", choices=["auto", "nltk", "spacy"], default="auto",
                   help="part-of-speech tagger for dropping adjectives (default auto: NLTK if its data exists)")  # fmt: skip
    p.add_argument("--box-threshold", type=float, default=0.4, help="Grounding DINO box threshold (0.4)")
    p.add_argument("--text-threshold", type=float, default=0.3, help="Grounding DINO text threshold (0.3)")
    p.add_argument("--max-boxes", type=int, default=2, help="boxes per noun given to SAM (2)")
    p.add_argument("--overwrite", action="store_true", help="recompute items that already have a sidecar")
    p.set_defaults(func=run)


def _caption_function(args: argparse.Namespace, device: str):
    from codsr.stage2.masks import load_captions, lookup_caption

    if args.captions:
        captions = load_captions(args.captions)

        def from_file(key: str, path: Path, crop_image) -> tuple[str, str]:
            caption = lookup_caption(captions, key, path)
            if caption is None:
                raise LookupError(f"no caption for {key} in {args.captions}")
            return caption, "file"

        return from_file

    from codsr.tagging.hub import DEFAULT_RAM
    from codsr.tagging.tagger import RAMTagger

    # torch_dtype=None: the device's default precision (codsr.precision.default_precision)
    tagger = RAMTagger.from_pretrained(args.ram or DEFAULT_RAM, device=device, torch_dtype=None)

    def from_ram(key: str, path: Path, crop_image) -> tuple[str, str]:
        return tagger.tags([crop_image])[0], "ram"

    return from_ram


def run(args: argparse.Namespace) -> int:
    import torch

    from codsr.data.datasets import list_images
    from codsr.stage2.grounding import (
        DEFAULT_GROUNDING_DINO,
        DEFAULT_SAM2,
        GroundedSAM2,
        GroundingModelNotFoundError,
    )
    from codsr.stage2.masks import (
        MaskJob,
        parse_shard,
        precompute_masks,
        shard_items,
        source_root,
        write_summary,
    )
    from codsr.stage2.nouns import NounBackendError, available_backend

    def fail(msg: str) -> int:
        print(f"codsr masks: {msg}", file=sys.stderr)
        return 2

    try:
        shard = parse_shard(args.shard)
    except ValueError as err:
        return fail(str(err))
    if args.crop < 8 or args.crop % 8:
        return fail(f"--crop {args.crop}: use a positive multiple of 8 (the latent grid)")
    try:
        paths = list_images(args.data)
        backend = available_backend(args.noun_backend)
    except (FileNotFoundError, ValueError, NounBackendError) as err:
        return fail(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gd_ref = args.grounding_dino or DEFAULT_GROUNDING_DINO
    sam_ref = args.sam2 or DEFAULT_SAM2
    try:
        caption_fn = _caption_function(args, device)
        segmenter = GroundedSAM2.from_pretrained(
            gd_ref, sam_ref, device=device,
            box_threshold=args.box_threshold, text_threshold=args.text_threshold, max_boxes=args.max_boxes,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, GroundingModelNotFoundError) as err:
        return fail(str(err))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = shard_items(paths, *shard)
    print(
        f"codsr masks: shard {shard[0]}/{shard[1]}: {len(mine)} of {len(paths)} images -> {out_dir}",
        file=sys.stderr,
    )
    job = MaskJob(
        out_dir=out_dir,
        crop_size=args.crop,
        crop_mode=args.crop_mode,
        seed=args.seed,
        noun_backend=backend,
        overwrite=args.overwrite,
        models={
            "grounding_dino": gd_ref,
            "sam2": sam_ref,
            "box_threshold": args.box_threshold,
            "text_threshold": args.text_threshold,
            "max_boxes": args.max_boxes,
        },
    )
    summary = precompute_masks(
        mine,
        source_root(args.data),
        job,
        segmenter,
        caption_fn,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    summary_path = write_summary(out_dir, shard, summary)
    status = ", ".join(f"{k} {v}" for k, v in sorted(summary["status"].items())) or "none"
    print(
        f"codsr masks: {summary['done']} done, {summary['skipped_existing']} already done, {summary['failed']} failed; "
        f"{summary['nouns']} nouns: {status} (summary: {summary_path})",
        file=sys.stderr,
    )
    return 1 if summary["failed"] else 0

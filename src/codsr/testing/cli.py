"""``codsr make-tiny-model``: write the tiny random SD 2.1 model (and optionally tiny Grounding DINO / SAM 2).

    codsr make-tiny-model --out runs/tiny/base [--seed 0] [--config tiny.yaml] [--overwrite] [--grounding]

The tiny training recipes (``codsr train --config tiny/stage1``) train on this folder.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random SD-2.1-like model (diffusers layout) for tests and CPU recipes",
        description="Write a tiny, randomly initialised SD-2.1-like model folder (UNet conv_in 320 channels, "
        "×8 VAE, small CLIP, byte-level tokenizer, SD scheduler).",
    )
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    t.add_argument(
        "--config", default=None, help="optional YAML with unet/vae/text_encoder/scheduler overrides"
    )
    t.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    t.add_argument(
        "--grounding",
        action="store_true",
        help="also write tiny random Grounding DINO and SAM 2 models to OUT/grounding_dino and OUT/sam2 "
        "(for `codsr masks` and stage-2 training offline)",
    )
    t.set_defaults(func=run_make_tiny_model)


def run_make_tiny_model(args: argparse.Namespace) -> int:
    import yaml

    from codsr.testing.tiny_sd21 import TinyModelConfig, save_tiny_model

    try:
        config = None
        if args.config:
            with open(args.config, encoding="utf-8") as f:
                config = TinyModelConfig.from_dict(yaml.safe_load(f))
        out = save_tiny_model(args.out, config, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"codsr make-tiny-model: {e}", file=sys.stderr)
        return 2
    print(f"codsr make-tiny-model: wrote {out}")
    if args.grounding:
        from codsr.testing.grounding import save_tiny_grounding_models

        gd, sam = save_tiny_grounding_models(out, seed=args.seed)
        print(f"codsr make-tiny-model: wrote {gd} and {sam} (use with codsr masks --grounding-dino/--sam2)")
    return 0

"""``codsr train`` and ``codsr make-tiny-model`` commands.

    codsr train --config configs/stage1.yaml --set data.train_hq=/data/hq
    codsr make-tiny-model --out runs/tiny/base [--grounding]

For several GPUs use ``accelerate launch -m codsr.train`` with the same arguments.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from codsr.train import add_train_arguments

    p = subparsers.add_parser(
        "train",
        help="train CODSR stage 1 or 2 (or the tiny recipe's VAE) from a YAML config",
        description="Train CODSR from a YAML config (see docs/training.md). Multi-GPU: "
        "accelerate launch -m codsr.train --config ...",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)

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


def run_train(args: argparse.Namespace) -> int:
    from codsr.train import run_from_args

    return run_from_args(args)


def run_make_tiny_model(args: argparse.Namespace) -> int:
    import yaml

    from codsr.model.tiny import TinyModelConfig, save_tiny_model

    config = None
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = TinyModelConfig.from_dict(yaml.safe_load(f))
    try:
        out = save_tiny_model(args.out, config, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"codsr make-tiny-model: {e}", file=sys.stderr)
        return 2
    print(f"codsr make-tiny-model: wrote {out}")
    if getattr(args, "grounding", False):
        from codsr.model.tiny import save_tiny_grounding_models

        gd, sam = save_tiny_grounding_models(out, seed=args.seed)
        print(f"codsr make-tiny-model: wrote {gd} and {sam} (use with codsr masks --grounding-dino/--sam2)")
    return 0

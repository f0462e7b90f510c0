"""``codsr train`` command (``codsr make-tiny-model`` lives in :mod:`codsr.testing.cli`).

    codsr train --config configs/stage1.yaml --set data.train_hq=/data/hq

For several GPUs use ``accelerate launch -m codsr.training.run`` with the same arguments.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from codsr.training.run import add_train_arguments

    p = subparsers.add_parser(
        "train",
        help="train CODSR stage 1 or 2 (or the tiny recipe's VAE) from a YAML config",
        description="Train CODSR from a YAML config (see docs/training.md). Multi-GPU: "
        "accelerate launch -m codsr.training.run --config ...",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from codsr.training.run import run_from_args

    return run_from_args(args)


"""Command-line entry point: ``codsr <command> ...`` (also ``python -m codsr``).

Each command lives in its own module that exposes ``register(subparsers)``; the module adds its
parser(s) and sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning
an exit code. Modules are imported when the parser is built, so they must keep heavy imports
(torch, diffusers, ...) inside their ``run`` functions to keep ``codsr --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Order is the order shown in ``codsr --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "codsr.cli.upscale",
    "codsr.cli.report",
    "codsr.cli.app",
    "codsr.evaluation.cli",
    "codsr.tagging.cli",
    "codsr.data.make_lq",
    "codsr.training.cli",
    "codsr.testing.cli",
    "codsr.stage2.cli",
    "codsr.cli.hub",
    "codsr.cli.doctor",
)


def build_parser() -> argparse.ArgumentParser:
    from codsr import __version__

    parser = argparse.ArgumentParser(
        prog="codsr",
        description="CODSR one-step diffusion super-resolution: restore, train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"codsr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch is imported anywhere: spinning OpenMP workers make small CPUs erratic.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

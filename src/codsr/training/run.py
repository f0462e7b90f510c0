"""Training entry point: ``codsr train --config ...`` or
``accelerate launch -m codsr.training.run --config ...`` (this module; ``python -m`` works too).

    codsr train --config configs/stage1.yaml --set data.train_hq=/data/hq output_dir=runs/s1
    accelerate launch --num_processes 4 -m codsr.training.run --config stage1 --set resume=latest

``--config`` takes a YAML path or the name of a config shipped with codsr (``stage1``,
``tiny/vae``, ``tiny/stage1``, ``stage2``, ``tiny/stage2``); ``--set key=value`` overrides any key
(dotted, YAML values). The config's ``stage`` picks the trainer (``1``:
:class:`codsr.training.stage1.Stage1Trainer`, ``2``: :class:`codsr.training.stage2.Stage2Trainer`,
``vae``: the tiny recipe's VAE pre-training).

Several processes on a machine without GPUs (gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m codsr.training.run --config ...

(accelerate's own ``--cpu`` flag starts only one process; see :func:`use_cpu_for_cpu_only_launch`.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        required=True,
        help="YAML config path, or a shipped config name (stage1, stage2, tiny/vae, tiny/stage1, tiny/stage2)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=1e-4 max_steps=100 resume=latest",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def trainer_class(stage: str):
    """The trainer class for a config ``stage``."""
    if stage == "1":
        from codsr.training.stage1 import Stage1Trainer

        return Stage1Trainer
    if stage == "2":
        from codsr.training.stage2 import Stage2Trainer

        return Stage2Trainer
    if stage == "vae":
        from codsr.training.vae_pretrain import VAEPretrainTrainer

        return VAEPretrainTrainer
    raise ValueError(f"config key 'stage': no trainer for stage {stage!r}")


def run_from_args(args: argparse.Namespace) -> int:
    """Load the config named by ``args``, then train (or print the config)."""
    import logging

    from codsr.training.config import ConfigError, load_config

    overrides = [item for group in args.overrides for item in group]
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"codsr train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        trainer = trainer_class(config.stage)(config)
        result = trainer.train()
    except ConfigError as e:
        print(f"codsr train: {e}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(
            f"codsr train: finished at step {result['step']}; outputs in {config.output_dir}", file=sys.stderr
        )
    return 0


def use_cpu_for_cpu_only_launch() -> bool:
    """Make a multi-process launch on a machine without CUDA run as gloo CPU processes.

    ``accelerate launch --cpu --num_processes N`` starts a single process (accelerate 1.x runs
    several CPU processes only through mpirun), and ``accelerate launch --multi_gpu
    --num_processes N`` on a CPU-only machine starts N processes that each believe they are
    alone (and would train N unrelated models). When torchrun's variables say there are several
    processes and CUDA is absent, ``ACCELERATE_USE_CPU=1`` makes accelerate join them in one
    gloo group. Returns True when it set the variable.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ:
            # accelerate's simple launcher sets MASTER_ADDR only when asked for several processes
            print("codsr train: `accelerate launch --cpu --num_processes N` starts ONE process (accelerate runs "
                  "several CPU processes only through mpirun); use `accelerate launch --multi_gpu --num_processes N "
                  "-m codsr.training.run ...` on a CPU-only machine", file=sys.stderr)  # fmt: skip
        return False
    if "ACCELERATE_USE_CPU" in os.environ:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["ACCELERATE_USE_CPU"] = "1"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    use_cpu_for_cpu_only_launch()
    parser = argparse.ArgumentParser(
        prog="codsr.training.run", description="Train CODSR (stage 1 or 2) or the tiny recipe's VAE."
    )
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Execution engines that run a batch job on infrastructure people already operate.

:mod:`codsr.engines.ray` — a Ray Data job (``codsr upscale --engine ray``, extra ``codsr[ray]``).
The default engine is the plain process loop :func:`codsr.batch.run_batch`, sharded across
torchrun / SLURM processes with ``--shard`` (docs/scale-out.md).
"""

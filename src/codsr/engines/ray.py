"""Ray Data engine for batch upscaling: ``codsr upscale --engine ray`` (extra ``codsr[ray]``).

The planned (input, output) pairs become a Ray Dataset; ``map_batches`` runs them through an actor
class, :class:`UpscaleWorker`, that loads ONE pipeline per worker (``process_factory()``, called once
in the actor's constructor) and hands each batch to the same :func:`codsr.batch.run_batch` the
single-process CLI uses — same atomic writer, same per-image seeds (:func:`codsr.seeding.image_seed`
of the path below the input root), same skip-existing and per-image error handling — so every
output is the same file, bit for bit, whichever worker made it. Each worker appends its own run
record (``codsr-run.ray-<host>_<pid>.jsonl``); the driver's ``start`` line (``codsr-run.ray.jsonl``)
lists all inputs, so ``codsr report`` sees what is missing after a crash. docs/scale-out.md has the
recipes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from codsr.atomic import remove_temp_files
from codsr.batch import BatchItem, BatchReport, ProcessFn, run_batch
from codsr.scaleout import RunRecord, record_path, worker_id

__all__ = ["UpscaleWorker", "default_workers", "run_ray"]

_STATUSES = ("done", "skipped", "failed")


class UpscaleWorker:
    """Ray Data actor: one pipeline per worker, images through :func:`codsr.batch.run_batch`.

    ``process_factory()`` must return ``process(image, seed)`` (it loads the model; it is pickled
    to the worker, so a module-level function or a ``functools.partial`` of one).
    """

    def __init__(
        self,
        process_factory: Callable[[], ProcessFn],
        *,
        out_dir: str,
        input_root: str,
        skip_existing: bool,
        seed: int,
        quality: int = 95,
        keep_metadata: bool = True,
    ) -> None:
        import torch

        from codsr.hostmem import PeakMemoryMeter

        self.process = process_factory()
        # Under Ray, CUDA_VISIBLE_DEVICES holds this worker's GPUs only ("" without num_gpus).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.meter = PeakMemoryMeter(device)
        self.kwargs = dict(out_dir=out_dir, input_root=input_root, skip_existing=skip_existing, seed=seed,
                           quality=quality, keep_metadata=keep_metadata)  # fmt: skip
        self.record = RunRecord(
            record_path(out_dir, f"ray-{worker_id()}"), out_dir=out_dir, input_root=input_root, shard="ray",
            device=device, peak_memory=self.meter.peak,
        )  # fmt: skip

    def _metered(self, image, seed: int):
        self.meter.reset(trim=False)
        return self.process(image, seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [str(x) for x in batch["input"]]
        outputs = [str(x) for x in batch["output"]]
        report = run_batch(
            inputs, self._metered, outputs=outputs, on_item=self.record.on_item, remove_stale_temp=False,
            progress=False, **self.kwargs,
        )  # fmt: skip
        by_input: dict[str, tuple[str, BatchItem]] = {}
        for status in _STATUSES:
            for item in getattr(report, status):
                by_input[str(item.input)] = (status, item)
        rows: dict[str, list[Any]] = {
            k: [] for k in ("input", "output", "status", "seconds", "reason", "seed")
        }
        for src in inputs:
            status, item = by_input.get(
                src, ("failed", BatchItem(Path(src), reason=report.aborted or "not processed"))
            )
            rows["input"].append(src)
            rows["output"].append("" if item.output is None else str(item.output))
            rows["status"].append(status)
            rows["seconds"].append(float(item.seconds))
            rows["reason"].append(item.reason)
            rows["seed"].append(-1 if item.seed is None else int(item.seed))
        return {k: np.asarray(v) for k, v in rows.items()}


def default_workers(gpus_per_worker: float) -> int:
    """Workers when ``--workers`` is not given: as many as the cluster's GPUs allow, or 1 on CPUs."""
    if gpus_per_worker > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
    return 1


def run_ray(
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    process_factory: Callable[[], ProcessFn],
    *,
    out_dir: str | os.PathLike[str],
    input_root: str | os.PathLike[str],
    skip_existing: bool,
    seed: int = 0,
    quality: int = 95,
    keep_metadata: bool = True,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: bool = True,
) -> BatchReport:
    """Upscale ``inputs`` into their planned ``outputs`` (from :func:`codsr.batch.plan_outputs`) on Ray.

    Joins the Ray instance already initialised in this process, else ``ray.init(address=address)``
    (None: start a local one; "auto": the running cluster) and shuts down only what it started.
    ``workers`` actors (default :func:`default_workers`) each reserve ``gpus_per_worker`` GPUs. The
    output folder must be shared by all nodes. Returns a :class:`~codsr.batch.BatchReport`.
    """
    if len(inputs) != len(outputs):
        raise ValueError(f"outputs: {len(outputs)} paths for {len(inputs)} inputs; give one per input")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    import time

    started = time.perf_counter()
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    report = BatchReport(removed_temp_files=remove_temp_files(out_root))  # only stale ones (codsr.atomic)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress)
    try:
        n = workers or default_workers(gpus_per_worker)
        RunRecord(record_path(out_root, "ray"), out_dir=out_root, input_root=input_root, shard="ray").start(
            inputs, engine="ray", workers=n, gpus_per_worker=gpus_per_worker, seed=seed, skip_existing=skip_existing
        )  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = ray.data.from_items(
            [{"input": str(i), "output": str(o)} for i, o in zip(inputs, outputs, strict=True)]
        )
        ds = ds.map_batches(
            UpscaleWorker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n),
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(
                process_factory=process_factory,
                out_dir=str(out_root),
                input_root=str(input_root),
                skip_existing=skip_existing,
                seed=seed,
                quality=quality,
                keep_metadata=keep_metadata,
            ),  # fmt: skip
        )
        for row in ds.iter_rows():
            output = Path(row["output"]) if row["output"] else None
            seed_value = int(row["seed"])
            item = BatchItem(Path(row["input"]), output, float(row["seconds"]), str(row["reason"]),
                             None if seed_value < 0 else seed_value)  # fmt: skip
            getattr(report, str(row["status"])).append(item)
        # A worker Ray restarted (killed, out of memory) may have left its temp file: remove it now.
        report.removed_temp_files += remove_temp_files(out_root)
    finally:
        if started_here:
            ray.shutdown()
    report.seconds = time.perf_counter() - started
    return report

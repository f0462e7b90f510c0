"""Scaling a batch job out over processes and machines: shards, launcher environments, run records.

Standard library only (no torch): ``codsr upscale --shard``, the Ray engine and ``codsr report``
use it. Users' terms and recipes are in docs/scale-out.md.

* **Shards.** An input belongs to shard ``shard_index(name, N)`` where ``name`` is its path below
  the input root: a stable hash (:data:`SHARD_RULE`), so adding or removing files never moves any
  other file to another shard, and every worker can decide on its own, without talking to the
  others, which files are its part.
* **Launchers.** :func:`detect_launch` reads the rank, world size and local rank that torchrun /
  ``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM (``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``) give each process.
* **Run records.** Every worker appends JSON lines to its own file ``OUT_DIR/codsr-run.<tag>.jsonl``
  (:class:`RunRecord`): a ``start`` line naming the inputs it is responsible for, then one
  ``image`` line per input (input, output, seed, status, seconds, peak memory, error), each written
  with one ``O_APPEND`` write as soon as the image is finished, so a killed worker's record is
  complete up to its last image. :func:`summarize` merges all records of a folder into done /
  failed / missing and throughput per worker (``codsr report``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from codsr.atomic import append_bytes

__all__ = [
    "RECORD_GLOB",
    "SHARD_RULE",
    "LaunchEnv",
    "RunRecord",
    "RunSummary",
    "Shard",
    "WorkerStats",
    "detect_launch",
    "read_records",
    "record_path",
    "relative_name",
    "resolve_shard",
    "shard_index",
    "summarize",
    "worker_id",
]

# The rule in words (recorded in each start line, so a report can tell runs split another way).
SHARD_RULE = 'int.from_bytes(sha256(relative_name.encode()).digest()[:8], "big") % count'
RECORD_PREFIX = "codsr-run."
RECORD_GLOB = f"{RECORD_PREFIX}*.jsonl"


def relative_name(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` below ``root`` with "/" separators, Unicode NFC (just the file name if not below it)."""
    try:
        rel = PurePath(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        rel = PurePath(path).name
    return unicodedata.normalize("NFC", rel.replace("\\", "/"))


def shard_index(name: str, count: int) -> int:
    """The shard (0 … ``count``-1) of an input called ``name`` (its path below the input root).

    First 8 bytes of sha256 of the NFC, "/"-separated name, modulo ``count``: independent of the
    other inputs, of the order they are listed in and of the machine.

    >>> shard_index("sub/photo 1.jpg", 4)
    0
    """
    if count < 1:
        raise ValueError(f"shard count must be ≥ 1, got {count}")
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based, like ``RANK`` and ``SLURM_PROCID``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: need 0 ≤ I < N (I is 0-based, e.g. 0/4 … 3/4)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` → Shard(I, N); raises ValueError naming the expected form."""
        parts = text.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"shard {text!r}: expected I/N with 0 ≤ I < N (e.g. 0/4), or auto")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """File-name form: ``"0-of-4"``."""
        return f"{self.index}-of-{self.count}"

    def owns(self, name: str) -> bool:
        """True if the input called ``name`` (path below the input root) is in this shard."""
        return shard_index(name, self.count) == self.index


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher told this process: global rank, number of processes, rank on this node."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" (also accelerate launch) or "slurm"

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def device(self, cuda_available: bool) -> str:
        """``cuda:LOCAL_RANK`` where CUDA is available, else ``cpu``."""
        return f"cuda:{self.local_rank}" if cuda_available else "cpu"


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's rank / world size / local rank, or None when no launcher set them.

    torchrun and ``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) win over SLURM
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``), so ``srun torchrun ...`` shards by
    torchrun's global rank. A missing local rank is taken as 0.
    """
    env = os.environ if environ is None else environ
    for launcher, rank, world, local in (
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rank in env and world in env:
            local_rank = _env_int(env, local) if local in env else 0
            return LaunchEnv(_env_int(env, rank), _env_int(env, world), local_rank, launcher)
    return None


def resolve_shard(
    spec: str | None, environ: Mapping[str, str] | None = None
) -> tuple[Shard | None, LaunchEnv | None]:
    """``--shard`` value → (shard or None for "everything", launcher environment for ``auto``).

    ``auto`` without a launcher environment is an error (it would silently process everything in
    every process); ``auto`` with a world size of 1 is the whole set.
    """
    if spec is None or spec == "":
        return None, None
    if spec.strip().lower() == "auto":
        launch = detect_launch(environ)
        if launch is None:
            raise ValueError(
                "--shard auto: no launcher environment found (RANK/WORLD_SIZE from torchrun or accelerate, "
                "SLURM_PROCID/SLURM_NTASKS from srun); start under a launcher or give --shard I/N"
            )
        return launch.shard, launch
    return Shard.parse(spec), None


def worker_id() -> str:
    """``host:pid`` of this process (names the worker in records and reports)."""
    return f"{socket.gethostname().split('.')[0] or 'host'}:{os.getpid()}"


def record_path(out_dir: str | os.PathLike[str], tag: str) -> Path:
    """``OUT_DIR/codsr-run.<tag>.jsonl``; ``tag`` is e.g. a shard's ``"0-of-4"`` or ``"ray-host-123"``."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
    return Path(out_dir) / f"{RECORD_PREFIX}{safe}.jsonl"


class RunRecord:
    """Append-only JSON-lines record of one worker (see the module docstring for the lines).

    ``peak_memory``: optional callable giving the peak memory (bytes) of the image just finished
    (the caller resets its meter when an image starts). Every line is one ``O_APPEND`` write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        out_dir: str | os.PathLike[str],
        input_root: str | os.PathLike[str],
        shard: str,
        worker: str | None = None,
        device: str | None = None,
        peak_memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.out_dir = Path(out_dir)
        self.input_root = Path(input_root)
        self.shard = shard
        self.worker = worker or worker_id()
        self.device = device
        self.peak_memory = peak_memory
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, event: str, **fields: Any) -> None:
        line = {"event": event, "time": round(time.time(), 3), "worker": self.worker, "shard": self.shard}
        line.update(fields)
        append_bytes(self.path, (json.dumps(line, ensure_ascii=False) + "\n").encode())

    def start(self, inputs: Iterable[str | os.PathLike[str]], **info: Any) -> None:
        """The ``start`` line: this worker's inputs (names below the input root) and run settings."""
        names = [relative_name(p, self.input_root) for p in inputs]
        self._write("start", input_root=os.path.abspath(self.input_root), device=self.device,
                    shard_rule=SHARD_RULE, inputs=names, **info)  # fmt: skip

    def image(
        self,
        status: str,
        input: str | os.PathLike[str],
        output: str | os.PathLike[str] | None,
        *,
        seed: int | None = None,
        seconds: float = 0.0,
        error: str = "",
    ) -> None:
        """One ``image`` line; ``status`` is "done", "skipped" (output existed) or "failed"."""
        peak = self.peak_memory() if self.peak_memory is not None and status != "skipped" else None
        out = None if output is None else relative_name(output, self.out_dir)
        self._write("image", input=relative_name(input, self.input_root), output=out, seed=seed,
                    status=status, seconds=round(seconds, 4), peak_memory=peak, error=error)  # fmt: skip

    def on_item(self, status: str, item: Any) -> None:
        """Adapter for ``codsr.batch.run_batch(on_item=...)`` (a BatchItem: input, output, seed, seconds, reason)."""
        self.image(status, item.input, item.output, seed=item.seed, seconds=item.seconds,
                   error=item.reason if status == "failed" else "")  # fmt: skip

    def finish(self, **summary: Any) -> None:
        """The ``finish`` line (counts); a worker killed before it simply has none."""
        self._write("finish", **summary)


# --------------------------------------------------------------------------------------------
# merging records: codsr report
# --------------------------------------------------------------------------------------------


def read_records(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All lines of all ``codsr-run.*.jsonl`` in ``out_dir``, oldest first. A line torn by a killed
    writer (not valid JSON) is skipped."""
    lines: list[dict[str, Any]] = []
    for path in sorted(Path(out_dir).glob(RECORD_GLOB)):
        with open(path, encoding="utf-8", errors="replace") as f:
            for raw in f:
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(line, dict) and "event" in line:
                    line["_record"] = path.name
                    lines.append(line)
    lines.sort(key=lambda d: d.get("time", 0.0))
    return lines


@dataclass
class WorkerStats:
    """One worker's share: images done / failed, seconds spent on them, wall-clock span."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    busy_seconds: float = 0.0
    first: float | None = None
    last: float | None = None
    peak_memory: int | None = None

    @property
    def images_per_second(self) -> float:
        """Done images per second of compute (reading, model, writing)."""
        return self.done / self.busy_seconds if self.busy_seconds > 0 else 0.0

    @property
    def wall_seconds(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first


@dataclass
class RunSummary:
    """Merged state of all records in a folder (:func:`summarize`)."""

    expected: list[str] = field(default_factory=list)
    done: dict[str, str] = field(default_factory=dict)  # input → output
    failed: dict[str, str] = field(default_factory=dict)  # input → error
    missing: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    records: int = 0

    @property
    def exit_code(self) -> int:
        """0: every expected image done; 1: something failed or is missing; 2: no records at all."""
        if self.records == 0:
            return 2
        return 1 if self.failed or self.missing or self.missing_shards else 0

    def text(self) -> str:
        lines = [
            f"{len(self.expected)} inputs: {len(self.done)} done, {len(self.failed)} failed, "
            f"{len(self.missing)} missing ({self.records} record file(s), {len(self.workers)} worker(s))"
        ]
        if self.missing_shards:
            lines.append("shards that never started: " + ", ".join(self.missing_shards))
        if self.workers:
            lines.append("per worker: done, failed, skipped, busy s, images/s, wall s, peak memory")
            for name, w in sorted(self.workers.items()):
                peak = "-" if w.peak_memory is None else f"{w.peak_memory / 2**20:.0f} MiB"
                lines.append(
                    f"  {name}: {w.done}, {w.failed}, {w.skipped}, {w.busy_seconds:.1f}, "
                    f"{w.images_per_second:.3f}, {w.wall_seconds:.1f}, {peak}"
                )
        if self.failed:
            lines.append("failed:")
            lines.extend(f"  {name}: {error}" for name, error in sorted(self.failed.items()))
        if self.missing:
            lines.append("missing (run again with --skip-existing):")
            lines.extend(f"  {name}" for name in self.missing)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": len(self.expected),
            "done": len(self.done),
            "failed": dict(sorted(self.failed.items())),
            "missing": self.missing,
            "missing_shards": self.missing_shards,
            "records": self.records,
            "workers": {
                name: {
                    "done": w.done,
                    "failed": w.failed,
                    "skipped": w.skipped,
                    "busy_seconds": round(w.busy_seconds, 3),
                    "images_per_second": round(w.images_per_second, 4),
                    "wall_seconds": round(w.wall_seconds, 3),
                    "peak_memory": w.peak_memory,
                }  # fmt: skip
                for name, w in sorted(self.workers.items())
            },
            "exit_code": self.exit_code,
        }


def summarize(out_dir: str | os.PathLike[str]) -> RunSummary:
    """Merge every record in ``out_dir``.

    Expected inputs are the union of all ``start`` lines. An input's state is its latest ``image``
    line: done (or skipped because the output existed) counts only if the output file is still
    there; failed keeps its error; no line (a worker killed before reaching it) is missing. Shards
    ``I/N`` of which no process ever started are listed too (their inputs are unknown here).
    """
    root = Path(out_dir)
    lines = read_records(root)
    summary = RunSummary(records=len({line["_record"] for line in lines}))
    expected: dict[str, None] = {}
    shards_seen: dict[int, set[int]] = {}
    latest: dict[str, dict[str, Any]] = {}
    for line in lines:
        worker = str(line.get("worker", "?"))
        stats = summary.workers.setdefault(worker, WorkerStats())
        t = line.get("time")
        if isinstance(t, (int, float)):
            begun = t - float(line.get("seconds") or 0.0)  # an image line is written when the image ends
            stats.first = begun if stats.first is None else min(stats.first, begun)
            stats.last = t if stats.last is None else max(stats.last, t)
        if line["event"] == "start":
            expected.update(dict.fromkeys(line.get("inputs", [])))
            shard = str(line.get("shard", ""))
            if "/" in shard:
                with_index = shard.split("/")
                if all(p.isdigit() for p in with_index):
                    shards_seen.setdefault(int(with_index[1]), set()).add(int(with_index[0]))
        elif line["event"] == "image":
            name = line.get("input")
            if not isinstance(name, str):
                continue
            latest[name] = line
            status = line.get("status")
            if status == "done":
                stats.done += 1
                stats.busy_seconds += float(line.get("seconds") or 0.0)
            elif status == "failed":
                stats.failed += 1
                stats.busy_seconds += float(line.get("seconds") or 0.0)
            elif status == "skipped":
                stats.skipped += 1
            peak = line.get("peak_memory")
            if isinstance(peak, int):
                stats.peak_memory = peak if stats.peak_memory is None else max(stats.peak_memory, peak)
    summary.workers = {k: v for k, v in summary.workers.items() if v.done or v.failed or v.skipped}
    expected.update(dict.fromkeys(latest))
    summary.expected = sorted(expected)
    for name in summary.expected:
        line = latest.get(name)
        if line is None:
            summary.missing.append(name)
        elif line.get("status") in ("done", "skipped"):
            out = line.get("output")
            if isinstance(out, str) and (root / out).is_file():
                summary.done[name] = out
            else:
                summary.missing.append(name)
        else:
            summary.failed[name] = str(line.get("error") or "failed")
    for count, seen in sorted(shards_seen.items()):
        summary.missing_shards.extend(f"{i}/{count}" for i in range(count) if i not in seen)
    return summary

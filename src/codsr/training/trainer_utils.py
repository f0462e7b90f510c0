"""Building blocks of the trainers: seeded random streams, a resumable data stream, EMA, the
training-state folders and the metrics logger.

Everything here serves exact resumption: every random draw of the training loop comes from a named
CPU :class:`torch.Generator` (:class:`TrainingRNG`), the data order is a pure function of
``(seed, epoch, rank)`` plus a position (:class:`DataStream`), and all of them can be saved and
restored, so a run killed after step N/2 and resumed reproduces the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from codsr.atomic import append_bytes

__all__ = [
    "DataStream",
    "EMA",
    "EpochSampler",
    "MetricsLogger",
    "TrainingRNG",
    "capture_global_rng",
    "find_latest_state",
    "list_states",
    "restore_global_rng",
    "stream_seed",
]

STATE_PREFIX = "step-"
STATE_COMPLETE = "meta.json"  # written last: a state folder without it is incomplete


def stream_seed(*parts: object) -> int:
    """63-bit seed from any parts (e.g. ``(seed, rank, "timesteps")``); independent streams."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TrainingRNG:
    """Named CPU generators, each seeded from ``(seed, rank, name)``.

    Drawing on the CPU keeps the draws identical on any accelerator (the tensors are moved
    afterwards), and the generator states are saved with the training state.
    """

    def __init__(
        self, seed: int, rank: int = 0, names: tuple[str, ...] = ("timesteps", "noise", "prompts")
    ) -> None:
        self.seed = int(seed)
        self.rank = int(rank)
        self.generators = {n: torch.Generator().manual_seed(stream_seed(seed, rank, n)) for n in names}

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: g.get_state() for n, g in self.generators.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for n, s in state.items():
            if n in self.generators:
                self.generators[n].set_state(s)


def capture_global_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) global RNG states as plain containers and tensors, so
    the file loads with ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_global_rng` (CUDA states only when the device count matches)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- data
class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch for one rank: a permutation seeded by ``(seed, epoch)``, sharded
    ``perm[rank::world]`` (equal shard lengths), starting at ``start`` (for resuming mid-epoch)."""

    def __init__(self, length: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 start: int = 0) -> None:  # fmt: skip
        self.length, self.seed, self.epoch = int(length), int(seed), int(epoch)
        self.rank, self.world, self.shuffle, self.start = int(rank), int(world), shuffle, int(start)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, "order"))
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        per_rank = self.length // self.world
        return perm[self.rank : per_rank * self.world : self.world][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, self.length // self.world - self.start)


class DataStream:
    """Endless batches from a map-style dataset with a resumable position ``(epoch, batch)``.

    Each epoch builds a fresh :class:`torch.utils.data.DataLoader` over an :class:`EpochSampler`
    (incomplete last batches are dropped) after ``dataset.set_epoch(epoch)`` when the dataset has
    it, so the items of a position depend only on the seeds, never on the number of workers.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        collate_fn: Any = None,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.num_workers, self.collate_fn, self.shuffle, self.pin_memory = (
            num_workers,
            collate_fn,
            shuffle,
            pin_memory,
        )
        n = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = (n // self.world) // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {n} images, fewer than data batch size {self.batch_size} × {self.world} "
                "process(es): add images or lower train.batch_size"
            )
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed
        self._iter: Iterator | None = None

    def _start_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        sampler = EpochSampler(len(self.dataset), self.seed, self.epoch, self.rank, self.world, self.shuffle,  # type: ignore[arg-type]
                               start=self.batch * self.batch_size)  # fmt: skip
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            persistent_workers=False,  # workers must see set_epoch
        )
        self._iter = iter(loader)

    def next(self) -> Any:
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
            self._iter = None
        if self._iter is None:
            self._start_epoch()
        batch = next(self._iter)  # type: ignore[arg-type]
        self.batch += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "world": self.world, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._iter = None


# ----------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of named parameters: ``shadow ← d·shadow + (1 - d)·param``.

    The shadow copies are float32 and live on the parameters' device.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.params = dict(params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live weights and EMA weights (call twice to restore)."""
        for n, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[n].to(p.dtype))
            self.shadow[n].copy_(live.float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[0]!r} ({len(missing)} missing)")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


# ----------------------------------------------------------------------------------- states
def list_states(state_root: str | os.PathLike) -> list[Path]:
    """Complete training-state folders ``step-XXXXXXXX`` under ``state_root``, oldest first."""
    root = Path(state_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STATE_PREFIX) and p.name[len(STATE_PREFIX):].isdigit() \
                and (p / STATE_COMPLETE).is_file():  # fmt: skip
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(STATE_PREFIX) :]))


def find_latest_state(state_root: str | os.PathLike) -> Path | None:
    states = list_states(state_root)
    return states[-1] if states else None


def state_dir_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:08d}"


def prune_states(state_root: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest complete states, and leftovers of interrupted saves."""
    states = list_states(state_root)
    for p in states[: max(0, len(states) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(state_root)
    for p in root.glob(f"{STATE_PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------- logging
class MetricsLogger:
    """Scalars to ``<dir>/metrics.jsonl`` (always) and TensorBoard (when installed and enabled).

    Only the main process should create one.
    """

    def __init__(self, log_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.log_dir / "metrics.jsonl"
        self.writer = None
        self.tensorboard_error: str | None = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is an optional extra
                self.tensorboard_error = (
                    f"TensorBoard logging is off ({e}); `pip install tensorboard` to enable it"
                )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        append_bytes(self.jsonl, (json.dumps({"step": int(step), **clean}) + "\n").encode("utf-8"))
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, int(step))

    def log_images(self, step: int, tag: str, images01: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, images01.clamp(0, 1).cpu(), int(step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Entries of a ``metrics.jsonl`` file (later entries for the same step are kept as well)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]

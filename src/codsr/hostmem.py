"""Host and device memory helpers: peak metering, resident memory, free-memory budgets, glibc heap.

Imports nothing from codsr (the lowest layer): the pipeline's tile planner
(:mod:`codsr.pipeline.tiling`), the tiled VAE, the CLI and the benchmarks use it.

Only :func:`limit_heap_fragmentation` and :func:`reuse_freed_memory` change process-wide state
(glibc's malloc settings); library code never calls them. Applications choose with
:func:`configure_host_allocator`: the ``codsr upscale`` CLI and the benchmarks limit fragmentation
when a memory budget is given on the CPU or the image is tiled (the memory model was measured that
way, docs/memory.md) and reuse freed memory otherwise (faster: docs/benchmarks.md#cpu-speed).
"""

from __future__ import annotations

import ctypes
import resource

import torch

GB = 1024**3

__all__ = [
    "GB",
    "HEAP_MMAP_THRESHOLD",
    "PeakMemoryMeter",
    "automatic_budget",
    "configure_host_allocator",
    "limit_heap_fragmentation",
    "release_host_memory",
    "resident_bytes",
    "reuse_freed_memory",
]


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _meminfo_available() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (free + reclaimable page cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError(
        "cannot read MemAvailable from /proc/meminfo for an automatic CPU memory budget; pass max_memory=<GB>"
    )


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so RSS reflects live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# glibc's mallopt parameter numbers (malloc.h) and its defaults.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
HEAP_MMAP_THRESHOLD = 1 << 20
# Freed heap memory above this much at the top is given back to the OS in reuse mode (mallopt takes an int).
REUSE_TRIM_THRESHOLD = 2**31 - 1


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):
        return False


def limit_heap_fragmentation(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Serve allocations ≥ ``threshold`` bytes with their own mappings (glibc ``M_MMAP_THRESHOLD``).

    By default glibc raises this threshold up to 32 MB as large blocks are freed, so activation
    tensors end up in its heap, which fragments and keeps freed memory: on the tiled VAE this
    tripled peak RSS (docs/memory.md). A fixed threshold returns every freed activation to the OS
    at once; the cost is a page fault per first touch (about a quarter of the VAE's time at 512²,
    docs/benchmarks.md#cpu-speed). Process-wide, so only applications call it (through
    :func:`configure_host_allocator`: under a CPU budget or for a tiled image), never the library.
    It also undoes :func:`reuse_freed_memory`. A no-op (returns False) where glibc is not the allocator.
    """
    ok = _mallopt(
        (_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD), (_M_MMAP_THRESHOLD, threshold)
    )
    release_host_memory()  # what reuse mode kept goes back now
    return ok


def reuse_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and keep freed memory there (``M_MMAP_MAX`` 0,
    ``M_TRIM_THRESHOLD`` 2 GiB).

    glibc's default gives each tensor over 32 MB its own mapping, unmapped when freed, so every
    large activation of the VAE is page-faulted and zeroed by the kernel again: on a 2-vCPU EPYC
    that was ~1/4 of the bf16 VAE's time at 512² (5.9 s → 4.3 s with this setting, peak RSS
    +0.2 GiB; docs/benchmarks.md#cpu-speed). The cost is memory held between phases and heap
    fragmentation with tiles of many sizes, so under a memory budget use
    :func:`limit_heap_fragmentation` instead. Process-wide: applications call it, never the
    library. A no-op (returns False) where glibc is not the allocator.
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD))


def configure_host_allocator(budgeted: bool, tiled: bool = False, device: torch.device | str = "cpu") -> str:
    """The applications' one rule for the CPU heap, per run: on a CUDA/MPS ``device`` nothing (the
    activations are not in the heap: returns ``"default"``); under a memory budget or for a tiled
    (large-image) run, bounded RSS (:func:`limit_heap_fragmentation`, the setting the memory model
    was measured with); otherwise speed (:func:`reuse_freed_memory`). Reuse fragments across tiles
    of many sizes: a 2048² bf16 run without a budget reached 20 GiB RSS with it and was killed.
    Returns ``"limit_fragmentation"``/``"reuse"``, or ``"default"`` where glibc's malloc is not
    there to configure."""
    if torch.device(device).type != "cpu":
        return "default"
    if budgeted or tiled:
        return "limit_fragmentation" if limit_heap_fragmentation() else "default"
    return "reuse" if reuse_freed_memory() else "default"


class PeakMemoryMeter:
    """Peak memory of one phase: CUDA ``max_memory_allocated`` or the process's peak RSS.

    CPU: :meth:`reset` writes ``5`` to ``/proc/self/clear_refs`` (resets VmHWM, Linux ≥ 4.0);
    where that is not allowed the peak is ``ru_maxrss`` of the whole process (``resettable`` is
    False). Values are bytes; ``current`` is the allocation (CUDA) or RSS (CPU) now.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return (
            "VmHWM (reset via /proc/self/clear_refs)" if self.resettable else "ru_maxrss (process lifetime)"
        )

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        kib = _proc_status_kib("VmRSS")
        return 0 if kib is None else kib * 1024

    def reset(self, trim: bool = True) -> int:
        """Start a new phase; returns the current usage (after trimming the heap)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self.current()
        if trim:
            release_host_memory()
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.resettable = False
        return self.current()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        kib = _proc_status_kib("VmHWM") if self.resettable else None
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib * 1024


def resident_bytes(device: torch.device | str = "cpu") -> int:
    """Memory in use now: allocated CUDA memory, or the process RSS (after a heap trim)."""
    device = torch.device(device)
    if device.type != "cuda":
        release_host_memory()
    return PeakMemoryMeter(device).current()


def automatic_budget(device: torch.device | str = "cpu", fraction: float = 0.85) -> int:
    """A budget from free memory: what is in use now plus ``fraction`` of what is free.

    CUDA: ``torch.cuda.mem_get_info`` (free device memory, other processes included). CPU:
    ``MemAvailable`` of /proc/meminfo (free + reclaimable page cache).
    """
    device = torch.device(device)
    used = resident_bytes(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # The caching allocator's reserved-but-free blocks are reusable too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _meminfo_available()
    return int(used + fraction * free)

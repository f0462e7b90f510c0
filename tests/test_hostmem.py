"""codsr.hostmem: peak metering, resident memory, automatic budgets; imports nothing from codsr."""

import ast
from pathlib import Path

import pytest
import torch

import codsr.hostmem as hostmem
from codsr.hostmem import PeakMemoryMeter, automatic_budget, resident_bytes

MB = 1024**2


def test_imports_nothing_from_codsr():
    tree = ast.parse(Path(hostmem.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "codsr"]


def test_cpu_meter_sees_a_256_mb_allocation_and_resets():
    meter = PeakMemoryMeter("cpu")
    assert meter.resettable  # Linux with /proc/self/clear_refs (the CI machine)
    assert meter.method.startswith("VmHWM")
    start = meter.reset()
    x = torch.ones(256 * MB // 4)  # touched pages count in RSS
    peak = meter.peak()
    assert peak - start >= 250 * MB
    del x
    start2 = meter.reset()
    assert meter.peak() - start2 < 64 * MB  # the old peak is forgotten


def test_resident_bytes_is_the_process_rss():
    kib = hostmem._proc_status_kib("VmRSS")
    assert kib is not None and abs(resident_bytes("cpu") - kib * 1024) < 64 * MB
    assert hostmem._proc_status_kib("NoSuchField") is None


def test_automatic_budget_is_in_use_plus_part_of_available():
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    assert abs(hostmem._meminfo_available() - avail) < 256 * MB
    used = resident_bytes("cpu")
    budget = automatic_budget("cpu", fraction=0.5)
    # both read at slightly different times: allow 256 MB of drift from other processes
    assert abs(budget - (used + 0.5 * avail)) < 256 * MB


def test_meminfo_unreadable_names_the_fix(monkeypatch):
    def fail(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr("builtins.open", fail)
    with pytest.raises(RuntimeError, match="max_memory=<GB>"):
        hostmem._meminfo_available()


def test_configure_host_allocator_picks_the_mode_by_budget(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "_mallopt", lambda *settings: calls.append(settings) or True)
    monkeypatch.setattr(hostmem, "release_host_memory", lambda: calls.append("trim"))
    assert hostmem.configure_host_allocator(budgeted=False) == "reuse"
    # every tensor from the heap (M_MMAP_MAX = 0), freed memory kept up to 2 GiB (M_TRIM_THRESHOLD)
    assert calls == [((-4, 0), (-1, 2**31 - 1))]
    calls.clear()
    assert hostmem.configure_host_allocator(budgeted=True) == "limit_fragmentation"
    # back to glibc's defaults for M_MMAP_MAX / M_TRIM_THRESHOLD, 1 MiB mmap threshold, kept memory returned
    assert calls == [((-4, 65536), (-1, 128 * 1024), (-3, 1 << 20)), "trim"]
    calls.clear()
    assert hostmem.configure_host_allocator(budgeted=False, tiled=True) == "limit_fragmentation"  # large images
    assert calls == [((-4, 65536), (-1, 128 * 1024), (-3, 1 << 20)), "trim"]
    calls.clear()
    assert hostmem.configure_host_allocator(budgeted=False, device="cuda:0") == "default"  # not the heap's job
    assert calls == []
    monkeypatch.setattr(hostmem, "_mallopt", lambda *settings: False)  # not glibc
    assert hostmem.configure_host_allocator(budgeted=False) == "default"


_FAULTS = """
import resource, sys, torch
import codsr.hostmem as h
assert h.configure_host_allocator(budgeted=sys.argv[1] == "budget") != "default"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(128 << 20)  # 512 MB, freed
del x
f0 = faults()
ys = [torch.ones(16 << 20) for _ in range(3)]  # 3 × 64 MB: they fit in the freed block
print(faults() - f0)
"""


def test_reuse_mode_stops_refaulting_freed_memory():
    """The real effect, in a fresh process each: tensors allocated after a large one was freed are
    page-faulted anew (3 × 16384 pages of 4 KiB) in the budget mode, not in reuse mode."""
    import subprocess
    import sys

    if not hostmem._mallopt():  # no settings asked: True exactly where glibc's mallopt is reachable
        pytest.skip("glibc's malloc is not the allocator here (outside the project)")
    out = {m: int(subprocess.run([sys.executable, "-c", _FAULTS, m], capture_output=True, text=True,
                                 check=True).stdout.split()[-1]) for m in ("budget", "reuse")}  # fmt: skip
    assert out["budget"] > 20000  # 49152 pages measured (fewer with transparent huge pages)
    assert out["reuse"] < 1000  # 0 measured

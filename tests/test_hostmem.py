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

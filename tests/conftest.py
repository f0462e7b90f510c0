"""Shared test set-up: quiet, deterministic CPU runs and paths to ../shared."""

from __future__ import annotations

import os

# Must be set before torch is imported: the default OpenMP spin policy makes the 2-core CI
# machine 2-3x slower and erratic (shared/ENVIRONMENT.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path inside ../shared; skips the test with a clear reason when the file is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (tests expect ../shared beside the clone)")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not found (tests expect ../shared beside the clone)")
    return SHARED

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


PARITY = ("fixtures", "official_parity")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The official-code parity fixture (tiny SD-2.1-like model + release checkpoint + tensors)."""
    return shared_path(*PARITY)


@pytest.fixture(scope="session")
def tiny_pipeline(parity_dir):
    """CODSRPipeline on the fixture's tiny model and synthetic release checkpoint (fp32, CPU)."""
    import torch

    from codsr import CODSRPipeline

    return CODSRPipeline.from_pretrained(
        parity_dir / "tiny-sd21", parity_dir / "codsr_tiny.pkl", device="cpu", torch_dtype=torch.float32
    )


@pytest.fixture(scope="session")
def parity_case(parity_dir):
    """Loader for the fixture's npz cases as dicts of torch tensors / str."""
    import numpy as np
    import torch

    cache: dict = {}

    def load(name: str) -> dict:
        if name not in cache:
            z = np.load(parity_dir / f"case_{name}.npz", allow_pickle=False)
            cache[name] = {k: (str(z[k]) if z[k].dtype.kind == "U" else torch.from_numpy(z[k])) for k in z.files}
        return cache[name]

    return load

"""Learned Table 1 metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPQA) through pyiqa (optional).

pyiqa is licensed PolyForm Noncommercial, so it is an optional extra
(``pip install 'codsr[metrics]'``) and imported only here, only when a learned metric is asked
for. pyiqa downloads its weights on first use; offline, a missing file surfaces as a network
error deep inside pyiqa, torchvision, timm or CLIP. We turn that into
:class:`MetricWeightsMissingError`, naming every file the metric needs and where pyiqa (and the
libraries it calls) look for it.

Where the files live (pyiqa 0.1.13-0.1.16):

- pyiqa's own weights: ``pyiqa.utils.download_util.DEFAULT_CACHE_DIR`` =
  ``torch.hub.get_dir()/pyiqa`` (``$TORCH_HOME/hub/pyiqa``, default ``~/.cache/torch/hub/pyiqa``),
  fixed when pyiqa is imported;
- torchvision backbones (LPIPS AlexNet, DISTS VGG16): ``torch.hub.get_dir()/checkpoints``;
- OpenAI CLIP (CLIPQA+): ``torch.hub.get_dir()/clip``;
- timm ViT-B/8 (MANIQA): the Hugging Face hub cache (``$HF_HOME/hub``), repo
  ``timm/vit_base_patch8_224.augreg2_in21k_ft_in1k``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codsr.evaluation.metrics import MetricSpec

PYIQA_INSTALL_HINT = "pip install 'codsr[metrics]'"
_HF_WEIGHTS = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"


class MetricsUnavailableError(RuntimeError):
    """A requested metric cannot run in this environment."""


class PyiqaNotInstalledError(MetricsUnavailableError):
    """A learned metric was requested but pyiqa does not import."""


class MetricWeightsMissingError(MetricsUnavailableError):
    """pyiqa could not load (or download) a metric's weights."""


@dataclass(frozen=True)
class WeightFile:
    """One file a pyiqa metric loads; ``location`` says which cache holds it."""

    file_name: str
    location: str  # "pyiqa" | "torch-checkpoints" | "clip" | "hf-hub"
    source: str  # download URL, or Hugging Face repo id for "hf-hub"


WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "lpips": (
        WeightFile("LPIPS_v0.1_alex-df73285e.pth", "pyiqa", _HF_WEIGHTS + "LPIPS_v0.1_alex-df73285e.pth"),
        WeightFile(
            "alexnet-owt-7be5be79.pth",
            "torch-checkpoints",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        ),
    ),
    "dists": (
        WeightFile("DISTS_weights-f5e65c96.pth", "pyiqa", _HF_WEIGHTS + "DISTS_weights-f5e65c96.pth"),
        WeightFile(
            "vgg16-397923af.pth",
            "torch-checkpoints",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
        ),
    ),
    "niqe": (WeightFile("niqe_modelparameters.mat", "pyiqa", _HF_WEIGHTS + "niqe_modelparameters.mat"),),
    "musiq": (
        WeightFile("musiq_koniq_ckpt-e95806b9.pth", "pyiqa", _HF_WEIGHTS + "musiq_koniq_ckpt-e95806b9.pth"),
    ),
    "maniqa": (
        WeightFile("MANIQA_PIPAL-ae6d356b.pth", "pyiqa", _HF_WEIGHTS + "MANIQA_PIPAL-ae6d356b.pth"),
        WeightFile("model.safetensors", "hf-hub", "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"),
    ),
    "clipiqa": (
        WeightFile(
            "CLIPIQA+_ViTL14_512-e66488f2.pth", "pyiqa", _HF_WEIGHTS + "CLIPIQA+_ViTL14_512-e66488f2.pth"
        ),
        WeightFile(
            "ViT-L-14.pt",
            "clip",
            "https://openaipublic.azureedge.net/clip/models/"
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        ),
    ),
}
# timm accepts either file from the hub repo.
_HF_ALTERNATIVES = {"model.safetensors": ("model.safetensors", "pytorch_model.bin")}


def import_pyiqa() -> Any:
    """Import pyiqa or raise :class:`PyiqaNotInstalledError` with the install command."""
    try:
        return importlib.import_module("pyiqa")
    except ImportError as exc:
        raise PyiqaNotInstalledError(
            f"the learned metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPQA) need pyiqa, which is not "
            f"installed ({exc}). Install the optional extra: {PYIQA_INSTALL_HINT} "
            "(pyiqa is licensed PolyForm Noncommercial). PSNR and SSIM work without it."
        ) from exc


def pyiqa_available() -> bool:
    """True when pyiqa imports."""
    try:
        import_pyiqa()
    except PyiqaNotInstalledError:
        return False
    return True


def pyiqa_version() -> str | None:
    """Installed pyiqa version, or None."""
    from importlib import metadata

    try:
        return metadata.version("pyiqa")
    except metadata.PackageNotFoundError:
        return None


def _torch_hub_dir() -> Path:
    try:
        import torch

        return Path(torch.hub.get_dir())
    except ImportError:  # pragma: no cover - torch is a hard dependency of codsr
        base = os.environ.get("TORCH_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
        )
        return Path(base) / "hub"


def pyiqa_cache_dir() -> Path:
    """Where pyiqa looks for (and downloads) its own weight files."""
    try:
        return Path(importlib.import_module("pyiqa.utils.download_util").DEFAULT_CACHE_DIR)
    except (ImportError, AttributeError):
        return _torch_hub_dir() / "pyiqa"


def _hf_cached(repo_id: str, file_name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a codsr dependency
        return None
    for name in _HF_ALTERNATIVES.get(file_name, (file_name,)):
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


def expected_path(wf: WeightFile) -> Path:
    """Where the file is (or would be) on this machine; for hub files, the hub cache folder."""
    if wf.location == "pyiqa":
        return pyiqa_cache_dir() / wf.file_name
    if wf.location == "torch-checkpoints":
        return _torch_hub_dir() / "checkpoints" / wf.file_name
    if wf.location == "clip":
        return _torch_hub_dir() / "clip" / wf.file_name
    if wf.location == "hf-hub":
        hit = _hf_cached(wf.source, wf.file_name)
        if hit is not None:
            return hit
        from huggingface_hub.constants import HF_HUB_CACHE

        return Path(HF_HUB_CACHE) / ("models--" + wf.source.replace("/", "--"))
    raise ValueError(f"unknown weight location {wf.location!r}")


def _present(wf: WeightFile) -> bool:
    if wf.location == "hf-hub":
        return _hf_cached(wf.source, wf.file_name) is not None
    return expected_path(wf).is_file()


def missing_weight_files(spec: MetricSpec) -> list[tuple[WeightFile, Path]]:
    """The files ``spec`` needs that are not on this machine, with where each should be."""
    return [(wf, expected_path(wf)) for wf in WEIGHT_FILES.get(spec.name, ()) if not _present(wf)]


def weights_present(spec: MetricSpec) -> bool:
    """True when every file the metric needs is already cached (so it can run offline)."""
    return not missing_weight_files(spec)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weight_file_records(spec: MetricSpec) -> list[dict[str, Any]]:
    """Provenance of the metric's weight files: name, path, sha256 (None where not found)."""
    records = []
    for wf in WEIGHT_FILES.get(spec.name, ()):
        path = expected_path(wf)
        found = _present(wf)
        records.append(
            {
                "file": wf.file_name,
                "source": wf.source,
                "path": str(path),
                "sha256": sha256_file(path) if found and path.is_file() else None,
            }
        )
    return records


def _missing_message(spec: MetricSpec, missing: list[tuple[WeightFile, Path]], exc: BaseException) -> str:
    lines = [
        f"metric {spec.name!r} (pyiqa {spec.pyiqa_name!r}) could not load its weights: "
        f"{type(exc).__name__}: {exc}"
    ]
    if missing:
        lines.append("Missing files (download each and place it at the path shown):")
        for wf, path in missing:
            if wf.location == "hf-hub":
                lines.append(f"  - {wf.file_name} of Hugging Face repo {wf.source} -> hub cache {path}")
            else:
                lines.append(f"  - {wf.file_name} from {wf.source} -> {path}")
    lines.append(
        f"pyiqa looks for its own files in {pyiqa_cache_dir()} (= $TORCH_HOME/hub/pyiqa; set TORCH_HOME "
        "before starting to use another folder)."
    )
    return "\n".join(lines)


def create_pyiqa_metric(spec: MetricSpec, device: str = "cpu") -> Any:
    """``pyiqa.create_metric`` for the Table 1 variant of ``spec``, with clear errors.

    Raises:
        PyiqaNotInstalledError: pyiqa does not import.
        MetricWeightsMissingError: pyiqa failed while fetching/loading weights (offline, missing file).
    """
    if spec.backend != "pyiqa" or not spec.pyiqa_name:
        raise ValueError(f"metric {spec.name!r} is not a pyiqa metric")
    pyiqa = import_pyiqa()
    try:
        return pyiqa.create_metric(spec.pyiqa_name, device=device, as_loss=False)
    except (ImportError, KeyError, TypeError) as exc:
        # A broken install or an API change, not missing weights: keep the original error visible.
        raise MetricsUnavailableError(
            f"pyiqa {pyiqa_version()} cannot create metric {spec.pyiqa_name!r}: {type(exc).__name__}: {exc}. "
            f"Reinstall with {PYIQA_INSTALL_HINT}."
        ) from exc
    except Exception as exc:  # network/IO errors come from urllib, requests, huggingface_hub, ...
        raise MetricWeightsMissingError(_missing_message(spec, missing_weight_files(spec), exc)) from exc


def u8_to_pyiqa_tensor(img_u8: np.ndarray) -> Any:
    """uint8 (H, W, 3) RGB → float32 (1, 3, H, W) in [0, 1], as pyiqa's own image reader makes it."""
    import torch

    return (
        torch.from_numpy(np.array(img_u8, dtype=np.uint8, copy=True))
        .permute(2, 0, 1)
        .unsqueeze(0)
        .float()
        .div(255.0)
    )


def score_pyiqa(metric: Any, pred_u8: np.ndarray, gt_u8: np.ndarray | None = None) -> float:
    """Run a created pyiqa metric on one image (pair) and return a float."""
    import torch

    x = u8_to_pyiqa_tensor(pred_u8)
    with torch.no_grad():
        out = metric(x) if gt_u8 is None else metric(x, u8_to_pyiqa_tensor(gt_u8))
    return float(torch.as_tensor(out).reshape(-1)[0].item())

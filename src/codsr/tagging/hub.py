"""Where the tagger's weights come from: local paths or Hugging Face Hub references.

A weight argument is either a local file (a directory is searched for the default file name) or a
Hub reference ``hf://[spaces/|datasets/]OWNER/REPO[@REVISION]/PATH/IN/REPO``, downloaded with
``huggingface_hub.hf_hub_download`` into the usual Hub cache.

Published files (checked 2026-11):

* RAM Swin-L 14M, ``ram_swin_large_14m.pth`` (5.6 GB, Apache-2.0): the RAM authors' model repo
  ``xinyu1205/recognize_anything_model`` (:data:`DEFAULT_RAM`); the same file is in their Space
  ``spaces/xinyu1205/recognize-anything``, the link CODSR's and SeeSR's READMEs give.
* DAPE ``DAPE.pth`` (SeeSR, 6.8 MiB of LoRA, Apache-2.0): the SeeSR authors publish it on
  Google Drive / OneDrive (SeeSR README) and in the OSEDiff GitHub repository
  (``https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth``), not on the Hub. A Hub
  copy exists in the third-party repo ``alexnasa/SEESR`` (:data:`DEFAULT_DAPE`); prefer a
  download from the authors and pass the local path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DAPE_SOURCES",
    "DEFAULT_DAPE",
    "DEFAULT_RAM",
    "RAM_SOURCES",
    "HubFile",
    "parse_hub_ref",
    "resolve_weight",
]

DEFAULT_RAM = "hf://xinyu1205/recognize_anything_model/ram_swin_large_14m.pth"
DEFAULT_DAPE = "hf://alexnasa/SEESR/DAPE.pth"
RAM_SOURCES = (
    "https://huggingface.co/xinyu1205/recognize_anything_model/blob/main/ram_swin_large_14m.pth",
    "https://huggingface.co/spaces/xinyu1205/recognize-anything/blob/main/ram_swin_large_14m.pth",
)
DAPE_SOURCES = (
    "https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth",
    "https://drive.google.com/drive/folders/12HXrRGEXUAnmHRaf0bIn-S8XSK4Ku0JO (SeeSR README)",
    "https://huggingface.co/alexnasa/SEESR/blob/main/DAPE.pth (third-party mirror)",
)
_SOURCES = {"ram_swin_large_14m.pth": RAM_SOURCES, "DAPE.pth": DAPE_SOURCES}


@dataclass(frozen=True)
class HubFile:
    """One file in a Hugging Face Hub repository."""

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str | None = None

    @property
    def url(self) -> str:
        kind = {"model": "", "space": "spaces/", "dataset": "datasets/"}[self.repo_type]
        return f"https://huggingface.co/{kind}{self.repo_id}/blob/{self.revision or 'main'}/{self.filename}"


def parse_hub_ref(ref: str) -> HubFile:
    """Parse ``hf://[spaces/|datasets/]OWNER/REPO[@REVISION]/PATH`` into a :class:`HubFile`."""
    if not ref.startswith("hf://"):
        raise ValueError(f"not a Hub reference (must start with 'hf://'): {ref!r}")
    parts = ref[len("hf://") :].split("/")
    repo_type = "model"
    if parts and parts[0] in ("spaces", "datasets"):
        repo_type = parts.pop(0)[:-1]
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"Hub reference {ref!r} must look like hf://OWNER/REPO[@REVISION]/FILE")
    name, _, revision = parts[1].partition("@")
    return HubFile(f"{parts[0]}/{name}", "/".join(parts[2:]), repo_type, revision or None)


def _where_to_get(filename: str) -> str:
    sources = _SOURCES.get(Path(filename).name)
    return "; published at " + ", ".join(sources) if sources else ""


def resolve_weight(
    ref: str | os.PathLike, default_name: str, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Local path of a weight file given as a path, a directory or an ``hf://`` reference.

    Raises ``FileNotFoundError`` naming the file and where it is published when it is not on disk
    and cannot be downloaded (offline, ``HF_HUB_OFFLINE=1``, no access, ...).
    """
    ref_str = os.fspath(ref)
    if not ref_str.startswith("hf://"):
        path = Path(ref_str).expanduser()
        if path.is_dir():
            path = path / default_name
        if not path.is_file():
            raise FileNotFoundError(f"weight file not found: {path}{_where_to_get(default_name)}")
        return path
    hub = parse_hub_ref(ref_str)
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                hub.repo_id, hub.filename, repo_type=hub.repo_type, revision=hub.revision, cache_dir=cache_dir
            )
        )
    except Exception as exc:  # offline, 404, gated, network: all mean "file unavailable" here
        from huggingface_hub import constants

        offline = " with HF_HUB_OFFLINE set" if constants.HF_HUB_OFFLINE else ""
        detail = (str(exc).splitlines() or [""])[0].rstrip(".")
        raise FileNotFoundError(
            f"could not get {hub.filename} from the Hugging Face Hub{offline} ({hub.url}): "
            f"{type(exc).__name__}: {detail}. Download it yourself and pass its local path"
            f"{_where_to_get(hub.filename)}"
        ) from exc

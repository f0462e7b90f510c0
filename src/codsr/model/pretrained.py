"""The CODSR model folder: ``codsr_config.json`` + ``codsr.safetensors``, local or on the Hub.

A folder written by :func:`save_pretrained` describes itself: the config names the base model
(repo id + revision), the LoRA layout (ranks, alpha, target modules; docs/method.md#lora-layout),
the RGPA constants (paper Eq. 3; docs/method.md#rgpa), the LQFM shape (paper Eq. 4;
docs/method.md#lqfm), the default timestep and the tagger; the weights are the checkpoint in
codsr's safetensors layout (docs/method.md#checkpoint-format). No pickle is ever written or read
here: the release's ``codsr.pkl`` goes through :func:`codsr.model.checkpoint.load_checkpoint`
(``torch.load(weights_only=True)``, no code from the file runs) in :func:`convert_checkpoint`.

A local folder and a Hub repo id load the same way (:func:`resolve_folder`, which calls
``huggingface_hub.snapshot_download`` with the revision, cache and ``local_files_only``;
``HF_HUB_OFFLINE=1`` serves the cache). :func:`push_folder` uploads a folder with a generated
model card (:func:`model_card`).

This module belongs to the model layer and imports nothing from :mod:`codsr.pipeline`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codsr.model.checkpoint import (
    DEFAULT_BASE_MODEL,
    DEFAULT_TIMESTEP,
    CheckpointError,
    CODSRCheckpoint,
    load_checkpoint,
)
from codsr.model.lora import RELEASE_LORA_ALPHA, UNET_GROUPS
from codsr.model.lqfm import UNSHUFFLE
from codsr.model.rgpa import DEFAULT_RGPA, RGPAParams

__all__ = [
    "CONFIG_NAME",
    "PRETRAINED_FORMAT",
    "PRETRAINED_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CODSRConfig",
    "LoadPlan",
    "PretrainedError",
    "TaggerSettings",
    "convert_checkpoint",
    "is_pretrained_folder",
    "load_pretrained",
    "model_card",
    "plan_load",
    "push_folder",
    "push_pipeline_folder",
    "save_pipeline_folder",
    "resolve_folder",
    "save_pretrained",
]

CONFIG_NAME = "codsr_config.json"
WEIGHTS_NAME = "codsr.safetensors"
CARD_NAME = "README.md"
PRETRAINED_FORMAT = "codsr-pretrained"
PRETRAINED_FORMAT_VERSION = 1
# Stable Diffusion 2.1-base's licence on the Hub; a LoRA of it carries the same use restrictions.
DEFAULT_LICENSE = "openrail++"
PAPER_TITLE = "Bridging Fidelity-Reality with Controllable One-Step Diffusion for Image Super-Resolution"
PAPER_URL = "https://github.com/Chanson94/CODSR"
CITATION = """@inproceedings{chen2026codsr,
  title     = {Bridging Fidelity-Reality with Controllable One-Step Diffusion for Image Super-Resolution},
  author    = {Chen, Hao and Chen, Junyang and Pan, Jinshan and Dong, Jiangxin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026}
}"""


class PretrainedError(CheckpointError):
    """A CODSR model folder or repo that cannot be used; the message names what is missing and the fix."""


# ---------------------------------------------------------------------------------------- config
@dataclass
class TaggerSettings:
    """The tagger the model was trained with: ``name`` is ``"dape"``, ``"ram"`` or ``None``.

    ``ram``/``dape`` are weight references (local path or ``hf://OWNER/REPO[@REV]/FILE``); ``None``
    means the tagger's own default (RAM) or "pass it yourself" (DAPE, which has no official Hub copy).
    """

    name: str | None = "dape"
    ram: str | None = None
    dape: str | None = None


@dataclass
class CODSRConfig:
    """The content of ``codsr_config.json`` (format :data:`PRETRAINED_FORMAT` v1)."""

    rank_vae: int
    rank_unet: int
    vae_lora_modules: list[str]
    unet_lora_modules: dict[str, list[str]]
    stage: int = 2
    lora_alpha: int = RELEASE_LORA_ALPHA
    base_model: str = DEFAULT_BASE_MODEL
    base_model_revision: str | None = None
    default_timestep: int = DEFAULT_TIMESTEP
    rgpa: RGPAParams = DEFAULT_RGPA
    lqfm_in_channels: int = 3 * UNSHUFFLE * UNSHUFFLE
    lqfm_channels: int = 320
    tagger: TaggerSettings = field(default_factory=TaggerSettings)
    format_version: int = PRETRAINED_FORMAT_VERSION

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: CODSRCheckpoint,
        *,
        base_model: str | os.PathLike | None = None,
        base_model_revision: str | None = None,
        default_timestep: int | None = None,
        tagger: TaggerSettings | None = None,
        rgpa: RGPAParams | None = None,
    ) -> CODSRConfig:
        """The config of ``ckpt``; unset fields come from the checkpoint's metadata, then the defaults."""
        meta = ckpt.metadata
        sft_w = ckpt.sft.get("SFT_scale_conv0.weight")
        return cls(
            rank_vae=int(ckpt.rank_vae),
            rank_unet=int(ckpt.rank_unet),
            vae_lora_modules=list(ckpt.vae_lora_modules),
            unet_lora_modules={g: list(ckpt.unet_lora_modules[g]) for g in UNET_GROUPS},
            stage=ckpt.stage,
            base_model=str(base_model if base_model is not None else meta.get("base_model") or DEFAULT_BASE_MODEL),
            base_model_revision=base_model_revision if base_model_revision is not None
            else meta.get("base_model_revision"),
            default_timestep=int(default_timestep if default_timestep is not None
                                 else meta.get("default_timestep", DEFAULT_TIMESTEP)),
            rgpa=rgpa or DEFAULT_RGPA,
            lqfm_in_channels=int(sft_w.shape[1]) if sft_w is not None else 3 * UNSHUFFLE * UNSHUFFLE,
            lqfm_channels=int(sft_w.shape[0]) if sft_w is not None else 320,
            tagger=tagger or TaggerSettings(),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        from codsr import __version__

        return {
            "_class_name": "CODSRPipeline",
            "format": PRETRAINED_FORMAT,
            "format_version": self.format_version,
            "codsr_version": __version__,
            "weights": WEIGHTS_NAME,
            "stage": self.stage,
            "base_model": {"repo_id": self.base_model, "revision": self.base_model_revision},
            "default_timestep": self.default_timestep,
            "lora": {
                "alpha": self.lora_alpha,
                "rank_vae": self.rank_vae,
                "rank_unet": self.rank_unet,
                "alignment": self.stage == 2,
                "vae_encoder_modules": self.vae_lora_modules,
                "unet_modules": self.unet_lora_modules,
            },
            "rgpa": asdict(self.rgpa),
            "lqfm": {"in_channels": self.lqfm_in_channels, "channels": self.lqfm_channels, "unshuffle": UNSHUFFLE},
            "tagger": asdict(self.tagger),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CONFIG_NAME) -> CODSRConfig:
        def need(mapping: dict[str, Any], key: str, where: str = "") -> Any:
            if not isinstance(mapping, dict) or key not in mapping:
                raise PretrainedError(f"{source}: key {where}{key!r} is missing from {CONFIG_NAME}")
            return mapping[key]

        if d.get("format") != PRETRAINED_FORMAT:
            raise PretrainedError(
                f"{source}: 'format' is {d.get('format')!r}, expected {PRETRAINED_FORMAT!r}; not a CODSR model config"
            )
        version = int(need(d, "format_version"))
        if version > PRETRAINED_FORMAT_VERSION:
            raise PretrainedError(
                f"{source}: format_version {version} is newer than this codsr understands "
                f"({PRETRAINED_FORMAT_VERSION}); upgrade codsr (pip install -U codsr)"
            )
        lora, base = need(d, "lora"), need(d, "base_model")
        unet_modules = need(lora, "unet_modules", "lora.")
        for g in UNET_GROUPS:
            need(unet_modules, g, "lora.unet_modules.")
        lqfm = d.get("lqfm") or {}
        if int(lqfm.get("unshuffle", UNSHUFFLE)) != UNSHUFFLE:
            raise PretrainedError(f"{source}: lqfm.unshuffle must be {UNSHUFFLE} (the VAE's downsampling factor)")
        try:
            rgpa = RGPAParams(**d.get("rgpa", {}))
            tagger = TaggerSettings(**d.get("tagger", {}))
        except TypeError as e:
            raise PretrainedError(f"{source}: bad 'rgpa' or 'tagger' section: {e}") from e
        return cls(
            rank_vae=int(need(lora, "rank_vae", "lora.")),
            rank_unet=int(need(lora, "rank_unet", "lora.")),
            vae_lora_modules=list(need(lora, "vae_encoder_modules", "lora.")),
            unet_lora_modules={g: list(unet_modules[g]) for g in UNET_GROUPS},
            stage=int(d.get("stage", 2)),
            lora_alpha=int(lora.get("alpha", RELEASE_LORA_ALPHA)),
            base_model=str(need(base, "repo_id", "base_model.")),
            base_model_revision=base.get("revision"),
            default_timestep=int(d.get("default_timestep", DEFAULT_TIMESTEP)),
            rgpa=rgpa,
            lqfm_in_channels=int(lqfm.get("in_channels", 3 * UNSHUFFLE * UNSHUFFLE)),
            lqfm_channels=int(lqfm.get("channels", 320)),
            tagger=tagger,
            format_version=version,
        )

    def check_matches(self, ckpt: CODSRCheckpoint, source: str) -> None:
        """The weights must be the ones the config describes; name the first disagreement."""
        pairs = {
            "lora.rank_vae": (self.rank_vae, ckpt.rank_vae),
            "lora.rank_unet": (self.rank_unet, ckpt.rank_unet),
            "stage": (self.stage, ckpt.stage),
            "lora.vae_encoder_modules": (self.vae_lora_modules, list(ckpt.vae_lora_modules)),
            **{f"lora.unet_modules.{g}": (self.unet_lora_modules[g], list(ckpt.unet_lora_modules[g]))
               for g in UNET_GROUPS},
        }  # fmt: skip
        for name, (cfg, wts) in pairs.items():
            if cfg != wts:
                raise PretrainedError(
                    f"{source}: {CONFIG_NAME} {name} disagrees with {WEIGHTS_NAME}; the folder is inconsistent, "
                    "re-create it with save_pretrained or `codsr convert`"
                )
        if self.lora_alpha != RELEASE_LORA_ALPHA:
            raise PretrainedError(f"{source}: lora.alpha {self.lora_alpha} is not supported (CODSR uses {RELEASE_LORA_ALPHA})")
        sft_w = ckpt.sft["SFT_scale_conv0.weight"]
        if (int(sft_w.shape[1]), int(sft_w.shape[0])) != (self.lqfm_in_channels, self.lqfm_channels):
            raise PretrainedError(
                f"{source}: lqfm in/out channels ({self.lqfm_in_channels}, {self.lqfm_channels}) disagree with the SFT "
                f"weights ({sft_w.shape[1]}, {sft_w.shape[0]})"
            )


# ---------------------------------------------------------------------------------------- folder I/O
def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_pretrained(
    ckpt: CODSRCheckpoint, save_directory: str | os.PathLike, config: CODSRConfig | None = None
) -> Path:
    """Write ``save_directory/{codsr.safetensors, codsr_config.json}`` (each file atomically; the
    config last, so a folder with a config is complete). Existing files are replaced."""
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_pretrained needs a folder, {str(out)!r} is a file")
    config = config or CODSRConfig.from_checkpoint(ckpt)
    config.check_matches(ckpt, str(out))
    out.mkdir(parents=True, exist_ok=True)
    # The safetensors header repeats the identity fields, so the weights file alone stays loadable.
    meta = {**ckpt.metadata, "base_model": config.base_model, "base_model_revision": config.base_model_revision,
            "default_timestep": config.default_timestep}  # fmt: skip
    meta.pop("source_format", None)
    CODSRCheckpoint(**{**ckpt.__dict__, "metadata": meta}).save(out / WEIGHTS_NAME, format="safetensors")
    _write_text_atomic(out / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    return out


@dataclass
class PretrainedModel:
    """A loaded folder: its config, its weights and where it came from."""

    config: CODSRConfig
    checkpoint: CODSRCheckpoint
    folder: Path


def load_pretrained(folder: str | os.PathLike) -> PretrainedModel:
    """Read a local CODSR folder (config + safetensors weights) and check they agree."""
    folder = Path(folder)
    cfg_path, wts_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise PretrainedError(
            f"{str(folder)!r} has no {CONFIG_NAME}: not a CODSR model folder. Create one with "
            "`codsr convert codsr.pkl OUT_DIR` or CODSRPipeline.save_pretrained(OUT_DIR)"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{cfg_path}: not valid JSON ({e})") from e
    config = CODSRConfig.from_dict(raw, str(cfg_path))
    weights_name = raw.get("weights", WEIGHTS_NAME)
    if weights_name != WEIGHTS_NAME:
        wts_path = folder / weights_name
    if not wts_path.is_file():
        raise PretrainedError(
            f"{str(folder)!r} has {CONFIG_NAME} but not its weights {wts_path.name!r}; the download or copy is "
            "incomplete (download the whole folder again)"
        )
    ckpt = CODSRCheckpoint.from_safetensors(wts_path)
    config.check_matches(ckpt, str(folder))
    return PretrainedModel(config, ckpt, folder)


def convert_checkpoint(
    checkpoint: str | os.PathLike | CODSRCheckpoint,
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    base_model_revision: str | None = None,
    default_timestep: int | None = None,
    tagger: TaggerSettings | None = None,
) -> Path:
    """Turn a release ``codsr.pkl``, a trained ``.pkl`` or a codsr ``.safetensors`` into a model folder.

    The pickle is read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`): no code
    stored in the file runs. The tensors are copied unchanged, so the folder restores bit-identically.
    """
    ckpt = checkpoint if isinstance(checkpoint, CODSRCheckpoint) else load_checkpoint(checkpoint)
    config = CODSRConfig.from_checkpoint(
        ckpt, base_model=base_model, base_model_revision=base_model_revision,
        default_timestep=default_timestep, tagger=tagger,
    )  # fmt: skip
    return save_pretrained(ckpt, out_dir, config)


# ---------------------------------------------------------------------------------------- resolution
def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") != 1


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder holding a CODSR model: ``name_or_path`` itself, or the snapshot of the Hub
    repo ``owner/name`` at ``revision`` (downloaded into the Hub cache, or read from it when
    ``local_files_only`` or ``HF_HUB_OFFLINE=1``). Only the config and the weights are fetched."""
    ref = str(name_or_path)
    local = Path(ref).expanduser()
    if local.is_dir():
        if not is_pretrained_folder(local):
            raise PretrainedError(
                f"folder {ref!r} has no {CONFIG_NAME}: not a CODSR model folder. Convert a checkpoint with "
                "`codsr convert codsr.pkl OUT_DIR`, or pass an SD 2.1 base folder as base_model= with checkpoint="
            )
        return local
    if _looks_like_path(ref):
        raise PretrainedError(
            f"{ref!r} is neither an existing folder nor a Hub repo id 'owner/name'; check the path"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{ref!r}" + (f" at revision {revision!r}" if revision else "")
    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    try:
        path = Path(snapshot_download(
            ref, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], library_name="codsr",
        ))  # fmt: skip
    except HFValidationError as e:
        raise PretrainedError(f"{ref!r} is not a valid Hub repo id ('owner/name') nor an existing folder: {e}") from e
    except RevisionNotFoundError as e:
        raise PretrainedError(f"Hub repo {ref!r} has no revision {revision!r} (branch, tag or commit)") from e
    except GatedRepoError as e:
        raise PretrainedError(f"Hub repo {at} is gated: accept its terms on the Hub and log in (hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise PretrainedError(
            f"Hub repo {ref!r} not found (or private: log in with `hf auth login` or pass token=)"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ("local_files_only=True" if offline else "no network")
        raise PretrainedError(
            f"CODSR model {at} is not in the local Hub cache ({cache_dir or constants.HF_HUB_CACHE}) and {why} "
            "prevents a download; run once online (or `hf download "
            f"{ref}{' --revision ' + revision if revision else ''}`), or pass a local folder"
        ) from e
    if not (path / CONFIG_NAME).is_file():
        raise PretrainedError(
            f"Hub repo {at} has no {CONFIG_NAME}" + (" in the local cache" if offline else "") + ": not a CODSR "
            "model folder. For an SD 2.1 base model pass base_model= together with checkpoint="
        )
    if not (path / WEIGHTS_NAME).is_file():
        raise PretrainedError(
            f"Hub repo {at} has {CONFIG_NAME} but not {WEIGHTS_NAME}"
            + (" in the local cache (download it online once)" if offline else "")
        )
    return path


@dataclass
class LoadPlan:
    """What a pipeline needs to build itself, whatever the caller passed (see :func:`plan_load`)."""

    base_model: str
    base_model_revision: str | None
    checkpoint: CODSRCheckpoint | None
    config: CODSRConfig | None
    default_timestep: int = DEFAULT_TIMESTEP
    rgpa: RGPAParams = DEFAULT_RGPA
    folder: Path | None = None

    def tagger_paths(self, ram_path: Any, dape_path: Any) -> tuple[Any, Any]:
        """(ram, dape) weight references: the caller's, else the config's."""
        t = self.config.tagger if self.config is not None else TaggerSettings(name=None)
        return (ram_path if ram_path is not None else t.ram, dape_path if dape_path is not None else t.dape)

    def tagger_name(self, tagger: Any) -> Any:
        """``tagger="config"`` means the tagger named in the config (``None`` without a config)."""
        if isinstance(tagger, str) and tagger == "config":
            return self.config.tagger.name if self.config is not None else None
        return tagger


def plan_load(
    pretrained_model_name_or_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | CODSRCheckpoint | None = None,
    *,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    base_model_revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> LoadPlan:
    """Decide what ``CODSRPipeline.from_pretrained`` loads.

    * ``checkpoint`` given (the original API): the first argument (or ``base_model``) is the SD 2.1
      base and ``revision`` its revision.
    * First argument a CODSR folder or Hub repo id: config + weights from there (``revision`` is
      the CODSR repo's); the base model is the config's unless ``base_model`` is given.
    * First argument a ``.pkl``/``.safetensors`` file: that checkpoint on ``base_model`` (or the
      default), ``revision`` being the base model's.
    * First argument a diffusers folder (``model_index.json``) and no checkpoint: the bare base (original API).
    """
    first = None if pretrained_model_name_or_path is None else str(pretrained_model_name_or_path)
    if checkpoint is not None or first is None:
        if first is not None and base_model is not None:
            raise ValueError("pass the base model once: positionally or as base_model=, not both")
        ckpt = checkpoint if isinstance(checkpoint, CODSRCheckpoint) or checkpoint is None else load_checkpoint(checkpoint)
        return _plan_from_checkpoint(ckpt, first or base_model, base_model_revision or revision)
    local = Path(first).expanduser()
    if local.is_file():
        # a checkpoint file has no revision of its own: ``revision`` is the base model's, as with checkpoint=
        return _plan_from_checkpoint(load_checkpoint(local), base_model, base_model_revision or revision)
    if local.is_dir() and not is_pretrained_folder(local) and (local / "model_index.json").is_file():
        return _plan_from_checkpoint(None, base_model or first, base_model_revision or revision)
    folder = resolve_folder(first, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                            token=token)  # fmt: skip
    loaded = load_pretrained(folder)
    cfg = loaded.config
    if base_model is not None:
        base, base_rev = str(base_model), base_model_revision
    else:
        base, base_rev = cfg.base_model, base_model_revision or cfg.base_model_revision
    return LoadPlan(base, base_rev, loaded.checkpoint, cfg, cfg.default_timestep, cfg.rgpa, folder)


def _plan_from_checkpoint(
    ckpt: CODSRCheckpoint | None, base_model: str | os.PathLike | None, revision: str | None
) -> LoadPlan:
    base = str(base_model) if base_model is not None else DEFAULT_BASE_MODEL
    if ckpt is None:
        return LoadPlan(base, revision, None, None)
    cfg = CODSRConfig.from_checkpoint(ckpt, base_model=base, base_model_revision=revision)
    return LoadPlan(base, revision, ckpt, cfg, cfg.default_timestep, cfg.rgpa)


# ---------------------------------------------------------------------------------------- card + upload
def model_card(config: CODSRConfig, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> str:
    """README.md for the Hub: YAML metadata, what the model is, its settings, usage, citation."""
    base = config.base_model
    base_is_repo = not _looks_like_path(base)
    name = repo_id or "OWNER/NAME"
    meta = [
        "---",
        f"license: {license}",
        "library_name: codsr",
        "pipeline_tag: image-to-image",
        *( [f"base_model: {base}"] if base_is_repo else [] ),
        "tags:",
        *[f"- {t}" for t in ("super-resolution", "image-restoration", "diffusion", "one-step-diffusion", "lora",
                             "stable-diffusion", "codsr")],
        "---",
    ]  # fmt: skip
    rev = f"revision `{config.base_model_revision}`" if config.base_model_revision else "revision not pinned"
    settings = [
        "| setting | value |",
        "|---|---|",
        f"| stage | {config.stage} ({'with semantic alignment LoRA, λ_sem' if config.stage == 2 else 'stage 1'}) |",
        f"| base model | `{base}` ({rev}) |",
        f"| default timestep | {config.default_timestep} |",
        f"| LoRA rank (VAE encoder / UNet) | {config.rank_vae} / {config.rank_unet}, alpha {config.lora_alpha} |",
        f"| LoRA targets | {len(set(config.vae_lora_modules))} VAE-encoder modules; UNet "
        + ", ".join(f"{g} {len(set(config.unet_lora_modules[g]))}" for g in UNET_GROUPS) + " |",
        f"| RGPA (paper Eq. 3) | low {config.rgpa.low}, high {config.rgpa.high}, floor {config.rgpa.floor}, "
        f"patch {config.rgpa.patch} px |",
        f"| LQFM (paper Eq. 4) | PixelUnshuffle({UNSHUFFLE}) → SFT {config.lqfm_in_channels} → {config.lqfm_channels} ch |",
        f"| tagger | {config.tagger.name or 'none'} |",
        f"| format | `{CONFIG_NAME}` v{config.format_version} + `{WEIGHTS_NAME}` |",
    ]
    body = f"""
# CODSR: controllable one-step diffusion super-resolution

Weights of **CODSR** ({PAPER_TITLE}, CVPR 2026) in the codsr
library's folder format: LoRA adapters for the VAE encoder and UNet of Stable Diffusion 2.1-base
plus the LQ-guided feature modulation (SFT). The base model is not
included; it is loaded from `{base}`.

## Settings

{chr(10).join(settings)}

## Usage

```python
import torch
from PIL import Image
from codsr import CODSRPipeline

pipe = CODSRPipeline.from_pretrained("{name}", torch_dtype=torch.float16)
image = Image.open("low_res.png").convert("RGB")
sr = pipe(image, upscale=4, generator=torch.Generator().manual_seed(0))
sr.save("sr.png")
```

`timestep=` (fidelity ↔ generated detail) and `alignment_scale=` (λ_sem) are inference-time
settings. In ComfyUI, the codsr node pack's "Load CODSR model" node accepts `{name}`.

## Citation

```bibtex
{CITATION}
```

Paper and original code: {PAPER_URL}
"""
    return "\n".join(meta) + "\n" + body


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str = DEFAULT_LICENSE,
) -> Any:
    """Upload a CODSR folder to ``repo_id`` (created if needed; ``revision`` a branch, created from
    main if missing). A model card is generated unless the folder already has a README.md.
    Returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    loaded = load_pretrained(folder)  # refuses incomplete folders before anything is sent
    if _looks_like_path(loaded.config.base_model):
        warnings.warn(
            f"the config names a local base model {loaded.config.base_model!r}; users of {repo_id!r} will have to "
            "pass base_model=. Convert with --base-model OWNER/NAME (a Hub repo id) to avoid this",
            stacklevel=2,
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="codsr-push-") as tmp:
        stage = Path(tmp)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            _link_or_copy(folder / name, stage / name)
        card = folder / CARD_NAME
        if card.is_file():
            _link_or_copy(card, stage / CARD_NAME)
        else:
            (stage / CARD_NAME).write_text(model_card(loaded.config, repo_id, license), encoding="utf-8")
        return api.upload_folder(
            repo_id=repo_id, folder_path=stage, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload CODSR model (codsr format v{loaded.config.format_version})",
        )  # fmt: skip


def save_pipeline_folder(plan: LoadPlan | None, save_directory: str | os.PathLike) -> Path:
    """``CODSRPipeline.save_pretrained``: the checkpoint and config the pipeline was loaded from."""
    if plan is None or plan.checkpoint is None or plan.config is None:
        raise ValueError(
            "this pipeline holds no CODSR checkpoint to save (built without one, or by hand); load it with "
            "from_pretrained(..., checkpoint=...) or save a checkpoint with codsr.model.pretrained.save_pretrained"
        )
    return save_pretrained(plan.checkpoint, save_directory, plan.config)


def push_pipeline_folder(plan: LoadPlan | None, repo_id: str, **kwargs: Any) -> Any:
    """``CODSRPipeline.push_to_hub``: save the folder to a temporary place and :func:`push_folder` it."""
    with tempfile.TemporaryDirectory(prefix="codsr-save-") as tmp:
        save_pipeline_folder(plan, tmp)
        return push_folder(tmp, repo_id, **kwargs)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


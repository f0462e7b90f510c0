"""Loading the Stable Diffusion 2.1-base components (docs/method.md#base-model) with clear errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from codsr.model.checkpoint import DEFAULT_BASE_MODEL

# Stability AI removed the original repository from the Hub in late 2025; this mirror holds
# identical weights (docs/method.md#base-model).
BASE_MODEL_MIRROR = DEFAULT_BASE_MODEL
ORIGINAL_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"


class BaseModelNotFoundError(FileNotFoundError):
    """The SD 2.1-base model could not be found locally or on the Hub."""


@dataclass
class BaseComponents:
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


def _missing_message(base_model: str, component: str, err: Exception) -> str:
    hint = (
        f"Stable Diffusion 2.1-base component '{component}' could not be loaded from {base_model!r} ({err}). "
        f"Pass a local diffusers folder (with model_index.json and the unet/vae/text_encoder/tokenizer/scheduler "
        f"subfolders) or the Hub id of the maintained mirror {BASE_MODEL_MIRROR!r}, e.g. "
        f"`huggingface-cli download {BASE_MODEL_MIRROR} --local-dir sd21-base`."
    )
    if base_model == ORIGINAL_BASE_MODEL:
        hint += f" Note: {ORIGINAL_BASE_MODEL!r} was removed from the Hub; use {BASE_MODEL_MIRROR!r}."
    return hint


def load_base_components(
    base_model: str | os.PathLike = BASE_MODEL_MIRROR,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    components: tuple[str, ...] = ("vae", "unet", "text_encoder", "tokenizer", "scheduler"),
) -> BaseComponents:
    """Load SD 2.1-base components in float32 on the CPU from a local folder or a Hub id.

    Weights stay in float32 here: LoRA merging runs in float32 and the caller casts afterwards.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = str(base_model)
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser())
        if not (Path(base) / "model_index.json").is_file() and not (Path(base) / "unet").is_dir():
            raise BaseModelNotFoundError(
                f"{base!r} is not a diffusers model folder (no model_index.json / unet/). "
                f"Download the SD 2.1-base mirror {BASE_MODEL_MIRROR!r} in diffusers layout."
            )
    elif base.startswith((".", "/", "~")):
        raise BaseModelNotFoundError(f"base model folder {base!r} does not exist. " + _missing_message(base, "all", FileNotFoundError(base)))
    kw = {"revision": revision, "cache_dir": cache_dir}
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    loaders = {
        "vae": lambda: AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32, **kw),
        "unet": lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32, **kw),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            base, subfolder="text_encoder", torch_dtype=torch.float32, **kw
        ),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw),
        "scheduler": lambda: DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw),
    }
    out: dict[str, object] = {}
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        if name not in components:
            out[name] = None
            continue
        try:
            out[name] = loaders[name]()
        except (OSError, ValueError) as e:
            raise BaseModelNotFoundError(_missing_message(base, name, e)) from e
    return BaseComponents(**out)  # type: ignore[arg-type]

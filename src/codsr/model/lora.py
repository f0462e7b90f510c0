"""LoRA layout of CODSR (docs/method.md#lora-layout) on the stock diffusers UNet/VAE, with peft.

Module lists are built exactly as the release builds them (so exported checkpoints carry the same
lists); adapters are injected with peft (training) or merged straight into the base weights
(inference) with the same arithmetic the release's merge performs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# Substrings the release greps parameter names for (order matters for the VAE's duplicate entries).
VAE_LORA_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
UNET_LORA_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip

VAE_ADAPTER = "default_encoder"
UNET_GROUPS = ("encoder", "decoder", "others")
ALIGNMENT_SUFFIX = "_alignment"
# peft's default lora_alpha; the release never sets it, so the scale is 8 / r (docs/method.md#lora-layout).
RELEASE_LORA_ALPHA = 8


def unet_adapter_name(group: str, alignment: bool = False) -> str:
    """``default_encoder`` / ``default_decoder`` / ``default_others`` (+ ``_alignment``)."""
    if group not in UNET_GROUPS:
        raise ValueError(f"unknown UNet LoRA group {group!r}; expected one of {UNET_GROUPS}")
    return f"default_{group}" + (ALIGNMENT_SUFFIX if alignment else "")


def _lora_candidate_names(model: nn.Module) -> Iterable[str]:
    for name, _ in model.named_parameters():
        if "bias" in name or "norm" in name or not name.endswith(".weight"):
            continue
        yield name


def vae_lora_target_modules(vae: nn.Module) -> list[str]:
    """VAE encoder LoRA targets as the release lists them, duplicates included (docs/method.md#lora-layout).

    A name appears once per matching pattern, and ``quant_conv`` once per pattern: the on-disk
    list repeats names, and loaders treat it as a set.
    """
    names: list[str] = []
    for n in _lora_candidate_names(vae):
        module = n[: -len(".weight")]
        for pattern in VAE_LORA_PATTERNS:
            if pattern in n and "encoder" in n:
                names.append(module)
            elif "quant_conv" in n and "post_quant_conv" not in n:
                names.append(module)
    return names


def unet_lora_target_modules(unet: nn.Module) -> dict[str, list[str]]:
    """UNet LoRA targets routed to the encoder / decoder / others groups (docs/method.md#lora-layout)."""
    groups: dict[str, list[str]] = {g: [] for g in UNET_GROUPS}
    for n in _lora_candidate_names(unet):
        module = n[: -len(".weight")]
        if not any(p in n for p in UNET_LORA_PATTERNS):
            continue
        if "down_blocks" in n or "conv_in" in n:
            groups["encoder"].append(module)
        elif "up_blocks" in n or "conv_out" in n:
            groups["decoder"].append(module)
        else:
            groups["others"].append(module)
    return groups


def unique(names: Iterable[str]) -> list[str]:
    """Order-preserving de-duplication (the release's lists may repeat names)."""
    return list(dict.fromkeys(names))


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW = B·A for a Linear, 1×1 conv or k×k conv LoRA (A carries the base kernel, B is 1×1).

    The k×k case uses the same convolution the release's merge uses, so merged weights match it
    bit for bit on CPU.
    """
    if a.ndim == 2:
        return b @ a
    if a.shape[-2:] == (1, 1):
        return (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None]
    return F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)


def merge_lora_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    adapter: str,
    scale: float,
) -> None:
    """``W += scale·ΔW`` in place for every module of ``modules`` from ``adapter``'s A/B tensors.

    The arithmetic runs in float32 (then casts back), as the release merges in float32.
    """
    submodules = dict(model.named_modules())
    with torch.no_grad():
        for name in unique(modules):
            layer = submodules.get(name)
            if layer is None:
                raise KeyError(f"LoRA target module {name!r} does not exist in {type(model).__name__}")
            weight = layer.weight
            a = state_dict[f"{name}.lora_A.{adapter}.weight"].to(weight.device, torch.float32)
            b = state_dict[f"{name}.lora_B.{adapter}.weight"].to(weight.device, torch.float32)
            merged = weight.float() + scale * lora_delta(a, b)
            weight.copy_(merged.to(weight.dtype))


def lora_config(rank: int, modules: Iterable[str], alpha: int = RELEASE_LORA_ALPHA):
    """peft ``LoraConfig`` as the release builds it: gaussian init (A ~ N(0, 1/r), B = 0)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=unique(modules))


def add_adapter(model: nn.Module, rank: int, modules: Iterable[str], adapter: str) -> None:
    """Inject a peft LoRA adapter named ``adapter`` into ``model`` (diffusers ``add_adapter``)."""
    model.add_adapter(lora_config(rank, modules), adapter_name=adapter)


def activate_adapters(model: nn.Module, adapters: Iterable[str]) -> None:
    """Make all of ``adapters`` active at once.

    peft's ``add_adapter`` activates only the adapter just added (the cause of the release's VSD
    bug); every LoRA layer is told the full list here. Layers that do not hold some of the
    adapters keep only those they have.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = list(adapters)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            present = [a for a in wanted if a in module.lora_A]
            if present:
                module.set_adapter(present)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model``'s state dict whose name contains ``lora`` (the release's filter)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}

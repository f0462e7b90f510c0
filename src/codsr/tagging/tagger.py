"""``RAMTagger``: images -> RAM / DAPE tag strings, as CODSR builds its prompts (docs/method.md#inference).

Preprocessing is the release's (``test_codsr.py``, RAM branch): RGB in [0, 1] ->
``Resize((384, 384))`` bilinear on the tensor with ``antialias=False`` (torchvision 0.15's default
for tensors, which CODSR pins; the aspect ratio is not kept) -> ImageNet normalisation. Tags are
``sigmoid(logits) > per-class threshold`` joined by ``", "`` in class order (:mod:`.taglist`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from codsr.precision import resolve_dtype
from codsr.tagging.model import RAMConfig, RAMSwinL, build_ram_swin_l
from codsr.tagging.taglist import class_thresholds, tags_from_logits

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RAMTagger", "preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil_to_tensor(image) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def preprocess(images, image_size: int = 384) -> torch.Tensor:
    """Images -> normalised float32 ``[B, 3, S, S]`` model input (release preprocessing).

    ``images``: a ``[B, 3, H, W]`` (or ``[3, H, W]``) float tensor in [0, 1], RGB, any size; or a
    PIL image or a list of PIL images (converted with ``.convert("RGB")``, i.e. ToTensor).
    """
    if not isinstance(images, torch.Tensor):
        pil_list = [images] if hasattr(images, "convert") else list(images)
        if not pil_list:
            raise ValueError("images: empty list")
        # Sizes differ between images: resize each one, then stack.
        return torch.cat([preprocess(_pil_to_tensor(im), image_size) for im in pil_list])
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(
            f"images: expected a [B, 3, H, W] RGB tensor in [0, 1], got shape {tuple(images.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"images: expected float values in [0, 1], got {x.dtype} (divide uint8 images by 255)"
        )
    x = x.float()
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
        )
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class RAMTagger(nn.Module):
    """RAM Swin-L tagger (optionally with SeeSR's DAPE LoRA merged in).

    Construct with :meth:`from_pretrained`. ``tagger(images)`` equals ``tagger.tags(images)``:
    one tag string per image. ``.to(device / dtype)`` works like any module; the per-class
    thresholds stay float32 and logits are compared in float32.
    """

    def __init__(self, model: RAMSwinL, thresholds: torch.Tensor | None = None, batch_size: int = 8) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        # A plain attribute, not a buffer: .to(torch.float16) must not round the thresholds.
        self.thresholds = class_thresholds() if thresholds is None else thresholds.float()
        self.batch_size = batch_size
        self.name = "ram"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        ram_path: str | os.PathLike,
        dape_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype | str | None = torch.float32,
        *,
        merge_tied: bool = True,
        batch_size: int = 8,
        cache_dir: str | os.PathLike | None = None,
    ) -> RAMTagger:
        """Load ``ram_swin_large_14m.pth`` (+ optional ``DAPE.pth``) from paths or ``hf://`` refs.

        ``torch_dtype``: a ``torch.dtype`` or a name ("fp16", "bfloat16", ...; see
        :func:`codsr.precision.resolve_dtype`); None or "auto" = the device's default precision.
        The DAPE LoRA is merged in float32 before casting to ``torch_dtype``. ``merge_tied=False``
        rejects a DAPE file whose tied tag-encoder deltas are non-zero instead of merging them.
        See :mod:`codsr.tagging.hub` for where the files are published.
        """
        from codsr.tagging.convert import load_tagger_state_dict
        from codsr.tagging.hub import resolve_weight

        try:
            dtype = resolve_dtype(torch_dtype, device)
        except ValueError as exc:
            raise ValueError(f"torch_dtype: {exc}") from None
        ram_file = resolve_weight(ram_path, "ram_swin_large_14m.pth", cache_dir)
        dape_file = None if dape_path is None else resolve_weight(dape_path, "DAPE.pth", cache_dir)
        state = load_tagger_state_dict(ram_file, dape_file, merge_tied=merge_tied)
        model = build_ram_swin_l(RAMConfig(), device=device, dtype=dtype)
        model.load_state_dict(state, strict=True)
        del state
        tagger = cls(model, batch_size=batch_size)
        tagger.name = "ram+dape" if dape_file is not None else "ram"
        if torch.device(device).type == "cuda":
            tagger.set_fused_attention(True)
        return tagger

    def set_fused_attention(self, enabled: bool) -> None:
        """Use SDPA in the Swin window attention (faster on GPU; moves fp32 logits by ~2e-6)."""
        for module in self.model.visual_encoder.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = enabled

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.label_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.label_embed.dtype

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, 384, 384]`` input -> ``[B, 4585]`` float32 logits."""
        return self.model(x.to(device=self.device, dtype=self.dtype)).float()

    @torch.inference_mode()
    def tags(self, images, batch_size: int | None = None) -> list[str]:
        """Tag strings for ``[B, 3, H, W]`` tensors in [0, 1] (RGB) or PIL images, one per image."""
        if isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.dim() == 3 else images
        elif hasattr(images, "convert"):  # a single PIL image
            batch = [images]
        else:
            batch = list(images)
        step = batch_size or self.batch_size
        out: list[str] = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            x = preprocess(chunk.to(self.device) if isinstance(chunk, torch.Tensor) else chunk)
            out.extend(tags_from_logits(self.logits(x), self.thresholds))
        return out

    def forward(self, images, batch_size: int | None = None) -> list[str]:
        """Same as :meth:`tags` (the SR pipeline calls ``tagger(images_01)``)."""
        return self.tags(images, batch_size=batch_size)

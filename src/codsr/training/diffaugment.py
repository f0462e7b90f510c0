"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", 2020).

The stage-1 discriminator (docs/method.md#stage-1, "DiffAugment (colour, translation, cutout) before the backbone")
augments both real and generated images with the policy ``"color,translation,cutout"``. Every op is
differentiable w.r.t. the image, so the generator's adversarial gradient flows through it.

Unlike the reference code, every random draw comes from an explicit :class:`torch.Generator`, so an
augmentation is reproducible from the generator's state. Draws are made on the generator's device and
then moved to the image's device, so a CPU generator gives identical augmentations on any device.

Ops and their random draws (one set per sample, drawn in this order):

* ``color``: brightness ``x + (r - 0.5)``; saturation ``(x - mean_c) * 2r + mean_c``; contrast
  ``(x - mean_chw) * (r + 0.5) + mean_chw``; each ``r ~ U[0, 1)``. Values are in the image's own
  range (the discriminator applies them to images in [-1, 1], as the reference does).
* ``translation``: integer shift ``(tx, ty)``, each uniform in ``[-s, s]`` with
  ``s = int(size * 0.125 + 0.5)``; ``out[i, j] = x[i + tx, j + ty]``, zero where that is outside.
* ``cutout``: a zero rectangle of ``int(size * 0.5 + 0.5)`` per side whose centre row ``o`` is
  uniform in ``[0, H + (1 - c % 2))`` (same for columns); it covers rows
  ``[o - c // 2, o - c // 2 + c)`` intersected with the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "diff_augment",
    "parse_policy",
    "rand_brightness",
    "rand_contrast",
    "rand_cutout",
    "rand_saturation",
    "rand_translation",
]

DEFAULT_POLICY = "color,translation,cutout"


def _uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped (B, 1, 1, 1) and in x's dtype/device."""
    r = torch.rand(x.shape[0], generator=generator, device=generator.device)
    return r.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _randint(low: int, high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n integers uniform in [low, high), drawn on the generator's device, returned on ``device``."""
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(device)


def rand_brightness(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add a per-sample offset ``r - 0.5``, ``r ~ U[0, 1)``."""
    return x + (_uniform(x, generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale the deviation from the per-pixel channel mean by ``2r``, ``r ~ U[0, 1)``."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x, generator) * 2) + mean


def rand_contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale the deviation from the per-image mean by ``r + 0.5``, ``r ~ U[0, 1)``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def rand_translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by an integer offset; pixels shifted in from outside are zero.

    ``out[b, :, i, j] = x[b, :, i + tx_b, j + ty_b]`` when that index is inside the image, else 0;
    ``tx_b`` (rows) then ``ty_b`` (columns) are uniform in ``[-s, s]``, ``s = int(size * ratio + 0.5)``.
    """
    b, c, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = _randint(-shift_h, shift_h + 1, b, generator, x.device)
    ty = _randint(-shift_w, shift_w + 1, b, generator, x.device)
    rows = torch.arange(h, device=x.device)[None, :] + tx[:, None]  # (B, H) source row of each output row
    cols = torch.arange(w, device=x.device)[None, :] + ty[:, None]  # (B, W)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    # Two gathers (rows, then columns) keep the op differentiable and avoid a (B, H, W, C) copy.
    row_idx = rows.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w)
    col_idx = cols.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w)
    out = torch.gather(torch.gather(x, 2, row_idx), 3, col_idx)
    return out * valid[:, None].to(x.dtype)


def rand_cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one axis-aligned rectangle of ``int(size * ratio + 0.5)`` per side in each image.

    The centre row ``o`` is uniform in ``[0, H + (1 - c % 2))`` (drawn first, then the column); the
    zeroed rows are ``[o - c // 2, o - c // 2 + c)`` clipped to the image, likewise for columns.
    """
    b, _, h, w = x.shape
    cut_h, cut_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_h = _randint(0, h + (1 - cut_h % 2), b, generator, x.device)
    off_w = _randint(0, w + (1 - cut_w % 2), b, generator, x.device)
    top = (off_h - cut_h // 2)[:, None]
    left = (off_w - cut_w // 2)[:, None]
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top) & (rows < top + cut_h)  # (B, H)
    in_cols = (cols >= left) & (cols < left + cut_w)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


AugmentOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

POLICIES: dict[str, tuple[AugmentOp, ...]] = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "translation": (rand_translation,),
    "cutout": (rand_cutout,),
}


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``"color,translation"`` / ``["color", ...]`` / ``""`` / ``None`` to a tuple of names."""
    if policy is None:
        return ()
    names = policy.split(",") if isinstance(policy, str) else list(policy)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(
            f"unknown DiffAugment op(s) {unknown} in policy {policy!r}; choose from {sorted(POLICIES)} "
            "(comma separated), or '' for no augmentation"
        )
    return tuple(names)


def diff_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    policy: str | Sequence[str] | None = DEFAULT_POLICY,
) -> torch.Tensor:
    """Apply the DiffAugment ``policy`` to a batch ``x`` of shape (B, C, H, W).

    Ops run in policy order, each drawing from ``generator``; an empty policy returns ``x`` itself.
    """
    if x.ndim != 4:
        raise ValueError(f"diff_augment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    for name in parse_policy(policy):
        for op in POLICIES[name]:
            x = op(x, generator)
    return x

"""Text-matching guidance losses (paper §3.3 and Eq. 5; docs/method.md#stage-2).

For each noun n of a sample with a valid mask M_n (at least ``min_pixels`` positive pixels):

    A_n   = mean over n's token positions of the head-averaged cross-attention map
            (release: the first attn2 layer; paper: the mean over all layers, each bilinearly
            resized to the largest layer's grid), bilinearly upsampled to the mask size
    L_area += (1 − Σ(A_n·M_n) / ΣA_n)²        (CoMat's positive-area loss)
    L_bce  += BCE(A_n, M_n)

both averaged over the valid masks of the batch, 0 when there is none. A noun whose word-piece
sequence is not in the (truncated) 77-token prompt is skipped; the release falls back to a
uniform average over all 77 tokens instead.

Release weights: 0.5·L_area + 0.025·L_bce (the paper's η_pos = 1 for the area loss alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codsr.stage2.attention import CrossAttentionCapture

__all__ = [
    "noun_token_positions",
    "word_token_ids",
    "combine_layer_maps",
    "noun_attention_maps",
    "tmg_losses",
    "TMGLoss",
    "TMGOutput",
]


def word_token_ids(tokenizer, word: str) -> list[int]:
    """Word-piece ids of ``word`` without the begin/end tokens."""
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(
        tokenizer(
            prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True
        ).input_ids
    )


def noun_token_positions(tokenizer, prompt: str | Sequence[int], noun: str) -> list[int]:
    """Positions of every occurrence of ``noun``'s word-piece sequence in the padded prompt.

    ``prompt`` is the text (tokenised as the text encoder sees it: max length, padded,
    truncated) or its ids. Only the content tokens between the begin token and the first end
    token are searched, so padding never matches. Returns [] when the noun is absent, e.g.
    truncated away.
    """
    ids = _prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    target = word_token_ids(tokenizer, noun)
    if not target:
        return []
    start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    eos = tokenizer.eos_token_id
    end = ids.index(eos, start) if eos in ids[start:] else len(ids)
    positions: list[int] = []
    n = len(target)
    for i in range(start, end - n + 1):
        if ids[i : i + n] == target:
            positions.extend(range(i, i + n))
    return sorted(set(positions))


def combine_layer_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of per-layer ``B×h×w×K`` maps, each bilinearly resized to the largest grid."""
    if not maps:
        raise ValueError("no cross-attention maps to combine")
    if len(maps) == 1:
        return maps[0]
    h, w = max((m.shape[1], m.shape[2]) for m in maps)
    resized = []
    for m in maps:
        if m.shape[1:3] != (h, w):
            m = F.interpolate(m.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
            m = m.permute(0, 2, 3, 1)
        resized.append(m)
    return torch.stack(resized).mean(dim=0)


def noun_attention_maps(
    attention: torch.Tensor, positions: Sequence[Sequence[int]], size: tuple[int, int]
) -> torch.Tensor:
    """A_n for one sample: ``attention`` h×w×K → N×H×W (token mean, bilinear upsampling).

    Every entry of ``positions`` must be non-empty (skip absent nouns before calling).
    """
    if not positions:
        return attention.new_zeros((0, *size))
    per_noun = []
    for pos in positions:
        if not pos:
            raise ValueError("noun_attention_maps: empty token position list (skip absent nouns first)")
        per_noun.append(attention[..., list(pos)].mean(dim=-1))
    stacked = torch.stack(per_noun)[:, None]  # N×1×h×w
    return F.interpolate(stacked, size=size, mode="bilinear", align_corners=False)[:, 0]


def tmg_losses(
    attn_maps: torch.Tensor, masks: torch.Tensor, min_pixels: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(L_area, L_bce, number of valid masks) for N×H×W maps and binary masks (docs/method.md#stage-2).

    Masks with fewer than ``min_pixels`` positive pixels are ignored; both losses are the mean
    over the remaining masks, and exactly 0 (still attached to the graph) when none remains.
    Computed in float32 outside autocast (``binary_cross_entropy`` is unsafe in fp16).
    """
    if attn_maps.shape != masks.shape:
        raise ValueError(
            f"attention maps {tuple(attn_maps.shape)} and masks {tuple(masks.shape)} differ in shape"
        )
    device_type = attn_maps.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        a = attn_maps.float()
        m = (masks.float() > 0.5).float()
        valid = m.flatten(1).sum(dim=1) >= min_pixels
        count = int(valid.sum())
        if count == 0:
            zero = a.sum() * 0.0
            return zero, zero.clone(), 0
        a, m = a[valid], m[valid]
        inside = (a * m).flatten(1).sum(dim=1) / a.flatten(1).sum(dim=1)
        area = ((1.0 - inside) ** 2).mean()
        # nn.BCELoss per mask (mean over pixels; log clamped at -100), then the mean over masks.
        bce = F.binary_cross_entropy(a.clamp(0.0, 1.0), m, reduction="none").flatten(1).mean(dim=1).mean()
    return area, bce, count


@dataclass
class TMGOutput:
    """TMG loss terms of one batch; ``loss`` = w_area·area + w_bce·bce."""

    loss: torch.Tensor
    area: torch.Tensor
    bce: torch.Tensor
    num_valid: int
    num_skipped: int  # nouns with a valid mask but no token in the (truncated) prompt


class TMGLoss:
    """TMG terms from a :class:`CrossAttentionCapture` after the generator's UNet call.

    Args:
        tokenizer: the text encoder's tokenizer (77 tokens for SD).
        area_weight, bce_weight: release 0.5 and 0.025 (paper: 1 and 0).
        min_pixels: a mask is valid with at least this many positive pixels.
    """

    def __init__(
        self, tokenizer, area_weight: float = 0.5, bce_weight: float = 0.025, min_pixels: int = 1
    ) -> None:
        self.tokenizer = tokenizer
        self.area_weight = float(area_weight)
        self.bce_weight = float(bce_weight)
        self.min_pixels = int(min_pixels)

    def __call__(
        self,
        capture: CrossAttentionCapture,
        prompts: Sequence[str],
        nouns: Sequence[Sequence[str]],
        masks: torch.Tensor | Sequence[torch.Tensor],
        mask_valid: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> TMGOutput:
        """Losses for a batch: per sample its prompt, nouns (N_b) and masks (N_b×H×W, or B×N×H×W padded).

        ``mask_valid`` (per sample N_b booleans) excludes masks such as failed segmentations or
        padding; it defaults to all True.
        """
        attention = combine_layer_maps(capture.layer_maps())  # B×h×w×K
        if attention.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a UNet batch of {attention.shape[0]}")
        all_maps, all_masks = [], []
        skipped = 0
        for b, (prompt, sample_nouns) in enumerate(zip(prompts, nouns, strict=True)):
            sample_masks = masks[b]
            valid = (
                torch.ones(len(sample_nouns), dtype=torch.bool)
                if mask_valid is None
                else torch.as_tensor(mask_valid[b], dtype=torch.bool).cpu()
            )
            ids = _prompt_ids(self.tokenizer, prompt)
            keep_positions, keep_idx = [], []
            for i, noun in enumerate(sample_nouns):
                if not bool(valid[i]):
                    continue
                pos = noun_token_positions(self.tokenizer, ids, noun)
                if not pos:
                    if (sample_masks[i] > 0.5).sum() >= self.min_pixels:
                        skipped += 1
                    continue
                keep_positions.append(pos)
                keep_idx.append(i)
            if not keep_idx:
                continue
            size = tuple(sample_masks.shape[-2:])
            all_maps.append(noun_attention_maps(attention[b], keep_positions, size))
            all_masks.append(sample_masks[keep_idx].to(attention.device))
        if all_maps:
            area, bce, count = tmg_losses(torch.cat(all_maps), torch.cat(all_masks), self.min_pixels)
        else:
            area, bce, count = tmg_losses(attention.new_zeros((0, 1, 1)), attention.new_zeros((0, 1, 1)))
            area = area + attention.sum() * 0.0  # keep the graph so DDP sees the parameters used
            bce = bce + attention.sum() * 0.0
        loss = self.area_weight * area + self.bce_weight * bce
        return TMGOutput(loss=loss, area=area, bce=bce, num_valid=count, num_skipped=skipped)

"""LQFM: LQ-guided feature modulation (paper §3.2, Eq. 4; docs/method.md#lqfm).

A spatial feature transform (SFT) computed from the pixel-unshuffled LQ image modulates the output
of the stock UNet's ``conv_in``:  h0 = conv_in(z_t)·(1 + γ/w_t) + β/w_t.  The UNet itself is not
modified: the modulation is a forward hook attached to whatever module is ``unet.conv_in`` at call
time (after LoRA injection that is peft's wrapper, so the hook sees the LoRA'd output, as the
release does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

UNSHUFFLE = 8  # the VAE's downsampling factor: one latent cell = an 8×8 pixel block


class SFTModulator(nn.Module):
    """Two conv branches mapping PixelUnshuffle(8)(x_L) (192 ch) to (γ, β) (320 ch each).

    Each branch is Conv3×3(192→320) → SiLU → Conv3×3(320→320); the second conv is zero-initialised
    so the module starts as the identity modulation. Parameter names follow the release's
    checkpoint (``SFT_scale_conv0`` ...), so its ``state_dict_sft`` loads unchanged.
    """

    def __init__(self, in_channels: int = 3 * UNSHUFFLE * UNSHUFFLE, channels: int = 320) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.SFT_scale_conv0 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.SFT_scale_conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.SFT_shift_conv0 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.SFT_shift_conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.SFT_scale_conv1, self.SFT_shift_conv1):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw (γ, β), each B×320×H/8×W/8, for an LQ image B×3×H×W in [-1, 1]."""
        cond = F.pixel_unshuffle(x_l, UNSHUFFLE)
        scale = self.SFT_scale_conv1(F.silu(self.SFT_scale_conv0(cond)))
        shift = self.SFT_shift_conv1(F.silu(self.SFT_shift_conv0(cond)))
        return scale, shift


@contextmanager
def conv_in_modulation(unet: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> Iterator[None]:
    """Within the block, ``unet.conv_in(x)`` returns ``out·(scale + 1) + shift`` (Eq. 4).

    ``scale``/``shift`` are the already time-scaled γ/w_t and β/w_t, broadcastable to the conv_in
    output (B×320×h×w). The hook is attached to the current ``unet.conv_in`` and removed on exit.
    """
    expected = unet.config.block_out_channels[0]
    if scale.shape[1] != expected or shift.shape[1] != expected:
        raise ValueError(
            f"SFT produces {scale.shape[1]} channels but unet.conv_in outputs {expected}; "
            "LQFM needs a UNet whose first block has the SFT's channel count (320 in SD 2.1)"
        )

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * (scale.to(out.dtype) + 1) + shift.to(out.dtype)

    handle = unet.conv_in.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

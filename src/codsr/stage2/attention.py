"""Cross-attention probability capture for text-matching guidance (paper §3.3; docs/method.md#stage-2).

:class:`CrossAttentionCapture` puts a :class:`CapturingCrossAttnProcessor` on the UNet's
cross-attention (``attn2``) layers it is told to watch, leaving every other processor as it was
(SDPA stays on the self-attention layers). The processor computes ``softmax(QKᵀ/√d)``
explicitly, because SDPA cannot return the probabilities, uses them for the layer's output (so
the UNet output is unchanged) and stores their head average *with its autograd graph* so that a
loss on the maps trains the attn2 LoRA.

Layers: ``"first"`` is the first ``attn2`` in module order (the release records
``down_blocks.0.attentions.0.transformer_blocks.0.attn2``, which is the first in SD 2.1);
``"all"`` watches every ``attn2`` (the paper's variant); a list of names picks explicitly.

Maps are stored per layer as ``B×h×w×K`` (K = text tokens, 77 for SD), the grid (h, w) being
recovered from the query length and the spatial size of the sample the UNet was last called
with (each down-sampling halves it, rounding up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "CapturingCrossAttnProcessor",
    "CrossAttentionCapture",
    "cross_attention_layers",
    "grid_for_length",
]


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (``...attn2``), in module order."""
    from diffusers.models.attention_processor import Attention

    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.split(".")[-1] == "attn2" and module.is_cross_attention
    ]


def grid_for_length(length: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) with h·w = ``length`` obtained from the latent size by repeated ceil-halving."""
    h, w = latent_hw
    while h * w > length:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != length:
        raise ValueError(f"cannot map {length} attention queries onto a grid of a {latent_hw} latent")
    return h, w


class CapturingCrossAttnProcessor:
    """Attention processor computing the probabilities explicitly and storing their head mean.

    Follows diffusers' ``AttnProcessor2_0`` step for step (group/spatial norm, cross norm,
    residual, output rescale), replacing SDPA with ``softmax(QKᵀ·scale + mask)`` in float32.
    """

    def __init__(self, capture: CrossAttentionCapture, name: str) -> None:
        self.capture = capture
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # float32 scores and softmax, also under autocast: fp16 logits can overflow, and the TMG
        # loss needs accurate probabilities. attn2 has only 77 keys, so this is cheap.
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.float() * attn.scale, key.float().transpose(-1, -2))
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)  # B × heads × Q × K
        if is_cross:
            self.capture._record(self.name, probs.mean(dim=1))
        hidden_states = torch.matmul(probs.to(value.dtype), value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CrossAttentionCapture:
    """Records head-averaged cross-attention maps of chosen ``attn2`` layers of a diffusers UNet.

    >>> capture = CrossAttentionCapture(unet, layers="first")   # attaches at once
    >>> unet(z_t, t, encoder_hidden_states=c)
    >>> capture.maps            # {layer name: B×h×w×77 tensor with grad}
    >>> capture.clear(); capture.detach()

    Each UNet call overwrites the maps of the previous one; call :meth:`clear` after the loss
    to release the graph. ``enabled = False`` pauses recording (the processor still computes
    the same output), e.g. for validation passes.
    """

    def __init__(self, unet: nn.Module, layers: str | Sequence[str] = "first", attach: bool = True) -> None:
        self.unet = unet
        available = cross_attention_layers(unet)
        if not available:
            raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers to capture")
        if layers == "first":
            chosen = available[:1]
        elif layers == "all":
            chosen = list(available)
        elif isinstance(layers, str):
            raise ValueError(f'layers must be "first", "all" or a list of attn2 names, got {layers!r}')
        else:
            chosen = list(layers)
            unknown = [n for n in chosen if n not in available]
            if unknown or not chosen:
                raise ValueError(f"unknown cross-attention layers {unknown}; the UNet has {available}")
        self.layer_names: list[str] = chosen
        self.maps: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._latent_hw: tuple[int, int] | None = None
        self._saved: dict[str, object] | None = None
        self._hook = None
        if attach:
            self.attach()

    # ------------------------------------------------------------------ install / remove
    def attach(self) -> None:
        """Install the capturing processors on the chosen layers (others are left as they are)."""
        if self._saved is not None:
            return
        processors = dict(self.unet.attn_processors)
        self._saved = dict(processors)
        for name in self.layer_names:
            key = f"{name}.processor"
            if key not in processors:
                raise KeyError(f"{key!r} is not among the UNet's attention processors")
            processors[key] = CapturingCrossAttnProcessor(self, name)
        self.unet.set_attn_processor(processors)
        self._hook = self.unet.register_forward_pre_hook(self._remember_latent_size, with_kwargs=True)

    def detach(self) -> None:
        """Restore the processors that were there before :meth:`attach` and drop the maps."""
        if self._saved is None:
            return
        self.unet.set_attn_processor(self._saved)
        self._saved = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.clear()

    def __enter__(self) -> CrossAttentionCapture:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ recording
    def _remember_latent_size(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _record(self, name: str, probs: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self._latent_hw is None:
            raise RuntimeError(
                "CrossAttentionCapture: the UNet's input size is unknown (call the UNet itself)"
            )
        b, q, k = probs.shape
        h, w = grid_for_length(q, self._latent_hw)
        self.maps[name] = probs.reshape(b, h, w, k)

    def clear(self) -> None:
        """Forget the recorded maps (and so their autograd graph)."""
        self.maps = {}

    def layer_maps(self, names: Iterable[str] | None = None) -> list[torch.Tensor]:
        """Recorded maps of ``names`` (default: every watched layer), in the watched order."""
        names = self.layer_names if names is None else list(names)
        missing = [n for n in names if n not in self.maps]
        if missing:
            raise RuntimeError(
                f"no cross-attention recorded for {missing}: run the UNet with encoder_hidden_states "
                "after attaching (and with capture.enabled = True)"
            )
        return [self.maps[n] for n in names]

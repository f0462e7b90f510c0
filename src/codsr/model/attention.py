"""Attention for the VAE's mid-block on the CPU in bf16/fp16: query-chunked ``bmm → softmax → bmm``.

The SD VAE has one self-attention per mid-block (one head of 512 channels over every latent
cell). PyTorch's CPU flash-attention kernel runs it at fp32 speed whatever the dtype (~200
GFLOP/s in bf16 on an AVX-512-BF16 EPYC), while two bf16 matrix products and a softmax reach
~570 (docs/benchmarks.md#cpu-speed). The exact tiled VAE keeps this attention global, so at
2048² output it is 65 536 tokens and dominates the VAE's time.

:class:`VAEAttnProcessor` is a diffusers attention processor (installed with
``vae.set_attn_processor``; no diffusers file is changed). It computes the same attention as
diffusers' ``AttnProcessor2_0`` — softmax(QKᵀ/√d)·V — over chunks of queries, so the score matrix
held at once is bounded (``chunk_bytes``); the softmax reads bf16 scores and accumulates in
float32. Anything else (fp32, CUDA, masks, cross-attention, several heads, spatial norm) is
delegated to ``AttnProcessor2_0`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["VAEAttnProcessor", "chunked_attention"]

CHUNK_BYTES = 64 * 1024**2  # scores per chunk; the softmax doubles it


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for B×N×d queries and B×M×d keys/values, ``chunk`` queries at a time so
    that one chunk's B×chunk×M scores take at most ``chunk_bytes``."""
    b, n, d = q.shape
    m = k.shape[1]
    rows = max(1, min(n, chunk_bytes // max(1, b * m * q.element_size())))
    q = q * d**-0.5
    kt = k.transpose(1, 2)
    out = torch.empty(b, n, v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, n, rows):
        scores = torch.bmm(q[:, start : start + rows], kt)
        torch.bmm(scores.softmax(dim=-1), v, out=out[:, start : start + rows])
    return out


class VAEAttnProcessor:
    """diffusers attention processor for the VAE: :func:`chunked_attention` for single-head
    self-attention on the CPU in ``dtypes`` (default bf16 and fp16), ``AttnProcessor2_0`` otherwise."""

    def __init__(self, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
                 chunk_bytes: int = CHUNK_BYTES) -> None:  # fmt: skip
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.dtypes = tuple(dtypes)
        self.chunk_bytes = int(chunk_bytes)
        self.fallback = AttnProcessor2_0()

    def handles(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any, attention_mask: Any,
                temb: Any) -> bool:  # fmt: skip
        return (
            hidden_states.device.type == "cpu"
            and hidden_states.dtype in self.dtypes
            and hidden_states.ndim == 4
            and encoder_hidden_states is None
            and attention_mask is None
            and attn.heads == 1
            and attn.spatial_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
        )

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:  # fmt: skip
        if not self.handles(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.reshape(b, c, h * w)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        x = x.transpose(1, 2)  # B × HW × C tokens
        out = chunked_attention(attn.to_q(x), attn.to_k(x), attn.to_v(x), self.chunk_bytes)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

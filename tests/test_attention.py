"""codsr.model.attention: the VAE's chunked CPU attention equals diffusers' AttnProcessor2_0."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from codsr.model.attention import VAEAttnProcessor, chunked_attention


def _vae_attention(channels=64, seed=0, dtype=torch.float32):
    """An attention block built as diffusers' VAE mid-block builds it (one head of all channels)."""
    torch.manual_seed(seed)
    attn = Attention(channels, heads=1, dim_head=channels, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)  # fmt: skip
    for p in attn.parameters():  # non-trivial norm affine parameters and biases
        p.data.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return attn.to(dtype).eval()


def test_chunked_attention_is_softmax_qk_v_for_any_chunking():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    by_hand = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v  # d = 16: 1/√d = 1/4
    torch.testing.assert_close(ref, by_hand, atol=1e-12, rtol=0)
    for chunk_bytes in (1, 7 * 2 * 37 * 8, 1 << 30):  # one row, 7 rows, everything at once
        torch.testing.assert_close(chunked_attention(q, k, v, chunk_bytes), ref, atol=1e-12, rtol=0)


def test_processor_equals_attnprocessor2_0_in_float64():
    attn = _vae_attention(dtype=torch.float64)
    x = torch.randn(1, 64, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        attn.set_processor(VAEAttnProcessor(dtypes=(torch.float64,), chunk_bytes=5 * 63 * 8))  # 5-row chunks
        out = attn(x)
        cl = attn(x.to(memory_format=torch.channels_last))
    assert (ref - x).abs().max() > 0.1  # the block does something
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(cl, ref, atol=1e-12, rtol=0)


def test_processor_in_bf16_stays_at_bf16_rounding_and_delegates_fp32():
    attn = _vae_attention()
    x = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = attn(x)  # diffusers' default processor, fp32
        attn.set_processor(VAEAttnProcessor())
        assert torch.equal(attn(x), ref)  # fp32 is delegated to AttnProcessor2_0 unchanged
        out = attn.to(torch.bfloat16)(x.bfloat16()).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2  # bf16 rounding through norm, projections and softmax


def test_processor_delegates_what_it_does_not_handle():
    proc = VAEAttnProcessor()
    attn = _vae_attention(dtype=torch.bfloat16)
    x = torch.zeros(1, 64, 4, 4, dtype=torch.bfloat16)
    assert proc.handles(attn, x, None, None, None)
    assert not proc.handles(attn, x.float(), None, None, None)  # fp32
    assert not proc.handles(attn, x, torch.zeros(1, 3, 64), None, None)  # cross-attention
    assert not proc.handles(attn, x, None, torch.zeros(1, 16), None)  # a mask
    assert not proc.handles(attn, x.flatten(2).transpose(1, 2), None, None, None)  # token input
    attn.heads = 2
    assert not proc.handles(attn, x, None, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_installs_it_on_the_vae(dtype):
    from codsr.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0, dtype=dtype)
    procs = pipe.generator.vae.attn_processors
    assert procs and all(isinstance(p, VAEAttnProcessor) for p in procs.values())
    assert not any(isinstance(p, VAEAttnProcessor) for p in pipe.generator.unet.attn_processors.values())

"""Pooled GroupNorm maths (codsr.pipeline.group_norm) against float64 references and stock GroupNorm."""

import pytest
import torch
import torch.nn.functional as F

from codsr.pipeline import group_norm
from codsr.pipeline.group_norm import channel_moments, group_normalize, merge_group_moments


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(group_norm, "CHUNK_ELEMENTS", 200)  # several row slices per tensor


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_channel_moments_equal_float64_two_pass(small_chunks):
    x = _x(2, 6, 13, 11)
    m = channel_moments(x)
    ref = x.double().flatten(2)
    assert m.count.item() == 13 * 11
    assert torch.allclose(m.mean, ref.mean(-1), rtol=0, atol=1e-6)
    assert torch.allclose(m.m2, ref.var(-1, correction=0) * 143, rtol=1e-6, atol=0)


def test_weighted_channel_moments(small_chunks):
    x = _x(1, 4, 12, 10, seed=1)
    w = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(2))
    w[..., :5, :] = 0  # whole slices without weight are skipped, not 0/0
    m = channel_moments(x, w)
    xd, wd = x.double(), w.double()
    n = wd.sum()
    mean = (xd * wd).sum((2, 3)) / n
    m2 = ((xd - mean[..., None, None]) ** 2 * wd).sum((2, 3))
    assert abs(m.count.item() - n.item()) < 1e-5
    assert torch.allclose(m.mean, mean, atol=1e-6, rtol=0)
    assert torch.allclose(m.m2, m2, rtol=1e-5, atol=0)


def test_merged_tiles_equal_the_whole(small_chunks):
    x = _x(2, 8, 20, 9, seed=3)
    parts = [channel_moments(x[..., :7, :]), channel_moments(x[..., 7:, :5]), channel_moments(x[..., 7:, 5:])]
    mean, var = merge_group_moments(parts, groups=4)
    ref = x.double().reshape(2, 4, -1)
    assert mean.dtype == torch.float32 and mean.shape == (2, 4)
    assert torch.allclose(mean.double(), ref.mean(-1), atol=1e-6, rtol=0)
    assert torch.allclose(var.double(), ref.var(-1, correction=0), rtol=1e-6, atol=0)


def test_group_normalize_equals_stock_group_norm():
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = _x(2, 8, 9, 7, seed=4)
    xg = x.reshape(2, 4, -1)
    out = group_normalize(x, norm, xg.mean(-1), xg.var(-1, correction=0))
    assert (out - F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)).abs().max() < 1e-5


def test_group_normalize_keeps_bf16_channels_last():
    norm = torch.nn.GroupNorm(2, 4).to(torch.bfloat16)
    x = _x(1, 4, 6, 5, seed=5).bfloat16().contiguous(memory_format=torch.channels_last)
    xg = x.float().reshape(1, 2, -1)
    out = group_normalize(x, norm, xg.mean(-1), xg.var(-1, correction=0))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = F.group_norm(x.float(), 2, norm.weight.float(), norm.bias.float(), norm.eps)
    assert (out.float() - ref).abs().max() <= 0.02  # bf16 rounding of values up to ~3

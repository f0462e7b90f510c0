import pytest
import torch

from codsr.pipeline.color_fix import adain_color_fix, color_fix, wavelet_color_fix


def test_adain_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 0.5
    ref = torch.rand(1, 3, 32, 32, generator=g) * 0.2 + 0.4
    out = adain_color_fix(img, ref)
    flat_o, flat_r = out.reshape(3, -1), ref.reshape(3, -1)
    torch.testing.assert_close(flat_o.mean(1), flat_r.mean(1), atol=1e-5, rtol=0)
    # unbiased variance + 1e-5 on both sides: std ratio preserved exactly
    expected_std = ((flat_r.var(1) + 1e-5).sqrt() / (img.reshape(3, -1).var(1) + 1e-5).sqrt()) * img.reshape(3, -1).std(1)
    torch.testing.assert_close(flat_o.std(1), expected_std, atol=1e-5, rtol=1e-4)


def test_wavelet_keeps_reference_colour_and_image_detail():
    img = torch.zeros(1, 3, 64, 64)
    img[..., ::2, :] = 0.2  # fine stripes: high frequency detail
    ref = torch.full((1, 3, 64, 64), 0.5)
    out = wavelet_color_fix(img, ref)
    assert out.mean().item() == pytest.approx(0.5, abs=0.02)  # colour (low freq) from the reference
    assert (out[..., 10, 20] - out[..., 11, 20]).abs().min() > 0.1  # stripes survive


def test_none_and_unknown():
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(color_fix(x, x * 0, "none"), x)
    with pytest.raises(ValueError, match="adain"):
        color_fix(x, x, "bogus")

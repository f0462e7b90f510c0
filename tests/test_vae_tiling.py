import pytest
import torch
from diffusers import AutoencoderKL

from codsr.pipeline.vae_tiling import plan_axis, tiled_decode, tiled_encode_moments


@pytest.mark.parametrize("length,core,halo,align", [(1000, 128, 80, 8), (2048, 1024, 80, 8), (97, 20, 13, 1), (50, 40, 13, 1)])
def test_plan_axis_cores_partition_and_keep_the_halo(length, core, halo, align):
    window, wins = plan_axis(length, core, halo, align)
    covered = []
    for w in wins:
        assert 0 <= w.start and w.start + window <= length
        assert w.start % align == 0 and w.core0 % align == 0
        a, b = w.start + w.core0, w.start + w.core1
        assert b - a <= core or len(wins) == 1
        assert w.core0 >= halo or w.start == 0
        assert window - w.core1 >= halo or w.start + window == length
        covered.extend(range(a, b))
    assert covered == list(range(length))


@pytest.fixture(scope="module")
def vae(parity_dir):
    return AutoencoderKL.from_pretrained(parity_dir / "tiny-sd21", subfolder="vae").eval()


def test_tiled_encoder_equals_untiled(vae):
    x = torch.rand(1, 3, 320, 448, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = vae.quant_conv(vae.encoder(x))
        out = tiled_encode_moments(vae, x, 128)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_tiled_decoder_equals_untiled(vae):
    z = torch.randn(2, 4, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        out = tiled_decode(vae, z, 16)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_per_tile_groupnorm_would_shift_colours(vae):
    # Control: decoding two halves independently (own GroupNorm statistics) differs visibly,
    # which is what pooled statistics prevent.
    z = torch.randn(1, 4, 32, 64, generator=torch.Generator().manual_seed(2))
    z[..., 32:] += 1.5
    with torch.no_grad():
        ref = vae.decode(z).sample
        left = vae.decode(z[..., :32]).sample
        tiled = tiled_decode(vae, z, 16)
    assert (left[..., :128] - ref[..., :128]).abs().mean() > 10 * (tiled - ref).abs().mean()

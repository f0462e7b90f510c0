"""The exact tiled VAE (codsr.pipeline.vae_tiling) on the in-process tiny VAE: tiled == untiled."""

import os

import pytest
import torch

import codsr.pipeline.vae_tiling as vae_tiling
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
def vae():
    from codsr.testing import build_tiny_components

    return build_tiny_components(seed=0)["vae"].eval()


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


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_tiled_vae_equals_untiled(vae, offload, tmp_path):
    x = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 3 encoder tiles
    z = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(1))  # 3×4 decoder tiles
    with torch.no_grad():
        ref_enc = vae.quant_conv(vae.encoder(x))
        enc = tiled_encode_moments(vae, x, 128, offload=offload, offload_dir=tmp_path)
        ref_dec = vae.decode(z).sample
        dec = tiled_decode(vae, z, 16, offload=offload, offload_dir=tmp_path)
    assert (enc - ref_enc).abs().max() <= 1e-4 * ref_enc.abs().max()
    assert dec.shape == ref_dec.shape
    assert (dec - ref_dec).abs().max() <= 1e-4 * ref_dec.abs().max()
    assert os.listdir(tmp_path) == []  # the temporary tile folder is removed


def test_disk_store_round_trips_bfloat16_and_cleans_up(tmp_path):
    store = vae_tiling.make_tile_store("disk", torch.device("cpu"), tmp_path)
    t = torch.randn(2, 3, 5, 7).to(torch.bfloat16)
    store.put("a", t)
    (folder,) = os.listdir(tmp_path)
    assert len(os.listdir(tmp_path / folder)) == 1
    assert torch.equal(store.get("a"), t)
    assert torch.equal(store.pop("a"), t)
    assert os.listdir(tmp_path / folder) == []
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="offload"):
        vae_tiling.make_tile_store("gpu", torch.device("cpu"))


def test_disk_store_keeps_the_channels_last_layout(tmp_path):
    store = vae_tiling.make_tile_store("disk", torch.device("cpu"), tmp_path)
    t = torch.randn(2, 3, 5, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    store.put("cl", t)
    store.put("nchw", t.contiguous())
    back = store.pop("cl")
    assert torch.equal(back, t) and back.is_contiguous(memory_format=torch.channels_last) and not back.is_contiguous()
    plain = store.pop("nchw")
    assert torch.equal(plain, t) and plain.is_contiguous()  # the default layout stays as it is
    store.close()


def test_tiling_helpers_never_import_the_planner_or_the_pipeline():
    import ast
    from pathlib import Path

    import codsr.pipeline.latent_tiling as latent_tiling
    import codsr.pipeline.release_vae_tiling as release_vae_tiling

    for mod in (vae_tiling, latent_tiling, release_vae_tiling):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not {"codsr.pipeline.tiling", "codsr.pipeline.pipeline"} & set(names), mod.__name__

"""The release's approximate tiled VAE (``release_compat=True``) against the release's own outputs.

``tests/fixtures/release_vae_tiling.npz`` holds inputs, tile arguments and outputs of the CODSR
release's ``VAEHook`` (my_utils/vaehook.py @ 68cad3cd) on the parity fixture's tiny VAE with the
encoder LoRA active (its ``recipe`` string says how it was made). Encoder tile sizes are in image
px, decoder tile sizes in latent px, as the release's arguments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from codsr.model.lora import VAE_ADAPTER, add_adapter, merge_lora_weights
from codsr.pipeline.release_vae_tiling import (
    RELEASE_DECODER_TILE,
    RELEASE_ENCODER_TILE,
    ReleaseTile,
    _snap_tile_size,
    release_tiled_decoder_forward,
    release_tiled_encoder_forward,
    release_vae_tiles,
    release_vae_tiling_applies,
)

REFERENCE = Path(__file__).parent / "fixtures" / "release_vae_tiling.npz"
# float32 rounding of the CPU's conv kernels, on outputs up to ~5: ≤ 1e-5 on an AVX-512 machine,
# up to 2.9e-5 on an AVX2 EPYC (the release's quirks move the output by > 0.1, a missing LoRA by > 1e-2)
TOL = 4e-5
ENCODER_CASES = ("enc_a", "enc_b")  # 1 image 1×2 tiles; batch of 2, 2×3 tiles
DECODER_CASES = ("dec_a", "dec_b")  # 2×3 tiles; batch of 2, 1×2 tiles of a latent thinner than 2·pad


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _load_vae(parity_dir: Path, merged: bool):
    """Tiny fixture VAE with the checkpoint's encoder LoRA: peft-injected (as the release) or merged."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(parity_dir / "tiny-sd21", subfolder="vae").float().eval()
    ckpt = torch.load(parity_dir / "codsr_tiny.pkl", weights_only=True)
    lora = ckpt["state_dict_vae"]
    if merged:
        merge_lora_weights(
            vae, lora, ckpt["vae_lora_encoder_modules"], VAE_ADAPTER, scale=8 / ckpt["rank_vae"]
        )
        return vae
    add_adapter(vae, ckpt["rank_vae"], ckpt["vae_lora_encoder_modules"], VAE_ADAPTER)
    params = dict(vae.named_parameters())
    with torch.no_grad():
        for name, value in lora.items():
            params[name].copy_(value)
    assert sum("lora" in n for n in params) == len(lora)
    return vae


@pytest.fixture(scope="module")
def vae(parity_dir):
    return _load_vae(parity_dir, merged=False)


@pytest.fixture(scope="module")
def tiny_vae():
    """The in-process tiny VAE, for tests that do not compare with the release's numbers."""
    from codsr.testing import build_tiny_components

    return build_tiny_components(seed=0)["vae"].float().eval()


def _image(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 127.5 - 1


def test_reference_file_is_small_and_documented(reference):
    assert REFERENCE.stat().st_size < 2_000_000
    recipe = str(reference["recipe"])
    assert "68cad3cd1eee81f3f5e3e33e8d2cd24f0627375f" in recipe and "fast_encoder=False" in recipe


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_matches_release(vae, reference, case):
    x = _image(reference[f"{case}_input_u8"])
    tile = int(reference[f"{case}_tile"])
    assert release_vae_tiling_applies(*x.shape[-2:], tile, is_decoder=False)
    out = release_tiled_encoder_forward(vae.encoder, x, tile)
    expected = torch.from_numpy(reference[f"{case}_output"])
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_matches_release(vae, reference, case):
    z = torch.from_numpy(reference[f"{case}_input"])
    tile = int(reference[f"{case}_tile"])
    assert release_vae_tiling_applies(*z.shape[-2:], tile, is_decoder=True)
    out = release_tiled_decoder_forward(vae.decoder, z, tile)
    expected = torch.from_numpy(reference[f"{case}_output"])
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= TOL


def test_release_tiling_is_not_the_untiled_network(vae, reference):
    """The quirks matter: the release's tiled encoder output is far from the untiled one."""
    x = _image(reference["enc_a_input_u8"])
    with torch.no_grad():
        untiled = vae.encoder(x)
    assert (untiled - torch.from_numpy(reference["enc_a_output"])).abs().max().item() > 0.1


def test_encoder_lora_is_applied_in_tiles(vae, reference, parity_dir):
    """A merged LoRA is the same up to merge rounding; without the LoRA the output is far off.

    Merging moves the moments by ~2e-5 (on values up to ~5) with or without tiling (the parity
    fixture's README measures the same), so the release keeps the VAE LoRA unmerged and so do we.
    """
    x = _image(reference["enc_a_input_u8"])
    expected = torch.from_numpy(reference["enc_a_output"])
    merged = _load_vae(parity_dir, merged=True)
    assert (release_tiled_encoder_forward(merged.encoder, x, 256) - expected).abs().max().item() <= 5e-5
    vae.disable_adapters()
    try:
        off = release_tiled_encoder_forward(vae.encoder, x, 256)
    finally:
        vae.enable_adapters()
    assert (off - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    ("h", "w", "tile", "is_decoder", "expected"),
    [
        (1088, 1088, RELEASE_ENCODER_TILE, False, False),  # 2·32 + 1024
        (1000, 1089, RELEASE_ENCODER_TILE, False, True),
        (246, 100, RELEASE_DECODER_TILE, True, False),  # 2·11 + 224 latent px = 1968 image px
        (247, 100, RELEASE_DECODER_TILE, True, True),
        (256, 384, 256, False, True),
        (32, 48, 32, True, False),  # the parity fixture's tiled case with decoder tile 32
        (32, 54, 32, True, False),
        (32, 55, 32, True, True),
    ],
)
def test_trigger(h, w, tile, is_decoder, expected):
    assert release_vae_tiling_applies(h, w, tile, is_decoder) is expected


def test_below_trigger_runs_the_untiled_modules(tiny_vae):
    vae = tiny_vae
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 320, generator=g) * 2 - 1  # max side 320 = 2·32 + 256
    z = torch.randn(2, 4, 54, 20, generator=g)  # max side 54 = 2·11 + 32
    with torch.no_grad():
        assert torch.equal(release_tiled_encoder_forward(vae.encoder, x, 256), vae.encoder(x))
        assert torch.equal(release_tiled_decoder_forward(vae.decoder, z, 32), vae.decoder(z))


def test_snap_tile_size():
    assert _snap_tile_size(192, 256) == 192
    assert _snap_tile_size(36, 64) == 64  # up to a multiple of 32 when it fits
    assert _snap_tile_size(90, 100) == 96
    assert _snap_tile_size(99, 100) == 100  # only a multiple of 4 fits
    assert _snap_tile_size(-14, 8) == 0  # thin inputs: Python's floor modulo


def test_tile_split():
    assert release_vae_tiles(256, 384, 256, is_decoder=False) == [
        ReleaseTile(window=(0, 256, 0, 224), target=(0, 32, 0, 24)),
        ReleaseTile(window=(0, 256, 160, 384), target=(0, 32, 24, 48)),
    ]
    # A latent thinner than 2·pad: one zero-size core, still one full-height tile.
    assert release_vae_tiles(8, 32, 8, is_decoder=True) == [
        ReleaseTile(window=(0, 8, 0, 30), target=(0, 64, 0, 152)),
        ReleaseTile(window=(0, 8, 8, 32), target=(0, 64, 152, 256)),
    ]
    middle = release_vae_tiles(32, 40, 8, is_decoder=True)[1]  # cropped on both sides
    assert middle == ReleaseTile(window=(0, 30, 8, 38), target=(0, 152, 152, 216))


def test_bad_arguments(tiny_vae):
    vae = tiny_vae
    x = torch.zeros(1, 3, 262, 264)
    with pytest.raises(ValueError, match="vae_encoder_tiled_size=100"):
        release_tiled_encoder_forward(vae.encoder, x, 100)  # tiles start at x=100: not on the 8-px grid
    with pytest.raises(ValueError, match="positive integer"):
        release_tiled_decoder_forward(vae.decoder, torch.zeros(1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="B×C×H×W"):
        release_tiled_encoder_forward(vae.encoder, torch.zeros(3, 64, 64), 256)
    with pytest.raises(TypeError, match="vae.decoder"):
        release_tiled_decoder_forward(vae.encoder, torch.zeros(1, 4, 300, 8), 32)

"""The preview decoder (issue 17 item 6): ``decoder="tiny"`` decodes the same ẑ_H with an
``AutoencoderTiny``; loading is tested on a randomly initialised tiny AutoencoderTiny saved to a
temporary folder. Also the fp16 VAE overflow guard of the decode stage."""

import argparse
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.cli import main
from codsr.cli.upscale import register
from codsr.pipeline.tiled_stages import DecodeUpcastWarning, _guarded, tiny_decode, upcast_decoder

TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
)  # fmt: skip


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd")
    AutoencoderTiny(**TINY_TAESD).save_pretrained(folder)
    return folder


@pytest.fixture
def pipe_with_tiny(tiny_pipeline, taesd_dir):
    tiny_pipeline.load_tiny_decoder(taesd_dir)
    try:
        yield tiny_pipeline
    finally:
        tiny_pipeline.tiny_decoder = None


def test_tiny_decoder_decodes_the_same_latent(pipe_with_tiny):
    pipe = pipe_with_tiny
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        out = pipe.restore(lq, prompt="cat", generator=torch.Generator().manual_seed(7), decoder="tiny")
        vae = pipe.restore(lq, prompt="cat", generator=torch.Generator().manual_seed(7))
        emb = pipe.encode_prompt(["cat"])
        z_h = pipe.generator(lq, emb, pipe.default_timestep, generator=torch.Generator().manual_seed(7)).z_h
        # TAESD takes the scaled SD latent as is (its scaling_factor is 1) and returns [-1, 1]
        ref = pipe.tiny_decoder.decoder(z_h).clamp(-1, 1)
    assert pipe.tiny_decoder.config.scaling_factor == 1.0
    assert out.shape == vae.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - vae).abs().mean() > 1e-2  # a different (lossy) decoder, not the VAE


def test_tiny_decode_clamps_latents_like_taesd(taesd_dir):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(taesd_dir)
    z = torch.full((1, 4, 4, 4), 50.0)
    with torch.no_grad():
        # TAESD squashes its input with 3·tanh(x/3): 50 and 500 both saturate to 3 in float32
        a = tiny_decode(tiny, z)
        b = tiny_decode(tiny, z * 10)
        c = tiny_decode(tiny, z / 50)  # 1 → 3·tanh(1/3) ≈ 0.97: a different picture
    assert float(np.float32(np.tanh(50 / 3))) == 1.0
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3
    assert a.min() >= -1 and a.max() <= 1


def test_bad_decoder_and_path_name_the_fix(tiny_pipeline, tmp_path):
    lq = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="'vae' or 'tiny'"):
        tiny_pipeline.restore(lq, decoder="taesd")
    with pytest.raises(OSError, match="AutoencoderTiny folder or Hub id"):
        tiny_pipeline.load_tiny_decoder(tmp_path / "missing")


def test_cli_decoder_flags(tiny_model_dir, taesd_dir, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["upscale", "-i", "x", "--decoder", "tiny", "--tiny-decoder", str(taesd_dir)])
    assert (args.decoder, args.tiny_decoder) == ("tiny", str(taesd_dir))
    assert parser.parse_args(["upscale", "-i", "x"]).decoder == "vae"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "a.png")
    rc = main([
        "upscale", "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--base-model",
        str(tiny_model_dir / "tiny-sd21"), "--checkpoint", str(tiny_model_dir / "codsr_tiny.pkl"), "--tagger",
        "none", "--device", "cpu", "--decoder", "tiny", "--tiny-decoder", str(taesd_dir), "--quiet",
    ])  # fmt: skip
    assert rc == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (64, 64)


def test_fp16_decode_overflow_is_redone_in_float32(tiny_pipeline):
    import copy

    vae = copy.deepcopy(tiny_pipeline.generator.vae)
    with torch.no_grad():
        # representable weights whose activations pass float16's 65504 (the decoder's conv_in sums 6e4·w)
        vae.post_quant_conv.bias.fill_(6e4)
        vae.decoder.conv_in.weight.mul_(10)
    vae.half()
    ref_vae = copy.deepcopy(vae).float()  # the same (float16-representable) weights in float32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(upcast):
        return vae.decode(z.to(torch.float32 if upcast else torch.float16), return_dict=False)[0]

    with torch.no_grad():
        assert not torch.isfinite(run(False)).all()
        with pytest.warns(DecodeUpcastWarning, match="float32"):
            out = _guarded(vae, run)
        ref = ref_vae.decode(z, return_dict=False)[0]
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert vae.decoder.conv_in.weight.dtype == torch.float16  # cast back after the block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), upcast_decoder(vae):
            assert vae.post_quant_conv.weight.dtype == torch.float32

import pytest
import torch
from diffusers import UNet2DConditionModel

from codsr.model.lora import add_adapter, unet_lora_target_modules
from codsr.model.lqfm import SFTModulator, conv_in_modulation


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(320, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=(5, 2),
        norm_num_groups=32,
        sample_size=8,
    ).eval()


def test_sft_has_release_size_and_starts_as_identity():
    sft = SFTModulator()
    n = sum(p.numel() for p in sft.parameters())
    assert n == 2 * (192 * 320 * 9 + 320 + 320 * 320 * 9 + 320)  # 2,950,400 ≈ 2.95 M (docs/method.md#lqfm)
    scale, shift = sft(torch.rand(1, 3, 32, 48) * 2 - 1)
    assert scale.shape == shift.shape == (1, 320, 4, 6)
    assert scale.abs().max() == 0 and shift.abs().max() == 0


def test_sft_matches_release_fixture(parity_case, parity_dir):
    ckpt = torch.load(parity_dir / "codsr_tiny.pkl", weights_only=True)
    sft = SFTModulator()
    sft.load_state_dict(ckpt["state_dict_sft"])
    case = parity_case("untiled")
    with torch.no_grad():
        scale, shift = sft(case["lq"])
    # float32 kernel rounding differs by CPU instruction set (bitwise on the fixture's machine,
    # 1.0e-6 on an AVX2 EPYC)
    torch.testing.assert_close(scale, case["sft_scale_raw"], atol=1e-5, rtol=0)
    torch.testing.assert_close(shift, case["sft_shift_raw"], atol=1e-5, rtol=0)


def test_conv_in_modulation_applies_eq4_and_is_removed():
    unet = tiny_unet()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scale = torch.randn(1, 320, 8, 8, generator=torch.Generator().manual_seed(1))
    shift = torch.randn(1, 320, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = unet.conv_in(z)
        with conv_in_modulation(unet, scale, shift):
            mod = unet.conv_in(z)
        after = unet.conv_in(z)
    torch.testing.assert_close(mod, plain * (scale + 1) + shift)
    torch.testing.assert_close(after, plain)


def test_hook_sees_lora_output_after_injection():
    # The release modulates the output of the LoRA'd conv_in; a hook bound to the base layer
    # would miss the LoRA term (ENVIRONMENT.md gotcha).
    unet = tiny_unet()
    add_adapter(unet, 4, unet_lora_target_modules(unet)["encoder"], "default_encoder")
    with torch.no_grad():
        unet.conv_in.lora_B["default_encoder"].weight.normal_()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scale = torch.full((1, 320, 8, 8), 0.5)
    shift = torch.zeros(1, 320, 8, 8)
    with torch.no_grad():
        lora_out = unet.conv_in(z)
        base_out = unet.conv_in.base_layer(z)
        with conv_in_modulation(unet, scale, shift):
            mod = unet.conv_in(z)
    assert (lora_out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(mod, lora_out * 1.5)


def test_channel_mismatch_is_an_error():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="320"):
        with conv_in_modulation(unet, torch.zeros(1, 64, 8, 8), torch.zeros(1, 64, 8, 8)):
            pass

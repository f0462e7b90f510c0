import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel

from codsr.model.lora import (
    activate_adapters,
    add_adapter,
    lora_delta,
    merge_lora_weights,
    unet_lora_target_modules,
    unique,
    vae_lora_target_modules,
)


def test_tiny_model_target_lists():
    """On the tiny SD 2.1 (docs/method.md#lora-layout): counts by hand from its config."""
    from codsr.testing import build_tiny_components

    comps = build_tiny_components(seed=0)
    groups = unet_lora_target_modules(comps["unet"])
    # encoder: conv_in + DownBlock2D (2 resnet convs + downsampler conv) + CrossAttnDownBlock2D (2 resnet
    # convs + shortcut + proj_in/out + attn1/attn2 q,k,v,out + ff 2) = 1 + 3 + 15
    assert len(groups["encoder"]) == 19 and groups["encoder"][0] == "conv_in"
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in groups["others"]
    assert groups["decoder"][-1] == "conv_out"
    vae_list = vae_lora_target_modules(comps["vae"])
    assert (len(vae_list), len(unique(vae_list))) == (63, 31)  # the same VAE layout as the release fixture


def test_target_lists_equal_the_release_checkpoint(parity_dir):
    ckpt = torch.load(parity_dir / "codsr_tiny.pkl", weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(parity_dir / "tiny-sd21", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(parity_dir / "tiny-sd21", subfolder="vae")
    groups = unet_lora_target_modules(unet)
    for g in ("encoder", "decoder", "others"):
        assert groups[g] == ckpt[f"unet_lora_{g}_modules_default"]
    assert [len(groups[g]) for g in ("encoder", "decoder", "others")] == [17, 35, 16]
    vae_list = vae_lora_target_modules(vae)
    assert vae_list == ckpt["vae_lora_encoder_modules"]  # duplicates and order included
    assert (len(vae_list), len(unique(vae_list))) == (63, 31)
    assert "quant_conv" in vae_list and "post_quant_conv" not in vae_list
    assert not any("decoder" in n or "time_emb" in n for n in vae_list + sum(groups.values(), []))


def test_lora_delta_matches_definition():
    g = torch.Generator().manual_seed(0)
    a_lin, b_lin = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(lora_delta(a_lin, b_lin), b_lin @ a_lin)
    a, b = torch.randn(4, 6, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    expected = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(lora_delta(a, b), expected, atol=1e-5, rtol=1e-5)
    a1 = torch.randn(4, 6, 1, 1, generator=g)
    torch.testing.assert_close(lora_delta(a1, b), (b[:, :, 0, 0] @ a1[:, :, 0, 0])[:, :, None, None])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 5)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def test_merged_weights_reproduce_unmerged_peft_forward():
    from peft import inject_adapter_in_model

    from codsr.model.lora import lora_config

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    peft_model = inject_adapter_in_model(lora_config(2, ["conv", "lin"]), _Net(), adapter_name="a")
    with torch.no_grad():
        for m in (peft_model.conv, peft_model.lin):
            m.lora_B["a"].weight.normal_()
        out_lora = peft_model(x)
    sd = {k: v for k, v in peft_model.state_dict().items() if "lora" in k}
    ref = _Net()
    with torch.no_grad():
        out_base = ref(x)
    merge_lora_weights(ref, sd, ["conv", "lin"], "a", scale=8 / 2)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), out_lora, atol=1e-4, rtol=1e-5)
    assert (out_base - out_lora).abs().max() > 1e-2  # the LoRA really changes the output


def test_activate_adapters_enables_all_listed():
    torch.manual_seed(0)
    model = nn.Module()
    model.lin = nn.Linear(4, 4)
    from peft import inject_adapter_in_model

    from codsr.model.lora import lora_config

    model = inject_adapter_in_model(lora_config(2, ["lin"]), model, adapter_name="one")
    model = inject_adapter_in_model(lora_config(2, ["lin"]), model, adapter_name="two")
    assert model.lin.active_adapters == ["two"]  # peft activates only the newest
    activate_adapters(model, ["one", "two"])
    assert model.lin.active_adapters == ["one", "two"]


def test_add_adapter_on_diffusers_model():
    from codsr.testing import build_tiny_components

    vae = build_tiny_components(seed=0)["vae"]
    add_adapter(vae, 4, vae_lora_target_modules(vae), "default_encoder")
    keys = [k for k in vae.state_dict() if "lora" in k]
    assert len(keys) == 2 * 31
    assert all(".default_encoder." in k for k in keys)
    assert vae.encoder.conv_in.scaling["default_encoder"] == 2.0  # 8 / r with r = 4

"""Cross-attention capture and TMG losses (paper §3.4, docs/method.md#stage-2) on the tiny SD 2.1 model."""

from __future__ import annotations

import math

import pytest
import torch

from codsr.stage2.attention import CrossAttentionCapture, cross_attention_layers, grid_for_length
from codsr.stage2.tmg import (
    TMGLoss,
    combine_layer_maps,
    noun_attention_maps,
    noun_token_positions,
    tmg_losses,
)


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD 2.1 (codsr.testing): byte-level CLIP tokenizer, so every word is spelled byte by byte."""
    import copy

    from codsr.testing import build_tiny_components

    comps = build_tiny_components(seed=0)
    return {
        "unet": lambda: copy.deepcopy(comps["unet"]).eval(),
        "tokenizer": comps["tokenizer"],
        "text_encoder": comps["text_encoder"].eval(),
    }


def _embed(tiny, prompts):
    from codsr.stage2.vsd import encode_prompts

    return encode_prompts(tiny["tokenizer"], tiny["text_encoder"], prompts)


# ---------------------------------------------------------------------- losses by hand
def test_tmg_losses_hand_computed():
    a = torch.tensor(
        [
            [[0.1, 0.2], [0.3, 0.4]],
            [[0.5, 0.5], [0.5, 0.5]],  # its mask is empty: ignored
            [[0.2, 0.6], [0.1, 0.3]],
        ]
    )
    m = torch.tensor([[[1.0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    area, bce, count = tmg_losses(a, m)
    assert count == 2
    area_0 = (1 - 0.1 / 1.0) ** 2  # 0.81; the third map lies fully inside its mask: 0
    assert area.item() == pytest.approx(area_0 / 2, abs=1e-6)
    bce_0 = -(math.log(0.1) + math.log(0.8) + math.log(0.7) + math.log(0.6)) / 4
    bce_2 = -(math.log(0.2) + math.log(0.6) + math.log(0.1) + math.log(0.3)) / 4
    assert bce.item() == pytest.approx((bce_0 + bce_2) / 2, abs=1e-6)
    # torch's BCELoss agrees per mask
    ref = torch.nn.BCELoss()(a[0], m[0])
    assert ref.item() == pytest.approx(bce_0, abs=1e-6)


def test_tmg_losses_none_valid_is_zero_with_graph():
    a = torch.full((2, 4, 4), 0.25, requires_grad=True)
    area, bce, count = tmg_losses(a, torch.zeros(2, 4, 4))
    assert count == 0 and area.item() == 0.0 and bce.item() == 0.0
    (area + bce).backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_min_pixels_validity():
    a = torch.full((1, 4, 4), 0.5)
    m = torch.zeros(1, 4, 4)
    m[0, 0, :2] = 1
    assert tmg_losses(a, m, min_pixels=2)[2] == 1
    assert tmg_losses(a, m, min_pixels=3)[2] == 0


def test_noun_maps_and_layer_combination():
    att = torch.zeros(2, 2, 5)
    att[..., 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    att[..., 3] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    maps = noun_attention_maps(att, [[1, 3], [3]], size=(2, 2))
    assert torch.allclose(maps[0], torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert torch.allclose(maps[1], att[..., 3])
    up = noun_attention_maps(torch.ones(2, 2, 5), [[0]], size=(8, 8))
    assert up.shape == (1, 8, 8) and torch.allclose(up, torch.ones(1, 8, 8))
    small, big = torch.full((1, 2, 2, 3), 0.2), torch.full((1, 4, 4, 3), 0.6)
    combined = combine_layer_maps([small, big])
    assert combined.shape == (1, 4, 4, 3) and torch.allclose(combined, torch.full((1, 4, 4, 3), 0.4))


def test_grid_for_length():
    assert grid_for_length(64 * 64, (64, 64)) == (64, 64)
    assert grid_for_length(8 * 6, (64, 48)) == (8, 6)
    assert grid_for_length(3 * 2, (9, 5)) == (3, 2)  # ceil halving: 9→5→3, 5→3→2
    with pytest.raises(ValueError):
        grid_for_length(7, (8, 8))


# ---------------------------------------------------------------------- token positions
def test_noun_token_positions(tiny):
    tok = tiny["tokenizer"]
    prompt = "cat, tabby cat, black, whiskers"
    # [bos, c a t</w>, ,</w>, t a b b y</w>, c a t</w>, ,</w>, b l a c k</w>, ,</w>, w h i s k e r s</w>, eos]
    ids = tok(prompt).input_ids
    assert len(ids) == 29 and ids[-1] == tok.eos_token_id
    assert noun_token_positions(tok, prompt, "cat") == [1, 2, 3, 10, 11, 12]
    assert noun_token_positions(tok, prompt, "whiskers") == list(range(20, 28))  # a multi-piece word
    assert noun_token_positions(tok, prompt, "tabby cat") == list(range(5, 13))
    assert noun_token_positions(tok, prompt, "Cat") == [1, 2, 3, 10, 11, 12]  # CLIP lower-cases
    assert noun_token_positions(tok, prompt, "dog") == []
    # "!" pads SD prompts (id 0 here): padding never matches a noun
    assert noun_token_positions(tok, "cat", "!") == []


def test_truncated_noun_is_skipped(tiny):
    tok = tiny["tokenizer"]
    long_prompt = ", ".join(["grass"] * 40) + ", zebra"  # zebra falls beyond 77 tokens
    assert noun_token_positions(tok, long_prompt, "zebra") == []
    # 75 content tokens = 12 × ("g r a s s</w>" + ",</w>") + "g r a": the cut 13th "grass" does not count
    grass = noun_token_positions(tok, long_prompt, "grass")
    assert len(grass) == 60 and grass[-5:] == [67, 68, 69, 70, 71]


# ---------------------------------------------------------------------- capture processor
def test_layer_selection_counts_attn2(tiny):
    unet = tiny["unet"]()
    names = cross_attention_layers(unet)
    assert len(names) == 4  # the tiny UNet: 1 down, 2 up, 1 mid
    assert names[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # its first attn2
    assert CrossAttentionCapture(unet, "first", attach=False).layer_names == names[:1]
    assert CrossAttentionCapture(unet, "all", attach=False).layer_names == names
    with pytest.raises(ValueError, match="unknown cross-attention layers"):
        CrossAttentionCapture(unet, ["down_blocks.0.attn2"], attach=False)


def test_sd21_layout_first_layer_and_count():
    from diffusers import UNet2DConditionModel

    # SD 2.1-base's block layout with tiny widths: 16 attn2 layers, the first in down_blocks.0.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    names = cross_attention_layers(unet)
    assert len(names) == 16
    assert CrossAttentionCapture(unet, "first", attach=False).layer_names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    ]


def test_capture_keeps_unet_output_and_restores(tiny):
    unet = tiny["unet"]()
    before = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 16, 12), torch.tensor([10, 600])
    c = torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=c).sample
        with CrossAttentionCapture(unet, "all") as capture:
            after_attach = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
            out = unet(z, t, encoder_hidden_states=c).sample
            maps = dict(capture.maps)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    changed = {k for k in before if before[k] != after_attach[k]}
    assert changed == {f"{n}.processor" for n in cross_attention_layers(unet)}  # attn1 untouched
    assert {k: type(v).__name__ for k, v in unet.attn_processors.items()} == before
    assert maps["down_blocks.1.attentions.0.transformer_blocks.0.attn2"].shape == (2, 8, 6, 77)
    for m in maps.values():  # head-averaged softmax rows sum to one over the 77 tokens
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5)


def _unet_with_alignment_lora(tiny):
    from codsr.model.lora import (
        UNET_GROUPS,
        activate_adapters,
        add_adapter,
        unet_adapter_name,
        unet_lora_target_modules,
    )

    unet = tiny["unet"]()
    groups = unet_lora_target_modules(unet)
    for alignment in (False, True):
        for g in UNET_GROUPS:
            add_adapter(unet, 16, groups[g], unet_adapter_name(g, alignment))
    activate_adapters(unet, [unet_adapter_name(g, a) for a in (False, True) for g in UNET_GROUPS])
    unet.requires_grad_(False)
    params = {n: p for n, p in unet.named_parameters() if "alignment" in n and "attn2" in n}
    for p in params.values():
        p.requires_grad_(True)
    return unet, params


def test_gradients_reach_first_attn2_alignment_lora(tiny):
    torch.manual_seed(0)
    unet, params = _unet_with_alignment_lora(tiny)
    prompts = ["cat, grass"]
    c = _embed(tiny, prompts)
    capture = CrossAttentionCapture(unet, "first")
    unet(torch.randn(1, 4, 16, 16), torch.tensor([200]), encoder_hidden_states=c)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    out = TMGLoss(tiny["tokenizer"])(capture, prompts, [["cat"]], [mask])
    assert out.num_valid == 1 and out.area.item() > 0
    out.loss.backward()
    first = capture.layer_names[0]
    with_grad = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    # B starts at 0, so only lora_B of to_q/to_k of the watched layer gets a gradient
    assert with_grad == {f"{first}.to_q.lora_B.default_encoder_alignment.weight",
                         f"{first}.to_k.lora_B.default_encoder_alignment.weight"}  # fmt: skip


def test_area_loss_falls_when_attention_is_trained(tiny):
    torch.manual_seed(0)
    unet, params = _unet_with_alignment_lora(tiny)
    tokenizer = tiny["tokenizer"]
    prompts = ["cat, grass, sky"]
    c = _embed(tiny, prompts)
    z, t = torch.randn(1, 4, 16, 16), torch.tensor([150])
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :] = 1  # the top half
    capture = CrossAttentionCapture(unet, "all")
    tmg = TMGLoss(tokenizer, area_weight=1.0, bce_weight=0.0)
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    areas = []
    for _ in range(12):
        unet(z, t, encoder_hidden_states=c)
        out = tmg(capture, prompts, [["cat"]], [mask])
        areas.append(out.area.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        capture.clear()
    assert all(b < a for a, b in zip(areas, areas[1:], strict=False)), areas
    assert areas[-1] < 0.5 * areas[0], areas


def test_tmg_loss_skips_truncated_and_invalid(tiny):
    unet = tiny["unet"]()
    tokenizer = tiny["tokenizer"]
    long_prompt = ", ".join(["grass"] * 40) + ", zebra"
    prompts = [long_prompt, "cat, sky"]
    c = _embed(tiny, prompts)
    capture = CrossAttentionCapture(unet, "first")
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([100, 100]), encoder_hidden_states=c)
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, :, :8] = 1
    valid = torch.tensor([[True, True], [True, False]])
    out = TMGLoss(tokenizer)(capture, prompts, [["zebra", "grass"], ["cat", "sky"]], masks, valid)
    assert out.num_valid == 2  # grass (sample 0) and cat (sample 1)
    assert out.num_skipped == 1  # zebra was truncated away
    grass = noun_attention_maps(
        capture.maps[capture.layer_names[0]][0],
        [noun_token_positions(tokenizer, long_prompt, "grass")],
        (16, 16),
    )
    cat = noun_attention_maps(
        capture.maps[capture.layer_names[0]][1],
        [noun_token_positions(tokenizer, "cat, sky", "cat")],
        (16, 16),
    )
    area, bce, _ = tmg_losses(torch.cat([grass, cat]), torch.stack([masks[0, 1], masks[1, 0]]))
    assert out.area.item() == pytest.approx(area.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * area.item() + 0.025 * bce.item(), abs=1e-6)


def test_capture_under_bf16_autocast_keeps_float32_maps(tiny):
    unet, params = _unet_with_alignment_lora(tiny)
    prompts = ["cat, grass"]
    c = _embed(tiny, prompts)
    capture = CrossAttentionCapture(unet, "all")
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([100]), encoder_hidden_states=c)
        out = TMGLoss(tiny["tokenizer"])(capture, prompts, [["cat", "grass"]], [mask.expand(2, -1, -1)])
    assert all(m.dtype == torch.float32 for m in capture.maps.values())
    assert out.num_valid == 2 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())

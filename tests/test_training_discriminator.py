"""Tests for the vision-aided DINO discriminator, its GAN loss and DiffAugment (docs/method.md#stage-1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.nn.utils import parametrize

from codsr.training.diffaugment import (
    diff_augment,
    parse_policy,
    rand_cutout,
    rand_translation,
)
from codsr.training.discriminator import (
    DINO_FILENAME,
    DINO_URL,
    BlurPool,
    DiscriminatorConfig,
    GANLossConfig,
    VisionAidedDiscriminator,
    binomial_filter,
    build_dino_backbone,
    discriminator_loss,
    generator_loss,
    load_vit_weights,
    multilevel_sigmoid_loss,
)
from codsr.weights import WeightNotFoundError

TINY = dict(embed_dim=32, num_heads=2)


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=224, patch_size=16, depth=12, num_classes=0, **TINY)


@pytest.fixture()
def disc() -> VisionAidedDiscriminator:
    backbone = tiny_vit(0)
    torch.manual_seed(1)
    return VisionAidedDiscriminator(backbone)


def images(seed: int, b: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hand_bce(logits: list[torch.Tensor], target: float) -> torch.Tensor:
    """Σ_levels mean of −[t·log σ(l) + (1 − t)·log(1 − σ(l))]."""
    total = torch.zeros(())
    for level in logits:
        p = torch.sigmoid(level.double())
        total = total + (-(target * torch.log(p) + (1 - target) * torch.log(1 - p))).mean()
    return total.float()


# --------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------


def test_default_backbone_is_vit_b16_with_768_dim_levels():
    torch.manual_seed(0)
    d = VisionAidedDiscriminator(config=DiscriminatorConfig(pretrained_backbone=False)).eval()
    assert d.backbone.embed_dim == 768 and len(d.backbone.blocks) == 12
    assert all(not p.requires_grad for p in d.backbone.parameters())
    x = images(0, b=1, size=64)
    feats = d.extract_features(d.preprocess(x))
    assert [tuple(f.shape) for f in feats] == [(1, 768, 14, 14), (1, 768, 14, 14), (1, 768)]
    logits = d(x)
    assert [tuple(t.shape) for t in logits] == [(1, 3, 3), (1, 3, 3), (1, 1)]
    patch_head, cls_head = d.heads[0], d.heads[2]
    assert tuple(patch_head[1].weight.shape) == (128, 768, 3, 3) and patch_head[1].stride == (2, 2)
    assert tuple(patch_head[4].weight.shape) == (1, 128, 1, 1) and patch_head[4].stride == (2, 2)
    assert tuple(cls_head[0].weight.shape) == (128, 768) and tuple(cls_head[2].weight.shape) == (1, 128)
    assert patch_head[2].negative_slope == 0.2 and cls_head[1].negative_slope == 0.2


def test_features_are_normed_outputs_of_blocks_5_9_12(disc):
    x = images(3)
    pre = disc.preprocess(x)
    taken: dict[int, torch.Tensor] = {}
    hooks = [
        disc.backbone.blocks[i].register_forward_hook(lambda m, a, out, i=i: taken.__setitem__(i, out))
        for i in (4, 8, 11)
    ]
    with torch.no_grad():
        disc.backbone.forward_features(pre)
        feats = disc.extract_features(pre)
    for h in hooks:
        h.remove()
    norm = disc.backbone.norm
    for level, block in enumerate((4, 8)):
        tokens = norm(taken[block])[:, 1:]  # drop CLS; 196 patch tokens in row-major order
        expected = tokens.transpose(1, 2).reshape(2, 32, 14, 14)
        torch.testing.assert_close(feats[level], expected)
    torch.testing.assert_close(feats[2], norm(taken[11])[:, 0])


def test_preprocess_area_resize_and_normalisation(disc):
    # Read the normalisation the code applies back from two constant images: x = -1 gives
    # -mean/std, x = +1 gives (1 - mean)/std. Compare with the published numbers (CLIP's mean,
    # ImageNet's std, as the vision-aided GAN uses them; docs/method.md#stage-1).
    lo = disc.preprocess(torch.full((1, 3, 224, 224), -1.0))[0, :, 0, 0].double()
    hi = disc.preprocess(torch.full((1, 3, 224, 224), 1.0))[0, :, 0, 0].double()
    applied_std = 1 / (hi - lo)
    applied_mean = -lo * applied_std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(applied_mean.float(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(applied_std.float(), std, rtol=0, atol=1e-6)
    x = torch.full((1, 3, 448, 448), 0.5)
    out = disc.preprocess(x)
    assert out.shape == (1, 3, 224, 224)
    torch.testing.assert_close(out[0, :, 0, 0], (0.75 - mean) / std)
    # "area" from 448 to 224 is an exact 2×2 box average.
    x = images(4, b=1, size=448)
    expected = (F.avg_pool2d((x + 1) / 2, 2) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(disc.preprocess(x), expected)


def test_blurpool_filters_and_delta_response():
    f3 = binomial_filter(3)
    torch.testing.assert_close(f3, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    f4 = binomial_filter(4)
    torch.testing.assert_close(
        f4, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
    )
    assert f3.sum().item() == pytest.approx(1.0) and f4.sum().item() == pytest.approx(1.0)

    delta = torch.zeros(1, 2, 7, 7)
    delta[:, :, 3, 3] = 1.0
    out3 = BlurPool(2, taps=3)(delta)  # pad 1: same size, filter centred on the delta
    assert out3.shape == (1, 2, 7, 7)
    expected3 = torch.zeros(1, 2, 7, 7)
    expected3[:, :, 2:5, 2:5] = f3
    torch.testing.assert_close(out3, expected3)

    out4 = BlurPool(2, taps=4, pad=1)(delta)  # 7 + 2 - 4 + 1 = 6; padded delta at (4, 4)
    expected4 = torch.zeros(1, 2, 6, 6)
    expected4[:, :, 1:5, 1:5] = f4.flip(0, 1)
    torch.testing.assert_close(out4, expected4)
    assert not list(BlurPool(2).parameters())  # fixed filter, nothing to train


def test_blur_taps_3_variant_changes_map_size():
    d = VisionAidedDiscriminator(tiny_vit(), DiscriminatorConfig(blur_taps=3))
    assert [tuple(t.shape) for t in d(images(0))] == [(2, 4, 4), (2, 4, 4), (2, 1)]


def test_heads_use_spectral_norm(disc):
    disc.eval()
    layers = [m for m in disc.heads.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(layers) == 6  # 2 patch heads × 2 convs + 2 CLS linears
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight")
        sn = layer.parametrizations.weight[0]
        assert type(sn).__name__ == "_SpectralNorm"
        original = layer.parametrizations.weight.original
        sigma = sn._u @ (original.flatten(1) @ sn._v)
        torch.testing.assert_close(layer.weight, original / sigma)


# --------------------------------------------------------------------------------------------------
# Loss values
# --------------------------------------------------------------------------------------------------


def test_multilevel_sigmoid_loss_reference_numbers():
    zeros = [torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), torch.zeros(2, 1)]
    assert multilevel_sigmoid_loss(zeros, 0.8).item() == pytest.approx(3 * math.log(2))
    logits = [torch.tensor([[[2.0, -1.0]]]), torch.tensor([[0.5]])]
    # target 0: softplus(l); levels: mean(softplus(2), softplus(-1)) + softplus(0.5)
    expected = (math.log1p(math.e**2) + math.log1p(math.e**-1)) / 2 + math.log1p(math.e**0.5)
    assert multilevel_sigmoid_loss(logits, 0.0).item() == pytest.approx(expected, rel=1e-6)


def test_gan_losses_equal_hand_computation_from_logits(disc):
    disc.eval()  # no spectral-norm power iteration, so repeated calls give identical logits
    real, fake = images(10), images(11)
    cfg = GANLossConfig()
    assert (cfg.weight, cfg.start_step, cfg.real_target, cfg.fake_target) == (0.2, 3000, 0.8, 0.0)
    assert not cfg.is_active(2999) and cfg.is_active(3000)

    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        logits_real, logits_fake = disc(real, g), disc(fake, g)
        d_out = discriminator_loss(disc, real, fake, generator=torch.Generator().manual_seed(5))
        g_out = generator_loss(disc, fake, generator=torch.Generator().manual_seed(5))
        g_fake_first = disc(fake, torch.Generator().manual_seed(5))
    torch.testing.assert_close(d_out["real"], 0.2 * hand_bce(logits_real, 0.8))
    torch.testing.assert_close(d_out["fake"], 0.2 * hand_bce(logits_fake, 0.0))
    torch.testing.assert_close(d_out["loss"], d_out["real"] + d_out["fake"])
    torch.testing.assert_close(g_out, 0.2 * hand_bce(g_fake_first, 0.8))

    half = GANLossConfig(weight=0.5)
    with torch.no_grad():
        g_half = generator_loss(disc, fake, half, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(g_half, 0.5 * hand_bce(g_fake_first, 0.8))


def test_gan_loss_under_bf16_autocast_is_close_to_fp32(disc):
    disc.eval()
    fake = images(12)
    ref = generator_loss(disc, fake, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generator_loss(disc, fake, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # measured: relative difference 5e-6 (the loss averages many bf16 logits); bf16 itself is ~4e-3
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def test_d_step_updates_only_heads(disc):
    disc.train()
    assert not disc.backbone.training  # frozen feature extractor stays in eval
    backbone_before = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    heads_before = {n: p.detach().clone() for n, p in disc.heads.named_parameters()}
    # Even an optimizer over *all* parameters cannot move the backbone: it never gets a gradient.
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-2, weight_decay=1e-2)
    loss = discriminator_loss(disc, images(20), images(21))["loss"]
    loss.backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    opt.step()
    for k, v in disc.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    for n, p in disc.heads.named_parameters():
        assert not torch.equal(p.detach(), heads_before[n]), n
    assert {id(p) for p in disc.head_parameters()} == {id(p) for p in disc.heads.parameters()}


def test_g_step_backpropagates_through_frozen_backbone_into_image(disc):
    fake = images(30).requires_grad_(True)
    generator_loss(disc, fake).backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all()
    assert fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="feature_blocks"):
        VisionAidedDiscriminator(tiny_vit(), DiscriminatorConfig(feature_blocks=(4, 8, 12)))
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        VisionAidedDiscriminator(tiny_vit(), DiscriminatorConfig(diffaug_policy="color,flip"))
    with pytest.raises(TypeError, match="VisionTransformer"):
        VisionAidedDiscriminator(torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------------------------------
# Backbone loading
# --------------------------------------------------------------------------------------------------


def test_dino_weights_load_from_local_files(tmp_path):
    source = tiny_vit(seed=42)
    # Original DINO layout: a full checkpoint with the released network under 'teacher', keys
    # prefixed 'backbone.', plus projection-head tensors the timm model does not have.
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 32)
    pth = tmp_path / DINO_FILENAME
    torch.save({"teacher": teacher, "epoch": 3}, pth)
    model = build_dino_backbone(pth, **TINY)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)

    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit(seed=43).state_dict().items()}, str(st))
    other = tiny_vit(seed=0)
    load_vit_weights(other, st)
    torch.testing.assert_close(other.blocks[11].mlp.fc2.weight, tiny_vit(seed=43).blocks[11].mlp.fc2.weight)

    partial = dict(source.state_dict())
    del partial["blocks.3.attn.qkv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.qkv\.weight"):
        load_vit_weights(tiny_vit(), tmp_path / "partial.pth")


def test_missing_dino_weights_raise_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        build_dino_backbone(tmp_path / "absent.pth", **TINY)
    assert DINO_FILENAME in str(err.value) and DINO_URL in str(err.value)

    # No local file and an empty hub cache (offline): the timm hub route fails with the same advice.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("CODSR_HOME", str(tmp_path / "codsr"))
    monkeypatch.delenv("CODSR_DINO", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        build_dino_backbone(**TINY)
    msg = str(err.value)
    assert isinstance(err.value, WeightNotFoundError)
    assert "timm/vit_base_patch16_224.dino" in msg and DINO_URL in msg
    assert msg.startswith(f"{DINO_FILENAME} (") and str(tmp_path / "codsr" / DINO_FILENAME) in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / DINO_FILENAME) in msg


def test_dino_weights_found_in_the_codsr_cache_before_the_hub(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("CODSR_HOME", str(tmp_path))
    monkeypatch.delenv("CODSR_DINO", raising=False)
    source = tiny_vit(seed=5)
    torch.save(source.state_dict(), tmp_path / DINO_FILENAME)
    real_create = timm.create_model

    def no_hub(name, pretrained=False, **kw):
        assert not pretrained, "the hub must not be asked when the cache has the file"
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", no_hub)
    model = build_dino_backbone(**TINY)
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    with pytest.raises(ValueError, match="pretrained=False"):
        build_dino_backbone(tmp_path / "absent.pth", pretrained=False)


# --------------------------------------------------------------------------------------------------
# DiffAugment
# --------------------------------------------------------------------------------------------------


def test_diffaugment_reproducible_and_identity_when_disabled():
    x = images(40, b=4, size=16)
    a = diff_augment(x, torch.Generator().manual_seed(3))
    b = diff_augment(x, torch.Generator().manual_seed(3))
    c = diff_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for off in ("", None, [], " , "):
        assert diff_augment(x, torch.Generator().manual_seed(3), off) is x
    assert parse_policy(" color , cutout") == ("color", "cutout")
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        parse_policy("color,rotate")


def test_color_ops_match_formulas():
    x = images(41, b=3, size=8)
    g = torch.Generator().manual_seed(9)
    r1, r2, r3 = (torch.rand(3, generator=g).view(3, 1, 1, 1) for _ in range(3))
    y = x + (r1 - 0.5)
    y = (y - y.mean(1, keepdim=True)) * (2 * r2) + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * (r3 + 0.5) + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(diff_augment(x, torch.Generator().manual_seed(9), "color"), y)


def test_translation_on_hand_made_input():
    b, h, w = 6, 16, 16  # max shift int(16 * 0.125 + 0.5) = 2
    x = (torch.arange(h * w, dtype=torch.float32) + 1).view(1, 1, h, w).repeat(b, 2, 1, 1)
    out = rand_translation(x, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    tx, ty = torch.randint(-2, 3, (b,), generator=g), torch.randint(-2, 3, (b,), generator=g)
    assert tx.abs().max() <= 2 and len(set(zip(tx.tolist(), ty.tolist(), strict=True))) > 1
    for n in range(b):
        for i in range(h):
            for j in range(w):
                si, sj = i + int(tx[n]), j + int(ty[n])
                want = x[n, 0, si, sj].item() if (0 <= si < h and 0 <= sj < w) else 0.0
                assert out[n, 0, i, j].item() == want and out[n, 1, i, j].item() == want


@pytest.mark.parametrize("size", [10, 8])  # odd (5) and even (4) cutout sizes
def test_cutout_on_hand_made_input(size):
    b = 8
    x = torch.ones(b, 3, size, size)
    out = rand_cutout(x, torch.Generator().manual_seed(13))
    cut = int(size * 0.5 + 0.5)
    g = torch.Generator().manual_seed(13)
    high = size + (1 - cut % 2)
    oh, ow = torch.randint(0, high, (b,), generator=g), torch.randint(0, high, (b,), generator=g)
    for n in range(b):
        expected = torch.ones(size, size)
        top, left = int(oh[n]) - cut // 2, int(ow[n]) - cut // 2
        expected[max(top, 0) : max(top + cut, 0), max(left, 0) : max(left + cut, 0)] = 0
        for c in range(3):
            assert torch.equal(out[n, c], expected)
    assert (out == 0).any()


def test_diffaugment_is_differentiable():
    x = images(50, b=2, size=16).requires_grad_(True)
    diff_augment(x, torch.Generator().manual_seed(1)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # cutout alone: d(sum)/dx is exactly the keep mask
    y = torch.ones(2, 1, 8, 8, requires_grad=True)
    out = rand_cutout(y, torch.Generator().manual_seed(2))
    out.sum().backward()
    torch.testing.assert_close(y.grad, out.detach())

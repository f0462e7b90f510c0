"""VSD regulariser (paper §3.4, docs/method.md#stage-2) on the tiny SD 2.1 UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from codsr.stage2.vsd import FAKE_SCORE_ADAPTERS, NEGATIVE_PROMPT, VSDLoss


@pytest.fixture(scope="module")
def parts():
    from codsr.testing import build_tiny_components

    comps = build_tiny_components(seed=0)
    return comps["unet"].eval(), comps["scheduler"]


def _make(parts, neg=None, seed=0, **kw):
    unet, scheduler = parts
    plain = copy.deepcopy(unet)
    torch.manual_seed(seed)
    neg = torch.randn(1, 77, 32) if neg is None else neg
    return VSDLoss(copy.deepcopy(unet), scheduler, neg, **kw), plain


def _randomise_lora_b(vsd, adapters=FAKE_SCORE_ADAPTERS, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vsd.unet.named_parameters():
            if ".lora_B." in name and any(name.endswith(f".{a}.weight") for a in adapters):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)


def test_negative_prompt_is_the_spec_text():
    assert NEGATIVE_PROMPT.startswith("painting, oil painting, illustration")
    assert NEGATIVE_PROMPT.endswith("deformed, lowres, over-smooth")


def test_all_fake_adapters_active(parts):
    from peft.tuners.tuners_utils import BaseTunerLayer

    vsd, _ = _make(parts)
    layers = [m for m in vsd.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    held = set()
    for m in layers:
        assert set(m.lora_A.keys()) <= set(m.active_adapters)  # every adapter a layer holds is used
        held |= set(m.lora_A.keys())
    assert held == set(FAKE_SCORE_ADAPTERS)
    # functionally: a non-zero B in ANY of the three adapters changes the fake score
    z, c = _inputs()
    t = torch.tensor([500, 500])
    with torch.no_grad():
        base = vsd._eps(z, t, c)
        for adapter in FAKE_SCORE_ADAPTERS:
            _randomise_lora_b(vsd, [adapter])
            assert (vsd._eps(z, t, c) - base).abs().max() > 1e-4, adapter
            with torch.no_grad():
                for name, p in vsd.unet.named_parameters():
                    if ".lora_B." in name:
                        p.zero_()
    trainable = {n for n, p in vsd.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert len(vsd.fake_score_parameters()) == len(trainable)


def test_real_score_has_no_lora_effect(parts):
    vsd, plain = _make(parts)
    _randomise_lora_b(vsd)
    z, c = _inputs()
    t = torch.tensor([30, 900])
    with torch.no_grad():
        ref = plain(z, t, encoder_hidden_states=c).sample
        with vsd.real_score():
            real = vsd._eps(z, t, c)
        fake = vsd._eps(z, t, c)
    assert torch.allclose(real, ref, atol=1e-6, rtol=0)
    assert (fake - ref).abs().max() > 1e-3  # adapters are back on after the context
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(not m.disable_adapters for m in vsd.unet.modules() if isinstance(m, BaseTunerLayer))


def test_vsd_gradient_matches_hand_computation(parts):
    vsd, plain = _make(parts)
    _randomise_lora_b(vsd)
    z0, c = _inputs()
    z = z0.clone().requires_grad_(True)
    loss = vsd(z, c, torch.Generator().manual_seed(7))
    loss.backward()

    # the same draws by hand: timesteps first (U{20..979}), then the noise
    g = torch.Generator().manual_seed(7)
    t = torch.randint(20, 980, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    abar = vsd.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_n = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps_fake = vsd.unet(z_n, t, encoder_hidden_states=c).sample
        neg = vsd.negative_prompt_embeds.expand(2, -1, -1)
        eps_u = plain(z_n, t, encoder_hidden_states=neg).sample
        eps_c = plain(z_n, t, encoder_hidden_states=c).sample
    eps_real = eps_u + 7.5 * (eps_c - eps_u)
    x0_fake = (z_n - (1 - abar).sqrt() * eps_fake) / abar.sqrt()
    x0_real = (z_n - (1 - abar).sqrt() * eps_real) / abar.sqrt()
    w = (z0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (x0_fake - x0_real) / w
    assert loss.item() == pytest.approx((grad**2).mean().item(), rel=1e-4)
    assert torch.allclose(z.grad, 2 * grad / grad.numel(), atol=1e-7, rtol=1e-3)
    # the generator loss never trains the fake score
    assert all(p.grad is None for p in vsd.fake_score_parameters())


def test_vsd_gradient_is_zero_when_fake_equals_real(parts):
    z0, c = _inputs(b=1)
    vsd, _ = _make(parts, neg=c.clone())  # uncond == cond, so CFG gives the conditional score
    z = z0.clone().requires_grad_(True)
    loss = vsd(z, c, torch.Generator().manual_seed(0))  # fake LoRA starts at B = 0: fake == real
    loss.backward()
    assert loss.item() < 1e-10
    assert z.grad.abs().max().item() < 1e-7


def test_fake_score_loss_by_hand(parts):
    vsd, _ = _make(parts)
    _randomise_lora_b(vsd)
    z, c = _inputs()
    loss = vsd(z, c, torch.Generator().manual_seed(11), mode="fake")
    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    abar = vsd.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = vsd.unet(abar.sqrt() * z + (1 - abar).sqrt() * noise, t, encoder_hidden_states=c).sample
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(eps, noise).item(), rel=1e-5)


def test_step_fake_score_changes_only_its_lora(parts):
    vsd, _ = _make(parts)
    before = {n: p.detach().clone() for n, p in vsd.unet.named_parameters()}
    opt = vsd.make_optimizer()
    assert opt.defaults["lr"] == 5e-5 and opt.defaults["weight_decay"] == 1e-2
    z, c = _inputs()
    z.requires_grad_(True)
    value = vsd.step_fake_score(z, c, opt, torch.Generator().manual_seed(0))
    assert value > 0
    assert z.grad is None  # the fake-score loss sees ẑ_H detached
    changed = {n for n, p in vsd.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)
    with pytest.raises(ValueError, match="mode"):
        vsd(z, c, mode="both")


def test_bf16_base_with_fp32_lora(parts):
    vsd, _ = _make(parts, base_dtype=torch.bfloat16)
    assert vsd.base_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in vsd.fake_score_parameters())
    z, c = _inputs()
    z.requires_grad_(True)
    loss = vsd(z, c, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert vsd.step_fake_score(z, c, vsd.make_optimizer(), torch.Generator().manual_seed(1)) > 0


def test_rejects_unet_with_lora(parts):
    vsd, _ = _make(parts)
    with pytest.raises(ValueError, match="plain SD UNet"):
        VSDLoss(vsd.unet, parts[1], torch.zeros(1, 77, 32))

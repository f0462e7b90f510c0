"""Tests for codsr.data.kernels, codsr.data.jpeg and codsr.data.degradation (Real-ESRGAN degradation, docs/method.md#stage-1)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.data import kernels as K
from codsr.data.degradation import (
    BatchDegrader,
    DegradationConfig,
    _count_levels,
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    filter2d,
    random_resize_back,
    sample_kernels,
)
from codsr.data.jpeg import jpeg_compress, quality_to_tables
from conftest import FIXTURES

E = math.e


def _photo(name: str = "real_lq/RealESRGAN_inputs/00003.png", size: int | None = None) -> np.ndarray:
    """A photo from tests/fixtures as H×W×3 uint8 (top-left ``size``² crop)."""
    arr = np.asarray(Image.open(FIXTURES / name).convert("RGB"))
    return arr[:size, :size].copy() if size else arr.copy()


def _to01(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


# ----------------------------------------------------------------------------- kernels


def test_iso_gaussian_matches_hand_values():
    k = K.gaussian_kernel(3, 1.0)
    # exp(-(x²+y²)/2): centre 1, edges e^-1/2, corners e^-1
    raw = torch.tensor(
        [[E**-1, E**-0.5, E**-1], [E**-0.5, 1.0, E**-0.5], [E**-1, E**-0.5, E**-1]], dtype=torch.float64
    )
    torch.testing.assert_close(k, raw / raw.sum())
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_aniso_gaussian_matches_hand_covariance():
    # σx=1, σy=2, θ=π/4: Σ = [[2.5, -1.5], [-1.5, 2.5]], Σ⁻¹ = [[2.5, 1.5], [1.5, 2.5]] / 4
    k = K.gaussian_kernel(5, 1.0, 2.0, math.pi / 4)
    ax = torch.arange(-2, 3, dtype=torch.float64)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    raw = torch.exp(-0.5 * (2.5 * x * x + 3.0 * x * y + 2.5 * y * y) / 4)
    torch.testing.assert_close(k, raw / raw.sum())
    # θ = 0: axis-aligned, wider along y (rows); θ = π/2 swaps the axes
    k0 = K.gaussian_kernel(5, 1.0, 2.0, 0.0)
    raw0 = torch.exp(-0.5 * (x * x / 1.0 + y * y / 4.0))
    torch.testing.assert_close(k0, raw0 / raw0.sum())
    torch.testing.assert_close(K.gaussian_kernel(5, 1.0, 2.0, math.pi / 2), k0.T)


def test_sigma_matrix_values():
    s = K.sigma_matrix(1.0, 2.0, math.pi / 4)
    torch.testing.assert_close(s, torch.tensor([[2.5, -1.5], [-1.5, 2.5]], dtype=torch.float64))


def test_generalized_gaussian_closed_form():
    # Real-ESRGAN's convention exp(-q^β/2): β = 1 is exactly the Gaussian ...
    torch.testing.assert_close(
        K.generalized_gaussian_kernel(7, 1.3, 0.7, 0.4, 1.0), K.gaussian_kernel(7, 1.3, 0.7, 0.4)
    )
    # ... and β = 2 gives exp(-q²/2): for iso σ=1, q = 0 (centre), 1 (edge), 2 (corner)
    k = K.generalized_gaussian_kernel(3, 1.0, 1.0, 0.0, 2.0)
    raw = torch.tensor(
        [[E**-2, E**-0.5, E**-2], [E**-0.5, 1.0, E**-0.5], [E**-2, E**-0.5, E**-2]], dtype=torch.float64
    )
    torch.testing.assert_close(k, raw / raw.sum())


@pytest.mark.parametrize(("beta", "edge", "corner"), [(1.0, 1 / 2, 1 / 3), (2.0, 1 / 2, 1 / 5)])
def test_plateau_closed_form(beta, edge, corner):
    # 1 / (1 + q^β) with q = 0, 1, 2 at centre, edges, corners (iso σ = 1)
    k = K.plateau_kernel(3, 1.0, 1.0, 0.0, beta)
    raw = torch.tensor(
        [[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]], dtype=torch.float64
    )
    torch.testing.assert_close(k, raw / raw.sum())


def _bessel_j1(x: np.ndarray) -> np.ndarray:
    """J1(x) = (1/π) ∫₀^π cos(τ - x sin τ) dτ (Bessel's integral), by the trapezoid rule."""
    tau = np.linspace(0.0, np.pi, 4001)
    vals = np.cos(tau[None, :] - x.reshape(-1, 1) * np.sin(tau[None, :]))
    return (np.trapezoid(vals, tau, axis=1) / np.pi).reshape(x.shape)


@pytest.mark.parametrize(("size", "cutoff"), [(21, math.pi / 3), (13, math.pi / 5), (7, math.pi)])
def test_sinc_kernel_matches_circular_lowpass(size, cutoff):
    k = K.sinc_kernel(size, cutoff).numpy()
    ax = np.arange(size) - size // 2
    r = np.sqrt(ax[None, :] ** 2 + ax[:, None] ** 2)
    safe = np.where(r > 0, r, 1.0)
    raw = np.where(r > 0, cutoff * _bessel_j1(cutoff * safe) / (2 * np.pi * safe), cutoff**2 / (4 * np.pi))
    # torch.special.bessel_j1 is accurate to ~5e-7 absolute (float64), i.e. ~1e-8 on the taps
    np.testing.assert_allclose(k, raw / raw.sum(), rtol=1e-5, atol=5e-8)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    if cutoff < math.pi:
        assert k.min() < 0  # the ringing lobes that the sinc filter exists to create


def test_pad_and_pulse_kernels():
    k = K.gaussian_kernel(7, 1.0)
    p = K.pad_kernel(k, 21)
    assert p.shape == (21, 21) and p.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(p[7:14, 7:14], k)
    assert p[:7].abs().sum() == 0
    img = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(filter2d(img, K.pulse_kernel(21).float().expand(2, -1, -1)), img)


def test_random_blur_kernel_type_frequencies_and_sums():
    g = torch.Generator().manual_seed(0)
    cfg = DegradationConfig()
    counts = dict.fromkeys(K.KERNEL_TYPES, 0)
    n = 2000
    for _ in range(n):
        k, kind = K.random_blur_kernel(
            g, 7, cfg.kernel_probs, cfg.blur_sigma, cfg.betag_range, cfg.betap_range
        )
        counts[kind] += 1
        assert abs(k.sum().item() - 1) < 1e-9 and k.min() >= 0
    for kind, p in zip(K.KERNEL_TYPES, cfg.kernel_probs, strict=True):
        assert abs(counts[kind] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (kind, counts)


def test_sample_kernels_shapes_sums_and_final_sinc_rate():
    g = torch.Generator().manual_seed(1)
    ks = sample_kernels(g, DegradationConfig(), 600)
    for key in ("kernel1", "kernel2", "sinc_kernel"):
        assert ks[key].shape == (600, 21, 21) and ks[key].dtype == torch.float32
        torch.testing.assert_close(ks[key].sum((1, 2)), torch.ones(600), atol=1e-5, rtol=0)
        # all kernels are point-symmetric (so correlation == convolution)
        torch.testing.assert_close(ks[key], ks[key].flip(1, 2))
    pulses = (ks["sinc_kernel"][:, 10, 10] == 1).float().mean().item()
    assert abs(pulses - 0.2) < 0.06  # final sinc prob 0.8
    # first-stage kernels are sinc with prob 0.1 (the only ones with negative taps)
    sinc1 = (ks["kernel1"].amin((1, 2)) < 0).float().mean().item()
    assert sinc1 < 0.16
    # kernel sizes vary over 7..21 (a sharp kernel's far taps can underflow to 0, hence "contains")
    support = (ks["kernel1"].abs().sum(2) > 0).sum(1)
    assert {7, 13, 21} <= set(support.tolist()) and support.max().item() == 21


def test_filter2d_matches_direct_correlation():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 16, 16, generator=g)
    k = torch.stack([K.gaussian_kernel(5, 1.0, 2.0, 0.3), K.sinc_kernel(5, 2.0)]).float()
    out = filter2d(img, k)
    for b in range(2):
        expected = (img[b, :, 5:10, 7:12] * k[b]).sum((1, 2))  # output pixel (7, 9)
        torch.testing.assert_close(out[b, :, 7, 9], expected)
    # tiny images fall back from reflect to replicate padding instead of failing
    assert filter2d(torch.rand(1, 3, 5, 5), K.pulse_kernel(21).float()[None]).shape == (1, 3, 5, 5)


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_std_and_gray():
    img = torch.full((2, 3, 128, 128), 0.5)
    g = torch.Generator().manual_seed(3)
    out = add_gaussian_noise(img, torch.tensor([10.0, 25.0]), torch.tensor([False, True]), g)
    noise = out - img
    assert noise[0].std().item() == pytest.approx(10 / 255, rel=0.03)
    assert noise[1].std().item() == pytest.approx(25 / 255, rel=0.03)
    assert abs(noise.mean().item()) < 0.002
    torch.testing.assert_close(noise[1, 0], noise[1, 2])  # grey: same noise in every channel
    corr = torch.corrcoef(torch.stack([noise[0, 0].flatten(), noise[0, 1].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.03  # colour: independent channels


def test_count_levels_rounds_up_to_power_of_two():
    img = torch.zeros(3, 1, 4, 4)
    img[0, 0, 0, :3] = torch.tensor([0.1, 0.2, 0.3])  # 4 levels
    img[1, 0, 0, :2] = torch.tensor([0.5, 0.6])  # 3 levels -> 4
    img[2] = torch.arange(16).view(1, 4, 4) / 255  # 16 levels
    assert _count_levels(img).tolist() == [4.0, 4.0, 16.0]


def test_poisson_noise_variance_proportional_to_intensity_and_scale():
    img = torch.empty(2, 3, 160, 160)
    img[:, :, :, :80] = 0.2
    img[:, :, :, 80:] = 0.6
    # a 2-row strip holding all 256 levels, so that v = 256 (rows 2+ are measured)
    img[:, :, 0:2, :128] = (torch.arange(256).view(2, 128) / 255).expand(2, 3, 2, 128)
    g = torch.Generator().manual_seed(4)
    scale = torch.tensor([1.0, 2.0])
    out = add_poisson_noise(img, scale, torch.tensor([False, False]), g)
    noise = (out - img)[:, :, 2:]
    for b, s in enumerate(scale.tolist()):
        for lo, hi, x in ((0, 80, 0.2), (80, 160, 0.6)):
            var = noise[b, :, :, lo:hi].var().item()
            assert var == pytest.approx(x * s * s / 256, rel=0.06), (b, x)
        assert abs(noise[b].mean().item()) < 0.002


def test_poisson_gray_noise_is_shared_by_channels():
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = add_poisson_noise(img, torch.tensor([0.3]), torch.tensor([True]), torch.Generator().manual_seed(6))
    d = out - img
    inner = (img > 0.1).all(1) & (img < 0.9).all(1)  # away from clipping (noise std <= 0.02)
    torch.testing.assert_close(d[0, 0][inner[0]], d[0, 1][inner[0]])
    assert d[0, 0][inner[0]].abs().max() > 0.01


# ----------------------------------------------------------------------------- JPEG


def test_quality_to_tables_libjpeg_scaling():
    luma, chroma = quality_to_tables(torch.tensor([50.0, 75.0, 30.0, 10.0, 100.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 0, 0] == 17 and luma[0, 7, 7] == 99  # q50: base tables
    assert luma[1, 0, 0] == 8  # q75: s = 50 -> floor((16*50 + 50)/100)
    assert luma[2, 0, 0] == 27  # q30: s = 5000 // 30 = 166 -> floor((16*166 + 50)/100)
    assert luma[3, 6, 5] == 255  # q10: s = 500 -> 121*5 = 605 clamped to 255 (baseline)
    assert (luma[4] == 1).all() and (chroma[4] == 1).all()  # q100: all ones


@pytest.mark.parametrize("quality", [30, 60, 95])
def test_jpeg_grey_matches_libjpeg(quality):
    # A grey image has constant chroma, so only the luma path (DCT + quantisation) matters; it
    # must reproduce Pillow/libjpeg up to its integer-DCT rounding.
    grey = np.asarray(Image.fromarray(_photo(size=192)).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "JPEG", quality=quality)
    ref = np.asarray(Image.open(buf)).astype(np.float64)
    x = torch.from_numpy(np.stack([grey] * 3)).float()[None] / 255
    ours = jpeg_compress(x, quality, round_output=True)[0].numpy() * 255
    np.testing.assert_allclose(ours[0], ours[2], atol=1e-3)
    assert np.abs(ours[0] - ref).mean() < 0.5
    assert abs(_psnr(ours[0], grey) - _psnr(ref, grey)) < 0.05


def test_jpeg_rgb_close_to_libjpeg_and_quality_ordering():
    rgb = _photo(size=192)
    x = _to01(rgb)
    psnrs = {}
    for q in (30, 95):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=q)  # Pillow default: 4:2:0
        ref = np.asarray(Image.open(buf))
        ours = (jpeg_compress(x, q, round_output=True)[0].permute(1, 2, 0).numpy() * 255).round()
        assert _psnr(ours, ref) > 40  # near-identical decode
        assert abs(_psnr(ours, rgb) - _psnr(ref, rgb)) < 0.5
        psnrs[q] = _psnr(ours, rgb)
    assert 28 < psnrs[30] < psnrs[95] < 50  # both change the image, 95 less than 30


def test_jpeg_batch_per_sample_quality_and_padding():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 37, 45, generator=g)  # not a multiple of 16: padded and cropped back
    both = jpeg_compress(x, torch.tensor([30.0, 90.0]))
    assert both.shape == x.shape and both.min() >= 0 and both.max() <= 1
    torch.testing.assert_close(both[:1], jpeg_compress(x[:1], 30.0))
    torch.testing.assert_close(both[1:], jpeg_compress(x[1:], 90.0))
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(x, torch.tensor([10.0, 20.0, 30.0]))


def test_jpeg_differentiable_passes_gradients():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8), requires_grad=True)
    jpeg_compress(x, 50.0, differentiable=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def hq_crop() -> torch.Tensor:
    return _to01(_photo("drealsr/test_HR/Canon_40_x1.png", size=128))


def test_degrade_shape_range_rounding(hq_crop):
    lq = degrade(hq_crop.expand(2, -1, -1, -1), torch.Generator().manual_seed(0))
    assert lq.shape == (2, 3, 32, 32) and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)  # multiples of 1/255


def test_degrade_is_seeded(hq_crop):
    a = degrade(hq_crop, torch.Generator().manual_seed(11))
    b = degrade(hq_crop, torch.Generator().manual_seed(11))
    c = degrade(hq_crop, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05


def test_degrade_actually_degrades(hq_crop):
    # Averaged over seeds, the LQ is far from the clean area-downsampled HQ but keeps its content.
    clean = torch.nn.functional.interpolate(hq_crop, scale_factor=0.25, mode="area")
    errs = []
    for seed in range(6):
        lq = degrade(hq_crop, torch.Generator().manual_seed(seed))
        errs.append((lq - clean).abs().mean().item())
        assert torch.corrcoef(torch.stack([lq.flatten(), clean.flatten()]))[0, 1] > 0.5
    assert 0.02 < float(np.mean(errs)) < 0.2


def test_degrade_with_given_pulse_kernels_and_no_noise_is_near_clean(hq_crop):
    # With identity kernels, no resize, no noise and JPEG 100 on a grey image (no chroma
    # subsampling loss) the pipeline reduces to a plain ×4 area resize: checks the plumbing.
    cfg = DegradationConfig(
        resize_probs=(0.0, 0.0, 1.0), resize_probs2=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0,
        gaussian_noise_prob2=1.0, noise_range=(0.0, 0.0), noise_range2=(0.0, 0.0), jpeg_range=(100, 100),
        jpeg_range2=(100, 100), resize_modes=("area",),
    )  # fmt: skip
    pulse = K.pulse_kernel(21).float()[None]
    kernels = {"kernel1": pulse, "kernel2": pulse, "sinc_kernel": pulse}
    grey = hq_crop.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    lq = degrade(grey, torch.Generator().manual_seed(0), cfg, kernels)
    clean = torch.nn.functional.interpolate(grey, scale_factor=0.25, mode="area")
    assert (lq - clean).abs().max().item() < 1.5 / 255


def test_degrade_rejects_bad_input(hq_crop):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        degrade(hq_crop[0], torch.Generator())
    with pytest.raises(ValueError, match="kernels mapping lacks"):
        degrade(hq_crop, torch.Generator(), kernels={"kernel1": torch.ones(1, 21, 21)})


def test_random_resize_back_modes():
    lq = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2) / 8
    g = torch.Generator().manual_seed(0)
    out, modes = random_resize_back(lq, (8, 8), g, ("nearest",))
    assert modes == ["nearest", "nearest"]
    torch.testing.assert_close(out, lq.repeat_interleave(4, 2).repeat_interleave(4, 3))
    seen = set()
    for _ in range(20):
        seen.update(random_resize_back(lq, (8, 8), g)[1])
    assert seen == {"nearest", "bilinear", "bicubic"}


def test_config_defaults_yaml_round_trip_and_validation():
    cfg = DegradationConfig()
    assert cfg.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert cfg.resize_probs2 == (0.3, 0.4, 0.3) and cfg.noise_range2 == (1.0, 25.0)
    assert cfg.final_sinc_prob == 0.8 and cfg.second_blur_prob == 0.8 and cfg.scale == 4
    d = cfg.to_dict()
    assert d["jpeg_range"] == [30.0, 95.0]
    assert DegradationConfig.from_dict(d) == cfg
    assert DegradationConfig.from_dict({"noise_range": [2, 5]}).noise_range == (2, 5)
    with pytest.raises(ValueError, match="unknown degradation config keys"):
        DegradationConfig.from_dict({"noise_rnge": [1, 2]})
    with pytest.raises(ValueError, match="kernel_probs"):
        DegradationConfig(kernel_probs=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(ValueError, match="jpeg_range"):
        DegradationConfig(jpeg_range=(0, 95))


def test_batch_degrader_ranges_kernels_and_resume(hq_crop):
    hq = (hq_crop * 2 - 1).expand(3, -1, -1, -1)
    kernels = sample_kernels(torch.Generator().manual_seed(0), None, 3)
    d = BatchDegrader(seed=5)
    out = d(hq, kernels={**kernels, "path": ["a", "b", "c"]})
    assert out["lq"].shape == hq.shape and out["lq_small"].shape == (3, 3, 32, 32)
    assert out["lq"].min() >= -1 and out["lq"].max() <= 1 and len(out["resize_modes"]) == 3
    state = d.state_dict()
    nxt = d(hq)
    d2 = BatchDegrader(seed=999)
    d2.load_state_dict(state)
    again = d2(hq)
    assert torch.equal(nxt["lq"], again["lq"]) and nxt["resize_modes"] == again["resize_modes"]

"""Tests for codsr.training.losses: 1·MSE + 2·LPIPS-VGG (docs/method.md#stage-1) and the offline VGG16 loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from codsr.training.losses import (
    VGG16_FILENAME,
    VGG16_HASH_PREFIX,
    VGG16_URL,
    LPIPSLoss,
    ReconstructionLoss,
    resolve_vgg16_weights,
)
from codsr.weights import WeightNotFoundError

# LPIPS v0.1 input scaling (lpips.ScalingLayer) and torchvision VGG16 ``features`` split points.
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def hand_lpips(stages: list[nn.Module], lin_weights: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor):
    """LPIPS per sample, written out from the paper: Σ_l mean_hw ‖w_l ⊙ (f̂_l(a) − f̂_l(b))‖²."""
    fa, fb = (a - SHIFT) / SCALE, (b - SHIFT) / SCALE
    total = torch.zeros(a.shape[0])
    for stage, w in zip(stages, lin_weights, strict=True):
        fa, fb = stage(fa), stage(fb)
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((na - nb) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def lin_weights(loss: LPIPSLoss) -> list[torch.Tensor]:
    return [lin.model[1].weight.detach().flatten() for lin in loss.net.lins]


def lpips_stages(loss: LPIPSLoss) -> list[nn.Module]:
    trunk = loss.net.net
    return [trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5]


@pytest.fixture(scope="module")
def random_lpips() -> LPIPSLoss:
    torch.manual_seed(0)
    return LPIPSLoss(pretrained_backbone=False)


@pytest.fixture()
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    pred = (target + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    return pred, target


def test_reconstruction_loss_is_weighted_mse_plus_lpips(random_lpips, images):
    pred, target = images
    mse = ((pred - target) ** 2).sum() / pred.numel()
    with torch.no_grad():
        lp = hand_lpips(lpips_stages(random_lpips), lin_weights(random_lpips), pred, target)
    assert lp.shape == (2,) and (lp > 0).all()

    out = ReconstructionLoss(lpips_loss=random_lpips)(pred, target)
    assert set(out) == {"loss", "mse", "lpips"}
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["lpips"], lp.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], 1.0 * mse + 2.0 * lp.mean(), rtol=1e-5, atol=1e-6)

    custom = ReconstructionLoss(mse_weight=0.5, lpips_weight=3.0, lpips_loss=random_lpips)(pred, target)
    torch.testing.assert_close(custom["loss"], 0.5 * mse + 3.0 * lp.mean(), rtol=1e-5, atol=1e-6)

    per_sample = random_lpips(pred, target, reduction="none")
    torch.testing.assert_close(per_sample, lp, rtol=1e-5, atol=1e-6)
    assert random_lpips(target, target).item() == 0.0


def test_mse_only_needs_no_lpips(images):
    pred, target = images
    out = ReconstructionLoss(mse_weight=2.0, lpips_weight=0.0)(pred, target)
    torch.testing.assert_close(out["loss"], 2.0 * ((pred - target) ** 2).mean())
    assert out["lpips"].item() == 0.0


def test_lpips_is_frozen_in_eval_and_passes_gradients(random_lpips, images):
    pred, target = images
    random_lpips.train()  # a parent module switching to train must not enable LPIPS dropout
    assert not any(m.training for m in random_lpips.net.modules())
    assert all(not p.requires_grad for p in random_lpips.parameters())

    pred = pred.clone().requires_grad_(True)
    first = random_lpips(pred, target)
    first.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0 and torch.isfinite(pred.grad).all()
    assert all(p.grad is None for p in random_lpips.parameters())
    assert random_lpips(pred, target).item() == first.item()  # no dropout randomness


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lpips_runs_in_fp32_under_autocast(random_lpips, images, dtype):
    pred, target = images
    ref = ReconstructionLoss(lpips_loss=random_lpips)(pred, target)
    with torch.autocast("cpu", dtype=dtype):
        out = ReconstructionLoss(lpips_loss=random_lpips)(pred, target)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"])


def test_lpips_rejects_mismatched_inputs(random_lpips):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        random_lpips(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 16))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch and codsr caches under tmp_path; no network (downloads are stubbed by the tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME again
    monkeypatch.setenv("CODSR_HOME", str(tmp_path / "codsr"))
    monkeypatch.delenv("CODSR_LPIPS_VGG", raising=False)
    return tmp_path


def vgg16_state(seed: int = 7) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    features = make_layers(cfgs["D"])  # exactly torchvision's vgg16().features
    return features, {f"features.{k}": v for k, v in features.state_dict().items()}


def test_missing_vgg_weights_raise_clear_error(empty_caches, monkeypatch):
    tmp_path = empty_caches
    with pytest.raises(FileNotFoundError) as err:
        LPIPSLoss(vgg_weights=tmp_path / "nope.pth")
    assert VGG16_FILENAME in str(err.value) and VGG16_URL in str(err.value)

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightNotFoundError) as err:
        ReconstructionLoss()  # default: pretrained backbone, found or downloaded
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert msg.startswith(f"{VGG16_FILENAME} (")
    for place in (
        tmp_path / "codsr" / VGG16_FILENAME,
        tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILENAME,
    ):
        assert str(place) in msg
    assert f"download from {VGG16_URL} failed: OSError" in msg and "curl -L -o" in msg


def test_vgg_weights_download_on_first_use_into_the_torch_cache(empty_caches, monkeypatch):
    calls = []
    _, state = vgg16_state()

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, progress))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    dest = empty_caches / "torch" / "hub" / "checkpoints" / VGG16_FILENAME
    assert resolve_vgg16_weights() == dest
    assert calls == [(VGG16_URL, str(dest), VGG16_HASH_PREFIX, True)]  # torchvision's checked download
    assert resolve_vgg16_weights() == dest and len(calls) == 1  # cached: no second download
    with pytest.raises(WeightNotFoundError):  # download=False never fetches
        dest.unlink()
        resolve_vgg16_weights(download=False)


def test_vgg_weights_found_in_the_codsr_cache_and_env(empty_caches, monkeypatch):
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download expected")
    )
    features, state = vgg16_state(3)
    in_home = empty_caches / "codsr" / VGG16_FILENAME
    in_home.parent.mkdir(parents=True)
    torch.save(state, in_home)
    assert resolve_vgg16_weights() == in_home
    loss = LPIPSLoss()
    torch.testing.assert_close(getattr(loss.net.net.slice5, "28").weight, features[28].weight)
    elsewhere = empty_caches / "mine.pth"
    torch.save(state, elsewhere)
    monkeypatch.setenv("CODSR_LPIPS_VGG", str(elsewhere))
    assert resolve_vgg16_weights() == elsewhere


def test_vgg16_weights_load_from_path_and_torch_home(tmp_path, monkeypatch, images):
    torch.manual_seed(7)
    features = make_layers(cfgs["D"])  # exactly torchvision's vgg16().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "hub" / "checkpoints" / VGG16_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    loss = LPIPSLoss(vgg_weights=path)
    assert loss.pretrained_backbone
    for idx in (0, 2, 5, 28):
        slice_no = next(i for i, (lo, hi) in enumerate(VGG_SLICES, 1) if lo <= idx < hi)
        torch.testing.assert_close(
            getattr(getattr(loss.net.net, f"slice{slice_no}"), str(idx)).weight, features[idx].weight
        )
    # End to end: the loaded LPIPS equals the formula evaluated on torchvision's own layers.
    pred, target = images
    stages = [features[lo:hi] for lo, hi in VGG_SLICES]
    with torch.no_grad():
        expected = hand_lpips(stages, lin_weights(loss), pred, target)
        torch.testing.assert_close(loss(pred, target, reduction="none"), expected, rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert resolve_vgg16_weights() == path
    from_cache = LPIPSLoss()
    torch.testing.assert_close(getattr(from_cache.net.net.slice5, "28").weight, features[28].weight)

    del state["features.28.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match="broken.pth"):
        LPIPSLoss(vgg_weights=broken)

"""How training resizes the LQ back to the crop (docs/training.md#lq-resize) and the release's text dropout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.data.datasets import LQ_RESIZES, HQImageDataset, SyntheticLQ, pil_resize, resize_lq_back
from codsr.pipeline.image_processing import resize_image
from codsr.training.config import DataConfig, PromptConfig, load_config


def _lq(seed: int = 0, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, size, size), generator=g).float() / 255


def test_default_follows_the_release():
    assert LQ_RESIZES == ("release", "inference", "torch")
    assert DataConfig().lq_resize == "release"
    for name in ("stage1", "stage2", "tiny/stage1", "tiny/stage2"):
        assert load_config(name).data.lq_resize == "release", name


def test_release_nearest_repeats_each_pixel():
    # PIL nearest ×4 of an 8-bit image: each LQ pixel becomes a 4×4 block (hand-computed).
    lq = torch.tensor([[[0.0, 1.0], [100 / 255, 200 / 255]]]).expand(3, 2, 2)[None]
    out = pil_resize(lq, (8, 8), "nearest", quantize=True)
    expected = (
        torch.tensor([[0.0, 1.0], [100 / 255, 200 / 255]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    )
    torch.testing.assert_close(out[0, 1], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_release_is_pil_on_the_8bit_image(mode):
    lq = _lq()
    out = pil_resize(lq, (24, 24), mode, quantize=True)
    filt = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    for i in range(2):
        u8 = (lq[i] * 255).round().byte().permute(1, 2, 0).numpy()
        ref = np.asarray(Image.fromarray(u8).resize((24, 24), filt), dtype=np.float32) / 255
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), ref)
    # 8-bit output
    levels = out * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_inference_choice_is_the_inference_upsampler():
    lq = _lq(1)
    out, modes = resize_lq_back(lq, (24, 24), torch.Generator().manual_seed(0), "inference")
    assert modes == ["bicubic", "bicubic"]
    torch.testing.assert_close(out, resize_image(lq, (24, 24)), rtol=0, atol=0)


def test_release_and_torch_draw_the_same_filters_but_resize_differently():
    lq = _lq(2)
    a, ma = resize_lq_back(lq, (24, 24), torch.Generator().manual_seed(5), "release", ("bilinear", "bicubic"))
    b, mb = resize_lq_back(lq, (24, 24), torch.Generator().manual_seed(5), "torch", ("bilinear", "bicubic"))
    assert ma == mb
    # PIL's bicubic is a = -0.5, torch's a = -0.75, and PIL rounds to 8 bits: not the same pixels.
    bic, _ = resize_lq_back(lq, (24, 24), torch.Generator(), "release", ("bicubic",))
    tbic, _ = resize_lq_back(lq, (24, 24), torch.Generator(), "torch", ("bicubic",))
    assert (bic - tbic).abs().max() > 5 / 255
    assert a.shape == b.shape == (2, 3, 24, 24)


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match="lq_resize must be one of release, inference, torch, got 'pil'"):
        resize_lq_back(_lq(), (24, 24), torch.Generator(), "pil")
    with pytest.raises(ValueError, match="lq_resize"):
        HQImageDataset([], lq_resize="cv2")


def test_dataset_release_lq_is_8bit(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    item = HQImageDataset(tmp_path, crop_size=32, seed=3)[0]
    levels = (item["lq"] + 1) / 2 * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=2e-3)
    inf = HQImageDataset(tmp_path, crop_size=32, seed=3, lq_resize="inference")[0]
    assert inf["resize_mode"] == "bicubic"
    torch.testing.assert_close(inf["hq"], item["hq"], rtol=0, atol=0)  # same crop, only the resize differs


def test_synthetic_lq_is_picklable_and_seeded():
    fn = pickle.loads(pickle.dumps(SyntheticLQ(lq_resize="inference")))
    hq = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = fn(hq, torch.Generator().manual_seed(1))
    b = fn(hq, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_text_dropout_is_the_releases():
    # Release: stage-1 loader sets t_drop_rate=0.2 but never applies it (0 in effect); stage 2 applies 0.2
    # to the caption, its nouns and masks together.
    assert PromptConfig().null_text_prob == 0.0
    assert load_config("stage1").prompts.null_text_prob == 0.0
    assert load_config("stage2").prompts.null_text_prob == 0.2

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.pipeline.image_processing import release_input_size, resize_image, to_tensor01


def test_release_resize_chain():
    # large enough: ×4 bicubic then floor to multiples of 8 with Lanczos
    assert release_input_size(130, 131, 4) == [((520, 524), Image.BICUBIC), ((520, 520), Image.LANCZOS)]
    # small: first up to short side 128 (= 512 // 4)
    steps = release_input_size(40, 24, 4)
    assert steps[0] == ((213, 128), Image.BICUBIC)
    assert steps[1] == ((852, 512), Image.BICUBIC)
    assert steps[2] == ((848, 512), Image.LANCZOS)


def test_to_tensor01_types():
    u8 = np.array([[[255, 0, 51]]], dtype=np.uint8)
    torch.testing.assert_close(to_tensor01(u8)[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    u16 = np.array([[1000]], dtype=np.uint16)
    assert to_tensor01(u16).shape == (1, 3, 1, 1)
    assert to_tensor01(u16)[0, 0, 0, 0].item() == pytest.approx(1000 / 65535)
    pil = Image.new("L", (4, 2), 128)
    assert to_tensor01(pil).shape == (1, 3, 2, 4)
    rgba = torch.rand(4, 5, 6)
    torch.testing.assert_close(to_tensor01(rgba)[0], rgba[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_tensor01(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        to_tensor01(np.full((4, 4, 3), np.nan, dtype=np.float32))
    with pytest.raises(TypeError):
        to_tensor01("image.png")


def test_float_resize_keeps_precision():
    x = torch.full((1, 3, 8, 8), 1000 / 65535)
    out = resize_image(x, (16, 16))
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 1000 / 65535), atol=1e-7, rtol=0)

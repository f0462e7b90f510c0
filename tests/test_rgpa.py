import torch

from codsr.model.rgpa import RGPAParams, patch_weight, rgpa_weight_map, sobel_magnitude


def test_patch_weight_piecewise_values():
    p = torch.tensor([0.0, 0.15, 0.2, 0.24, 0.25, 0.3, 5.0])
    expected = torch.tensor([0.3, 0.3, 0.65, 0.93, 1.0, 1.0, 1.0])
    torch.testing.assert_close(patch_weight(p), expected, atol=1e-6, rtol=0)


def test_sobel_on_vertical_step_edge():
    # Left half black (-1), right half white (+1): gray 0 | 1. The two columns beside the edge
    # see a difference of 1 across kx's (1, 2, 1) column weights -> |gx| = 4; gy = 0 everywhere.
    x = -torch.ones(1, 3, 8, 8)
    x[..., 4:] = 1.0
    mag = sobel_magnitude(x)[0, 0]
    expected = torch.zeros(8, 8)
    expected[:, 3:5] = 4.0
    torch.testing.assert_close(mag, expected)


def test_weight_map_patches_and_latent_cells():
    # 32×48 image: 2×3 patches of 16 px; 4×6 latent cells, each patch covering 2×2 cells.
    x = -torch.ones(1, 3, 32, 48)
    x[:, :, :16, 16:32] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w = rgpa_weight_map(x)
    assert w.shape == (1, 1, 4, 6)
    assert torch.all(w[0, 0, :, :2] == 0.3)  # flat patches get the floor
    assert torch.all(w[0, 0, :2, 2:4] == 1.0)  # noisy patch gets full noise
    assert torch.all(w[0, 0, :2, 2:4] == w[0, 0, 0, 2])


def test_weight_map_pads_partial_patches_by_replication():
    # 24×40 px: the last patch row/column is half outside and replicate-padded.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    w = rgpa_weight_map(x)
    assert w.shape == (2, 1, 3, 5)
    grad = sobel_magnitude(x)
    padded = torch.nn.functional.pad(grad, (0, 8, 0, 8), mode="replicate")
    means = torch.nn.functional.avg_pool2d(padded, 16)
    torch.testing.assert_close(w[:, :, 2, 4], patch_weight(means[:, :, 1, 2]))


def test_weight_map_matches_release_fixture(parity_case):
    for name in ("untiled", "tiled"):
        case = parity_case(name)
        torch.testing.assert_close(rgpa_weight_map(case["lq"]), case["sobel_weight"], atol=0, rtol=0)


def test_custom_params_change_the_floor():
    x = -torch.ones(1, 3, 16, 16)
    assert torch.all(rgpa_weight_map(x, RGPAParams(floor=0.5)) == 0.5)

import math

import pytest
import torch

from codsr.pipeline.latent_tiling import gaussian_tile_weights, tile_grid, tile_starts, tiled_noise_prediction


def test_tile_grid_matches_release_fixture(parity_case):
    case = parity_case("tiled")
    t, offsets = tile_grid(32, 48, 16, 4)
    assert t == 16
    assert offsets == [tuple(o) for o in case["tile_offsets_yx"].tolist()]


def test_tile_starts_edge_cases():
    assert tile_starts(10, 10, 3) == [0]
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 10)


def test_release_weights_match_fixture_and_formula(parity_case):
    w = gaussian_tile_weights(16, release_compat=True)
    torch.testing.assert_close(w, parity_case("tiled")["tile_weights"], atol=0, rtol=0)
    # closed form at one point: y centre T/2, x centre (T-1)/2, var 0.01
    gy = math.exp(-((3 - 8) ** 2) / 256 / 0.02) / math.sqrt(0.02 * math.pi)
    gx = math.exp(-((5 - 7.5) ** 2) / 256 / 0.02) / math.sqrt(0.02 * math.pi)
    assert w[3, 5].item() == pytest.approx(gy * gx, rel=1e-6)


def test_default_weights_are_symmetric():
    w = gaussian_tile_weights(16)
    torch.testing.assert_close(w, w.flip(0))
    torch.testing.assert_close(w, w.flip(1))
    torch.testing.assert_close(w, w.t())


def _identity_predictor(full):
    return lambda ys, xs: full[..., ys, xs]


def test_exact_normalisation_reproduces_a_consistent_prediction():
    # If every tile predicts the same underlying field, blending must give that field back exactly.
    full = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0))
    out = tiled_noise_prediction(_identity_predictor(full), full.shape, 16, 4)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)


def test_release_clamp_damps_corners_like_the_fixture(parity_case):
    case = parity_case("tiled")
    full = torch.ones(1, 4, 32, 48)
    out = tiled_noise_prediction(_identity_predictor(full), full.shape, 16, 4, release_compat=True)
    damped = out < 0.999
    assert int(damped[0, 0].sum()) == 24  # fixture: 24 border latents have contributors < 1e-6
    assert torch.equal(damped, case["contributors"] < 1e-6)
    assert out.min() < 1e-2  # damped by orders of magnitude at the worst corner


def test_release_blending_of_fixture_tiles(parity_case):
    case = parity_case("tiled")
    outs = iter(case["tile_outs"])
    pred = tiled_noise_prediction(lambda ys, xs: next(outs)[None], (1, 4, 32, 48), 16, 4, release_compat=True)
    torch.testing.assert_close(pred, case["model_pred"], atol=1e-6, rtol=0)


def test_untiled_when_small():
    calls = []

    def predict(ys, xs):
        calls.append((ys, xs))
        return torch.zeros(1, 4, 10, 12)

    tiled_noise_prediction(predict, (1, 4, 10, 12), 16, 4)
    assert calls == [(slice(0, 10), slice(0, 12))]


def test_tile_cores_partition_the_axis():
    from codsr.pipeline.latent_tiling import tile_cores

    starts = tile_starts(100, 40, 10)
    cores = tile_cores(100, 40, starts)
    covered = [p for s, (a, b) in zip(starts, cores, strict=True) for p in range(s + a, s + b)]
    assert covered == list(range(100))
    assert all(0 <= a <= b <= 40 for a, b in cores)


def test_pooled_group_norm_equals_full_image_group_norm():
    from codsr.pipeline.latent_tiling import core_weights, pooled_group_norm

    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 20, 28, generator=torch.Generator().manual_seed(0)) * 3 + 1
    offsets, cores = core_weights(20, 28, 12, 4)
    tiles = torch.cat([x[..., y : y + 12, x0 : x0 + 12] for y, x0 in offsets])
    with torch.no_grad():
        full = norm(x)
        with pooled_group_norm(norm, cores, batch=2):
            pooled = norm(tiles)
        plain = norm(tiles)
    assert "forward" not in vars(norm)  # the override is removed
    for i, (y, x0) in enumerate(offsets):
        torch.testing.assert_close(pooled[2 * i : 2 * i + 2], full[..., y : y + 12, x0 : x0 + 12], atol=1e-5, rtol=1e-5)
    assert (plain[:2] - full[..., :12, :12]).abs().max() > 1e-2  # per-tile statistics differ

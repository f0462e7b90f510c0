import math

import pytest
import torch

from codsr.pipeline.latent_tiling import gaussian_tile_weights, tile_grid, tile_starts, tiled_noise_prediction


def test_tile_grid_matches_release_fixture(parity_case):
    case = parity_case("tiled")
    t, offsets = tile_grid(32, 48, 16, 4)
    assert t == 16
    assert offsets == [tuple(o) for o in case["tile_offsets_yx"].tolist()]


def test_even_tile_grid_spreads_the_release_count_of_tiles():
    from codsr.pipeline.latent_tiling import even_tile_grid

    # the release: 150-px tiles at 0, 100, 106 (the last overlaps its neighbour by 144 px)
    assert tile_grid(256, 256, 150, 50)[1][:3] == [(0, 0), (0, 100), (0, 106)]
    # here: as many tiles, of side ceil((256 + 2·50) / 3) = 119 rounded up to a multiple of 8 = 120,
    # at 0, (256 − 120) / 2 = 68, 136
    t, offsets = even_tile_grid(256, 256, 150, 50)
    assert t == 120 and offsets[:3] == [(0, 0), (0, 68), (0, 136)] and len(offsets) == 9
    # 64 px, tiles of 32, overlap 8: ceil(80 / 3) = 27 → 32 (the cap), at 0, 16, 32
    assert even_tile_grid(64, 64, 32, 8) == (32, [(y, x) for y in (0, 16, 32) for x in (0, 16, 32)])
    for h, w, tile, overlap in [(256, 256, 150, 50), (32, 48, 16, 4), (140, 400, 150, 50), (97, 61, 20, 7)]:
        t, offsets = even_tile_grid(h, w, tile, overlap)
        assert len(offsets) == len(tile_grid(h, w, tile, overlap)[1]) and t <= min(tile, h, w)
        assert t % 8 == 0 or t == min(tile, h, w)  # even sizes at every UNet level
        for axis, size in ((0, h), (1, w)):
            starts = sorted({o[axis] for o in offsets})
            assert starts[0] == 0 and starts[-1] + t == size  # covers the axis
            assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlaps ≥ overlap
    assert even_tile_grid(140, 400, 150, 50) == (140, [(0, 0), (0, 87), (0, 173), (0, 260)])


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
        torch.testing.assert_close(
            pooled[2 * i : 2 * i + 2], full[..., y : y + 12, x0 : x0 + 12], atol=1e-5, rtol=1e-5
        )
    assert (plain[:2] - full[..., :12, :12]).abs().max() > 1e-2  # per-tile statistics differ


def _tiny_unet_inputs(pipe, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.generator.unet.config.block_out_channels[0]
    z_t = torch.randn(1, 4, h, w, generator=g)
    scale = 0.1 * torch.randn(1, c, h, w, generator=g)
    shift = 0.1 * torch.randn(1, c, h, w, generator=g)
    emb = torch.randn(1, 77, pipe.generator.unet.config.cross_attention_dim, generator=g)
    return z_t, torch.tensor([499]), emb, scale, shift


@pytest.mark.parametrize("offload", [None, "disk"])
def test_sequential_pooled_unet_tiles_equal_the_batched_tiles(tiny_pipeline, offload):
    """Issue 17 item 3: UNet tiles one at a time, exact pooled GroupNorm statistics → the batched result."""
    from codsr.model.lqfm import conv_in_modulation
    from codsr.pipeline.latent_tiling import batched_noise_prediction, sequential_pooled_noise_prediction

    model = tiny_pipeline.generator
    unet = model.unet
    z_t, ts, emb, scale, shift = _tiny_unet_inputs(tiny_pipeline, 28, 36)
    tile, overlap = 16, 6  # 2×3 tiles, odd tile/8 resolutions (16 → 8 → 4 → 2): upsample sizes forwarded

    def predict_batch(windows):
        n = len(windows)
        return model.predict_noise(
            torch.cat([z_t[..., ys, xs] for ys, xs in windows]), ts.repeat(n), emb.repeat(n, 1, 1),
            torch.cat([scale[..., ys, xs] for ys, xs in windows]), torch.cat([shift[..., ys, xs] for ys, xs in windows]),
        )  # fmt: skip

    def conv_in(ys, xs):
        with conv_in_modulation(unet, scale[..., ys, xs], shift[..., ys, xs]):
            return unet.conv_in(z_t[..., ys, xs])

    with torch.no_grad():
        batched = batched_noise_prediction(predict_batch, tuple(z_t.shape), tile, overlap, unet)
        seq = sequential_pooled_noise_prediction(
            unet, conv_in, tuple(z_t.shape), ts, emb, tile, overlap, offload=offload
        )
        # per-tile statistics (the release's way) differ clearly: the pooling is what makes them equal
        per_tile = tiled_noise_prediction(
            lambda ys, xs: model.predict_noise(z_t[..., ys, xs], ts, emb, scale[..., ys, xs], shift[..., ys, xs]),
            tuple(z_t.shape), tile, overlap,
        )  # fmt: skip
    assert (seq - batched).abs().max().item() <= 1e-5
    assert (per_tile - batched).abs().max().item() > 1e-3
    # no GroupNorm is left patched
    assert not any("forward" in vars(m) for m in unet.modules())


def test_sequential_pooled_untiled_equals_the_plain_unet(tiny_pipeline):
    from codsr.model.lqfm import conv_in_modulation
    from codsr.pipeline.latent_tiling import sequential_pooled_noise_prediction

    model = tiny_pipeline.generator
    z_t, ts, emb, scale, shift = _tiny_unet_inputs(tiny_pipeline, 16, 16, seed=1)

    def conv_in(ys, xs):
        with conv_in_modulation(model.unet, scale[..., ys, xs], shift[..., ys, xs]):
            return model.unet.conv_in(z_t[..., ys, xs])

    with torch.no_grad():
        ref = model.predict_noise(z_t, ts, emb, scale, shift)
        out = sequential_pooled_noise_prediction(model.unet, conv_in, tuple(z_t.shape), ts, emb, 16, 4)
    assert (out - ref).abs().max().item() <= 1e-5


def test_restore_with_sequential_unet_tiles_equals_batched(tiny_pipeline):
    """The plan's ``sequential_unet`` (what the planner falls back to under a budget) gives the batched result."""
    from dataclasses import replace

    from codsr.pipeline.tiling import TilePlan

    lq = torch.rand(1, 3, 224, 288, generator=torch.Generator().manual_seed(5)) * 2 - 1
    batched = TilePlan(latent_tile=16, latent_overlap=6, vae_encoder_tile=None, vae_decoder_tile=None)
    outs = {}
    for name, plan in (("batched", batched), ("seq", replace(batched, sequential_unet=True)),
                       ("seq_disk", replace(batched, sequential_unet=True, offload="disk"))):  # fmt: skip
        with torch.no_grad():
            outs[name] = tiny_pipeline.restore(
                lq, prompt="x", generator=torch.Generator().manual_seed(1), tile_plan=plan
            )
    assert (outs["seq"] - outs["batched"]).abs().max().item() <= 1e-4
    assert (outs["seq_disk"] - outs["seq"]).abs().max().item() == 0.0


def test_planner_bounds_the_sequential_unet_and_offloads_its_tiles_when_needed():
    from codsr.pipeline.tiling import DEFAULT_MODEL, GB, MemoryBudgetError, plan, plan_tiles

    kw = dict(dtype=torch.bfloat16, resident=GB // 2)
    with pytest.raises(MemoryBudgetError):
        plan_tiles(4096, 4096, 8 * GB, **kw)  # the batched UNet (25 tiles of 144²) cannot fit 8 GiB
    with pytest.warns(UserWarning, match="one by one"):
        p = plan(4096, 4096, device="cpu", max_memory=8, **kw)
    assert p.sequential_unet and p.offload == "disk" and p.latent_tile == 150 and p.predicted_peak <= 8 * GB
    # kept on the device the stored tiles of a 4096² image (512² latent, 25 evenly spread windows of
    # 144²: ceil((512 + 4·50) / 5) = 143 rounded up to a multiple of 8) cost 2600 elements per
    # window px: 2600·25·144²·4 bytes
    assert DEFAULT_MODEL.unet_stored(512, 512, 150, 50, 4) == pytest.approx(2600 * 25 * 144**2 * 4)
    assert DEFAULT_MODEL.unet_stored(100, 100, 150, 50, 4) == 0.0  # untiled

"""Region control (issue 15): the control map, ``noise_scale`` and the ``fidelity_timestep`` blend.

Tiny in-process model, fp32 CPU, fixed seeds (docs/region-control.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from codsr import TilePlan
from codsr.control import control_map_for, from_edges, from_mask, from_text, save_control_map
from codsr.model.rgpa import rgpa_weight_map
from codsr.pipeline.control_map import ControlMapError, control_map_to_latent, load_control_map

UNTILED = TilePlan(latent_tile=1000, latent_overlap=0, vae_encoder_tile=None, vae_decoder_tile=None)
# 128 px → a 16×16 latent: UNet tiles of 8 latent px with 2 px overlap, VAE tiles of 64 px.
TILED = TilePlan(latent_tile=8, latent_overlap=2, vae_encoder_tile=64, vae_decoder_tile=64)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def lq():
    """A 128×128 LQ image in [-1, 1], textured everywhere (RGPA weight 1: the full noise)."""
    return torch.rand(1, 3, 128, 128, generator=_g(0)) * 2 - 1


def _half_map(h: int = 128, w: int = 128) -> torch.Tensor:
    m = torch.ones(h, w)
    m[:, : w // 2] = 0
    return m


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


class _Calls:
    """Counts forward calls of the text encoder, VAE encoder and UNet (any model work)."""

    def __init__(self, pipe):
        self.n = {"text": 0, "vae": 0, "unet": 0}
        mods = {"text": pipe.text_encoder, "vae": pipe.generator.vae.encoder, "unet": pipe.generator.unet}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in mods.items()]

    def _hook(self, key):
        def hook(*_):
            self.n[key] += 1

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture()
def calls(tiny_pipeline):
    c = _Calls(tiny_pipeline)
    yield c
    c.close()


# ---------------------------------------------------------------------------------- the core contract
@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_all_ones_map_is_bit_identical_to_no_map(tiny_pipeline, lq):
    ref = tiny_pipeline.restore(lq, prompt="a cat", generator=_g(1), tile_plan=UNTILED)
    ones = tiny_pipeline.restore(lq, prompt="a cat", generator=_g(1), tile_plan=UNTILED, control_map=torch.ones(128, 128))
    assert torch.equal(ref, ones)
    # also through the image API, with a uint8 PIL map at the input size and the blend switch on
    im = Image.fromarray(np.round((lq[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)[:40, :48])
    a = tiny_pipeline(im, upscale=2, generator=_g(2), output_type="np", tile_plan=UNTILED)
    b = tiny_pipeline(im, upscale=2, generator=_g(2), output_type="np", tile_plan=UNTILED,
                      control_map=Image.new("L", (48, 40), 255), fidelity_timestep=50)  # fmt: skip
    assert np.array_equal(a, b)


def test_all_zeros_map_equals_noise_scale_zero(tiny_pipeline, lq):
    zeros = tiny_pipeline.restore(lq, generator=_g(1), tile_plan=UNTILED, control_map=np.zeros((128, 128)))
    no_noise = tiny_pipeline.restore(lq, generator=_g(1), tile_plan=UNTILED, noise_scale=0.0)
    default = tiny_pipeline.restore(lq, generator=_g(1), tile_plan=UNTILED)
    torch.testing.assert_close(zeros, no_noise, rtol=0, atol=1e-6)
    assert _mse(zeros, default) > 1e-3  # the noise matters on this model, so the test can fail


def test_noise_scale_and_map_multiply_the_rgpa_weight(tiny_pipeline, lq):
    gen = tiny_pipeline.generator
    emb = tiny_pipeline.encode_prompt([""])
    m = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    out = gen(lq, emb, 100, generator=_g(3), control_map=m, noise_scale=0.5)
    w = rgpa_weight_map(lq, gen.rgpa, (16, 16))
    torch.testing.assert_close(out.weight, w * 0.5 * m, rtol=0, atol=0)
    # ε_a = weight · ε with ε the 2nd draw of the generator (docs/method.md#generator-forward)
    g = _g(3)
    torch.randn((1, 4, 16, 16), generator=g)
    eps = torch.randn((1, 4, 16, 16), generator=g)
    torch.testing.assert_close(out.eps_a, eps * (w * 0.5 * m), rtol=0, atol=0)


@pytest.mark.parametrize("tile_plan", [UNTILED, TILED], ids=["untiled", "tiled"])
def test_half_map_zero_half_faithful_one_half_default(tiny_pipeline, lq, tile_plan):
    half = tiny_pipeline.restore(lq, generator=_g(5), tile_plan=tile_plan, control_map=_half_map())
    no_noise = tiny_pipeline.restore(lq, generator=_g(5), tile_plan=tile_plan, noise_scale=0.0)
    default = tiny_pipeline.restore(lq, generator=_g(5), tile_plan=tile_plan)
    left, right = (..., slice(0, 64)), (..., slice(64, 128))
    assert _mse(half[left], no_noise[left]) < _mse(half[left], default[left])
    assert _mse(half[right], default[right]) < _mse(half[right], no_noise[right])


def test_tiled_unet_sees_slices_of_the_mapped_latent(tiny_pipeline, lq):
    """The map is applied on the full latent grid before the UNet tiles are cut, so every tile the
    UNet gets is exactly a window of the untiled run's mapped z_t (the map follows the tiles)."""
    seen = []
    handle = tiny_pipeline.generator.unet.conv_in.register_forward_pre_hook(
        lambda _m, args: seen.extend(args[0].detach().clone().unbind(0))
    )
    try:
        m = torch.rand(128, 128, generator=_g(4))
        tiny_pipeline.restore(lq, generator=_g(6), tile_plan=UNTILED, control_map=m)
        (full,) = seen
        seen.clear()
        unet_tiles = TilePlan(latent_tile=8, latent_overlap=2, vae_encoder_tile=None, vae_decoder_tile=None)
        tiny_pipeline.restore(lq, generator=_g(6), tile_plan=unet_tiles, control_map=m)
    finally:
        handle.remove()
    # 3×3 tiles of at most 8 latent px on 16, evenly spread: side ceil((16 + 2·2) / 3) = 7, rounded up
    # to a multiple of 8 = 8, at 0, 4, 8
    assert len(seen) == 9
    for (y, x), tile in zip([(y, x) for y in (0, 4, 8) for x in (0, 4, 8)], seen, strict=True):
        assert torch.equal(tile, full[..., y : y + 8, x : x + 8]), "a UNet tile is not its window of the mapped latent"


def test_tiled_map_has_no_seam_at_tile_borders(tiny_pipeline):
    """Pixel check: with a map, |tiled − untiled| at the UNet / VAE tile borders is no larger than
    elsewhere (per column and per row, against the mean; the library's own seam criterion)."""
    x = torch.rand(1, 3, 256, 256, generator=_g(0)) * 2 - 1
    tiles = TilePlan(latent_tile=16, latent_overlap=4, vae_encoder_tile=128, vae_decoder_tile=128)
    m = _half_map(256, 256)
    m[:64] = 0.5  # map borders across the tile grid in both directions
    tiled = tiny_pipeline.restore(x, generator=_g(6), tile_plan=tiles, control_map=m)
    untiled = tiny_pipeline.restore(x, generator=_g(6), tile_plan=UNTILED, control_map=m)
    diff = (tiled - untiled).abs()
    borders = [8 * s for s in (12, 16, 28)] + [127, 128]  # UNet tile starts / ends (latent), VAE tile border
    for per_line in (diff.mean(dim=(0, 1, 2)), diff.mean(dim=(0, 1, 3))):  # columns, rows
        assert float(per_line[borders].max()) < 3 * float(per_line.mean()) + 1e-3


# ---------------------------------------------------------------------------------- the blend switch
def test_fidelity_timestep_blend(tiny_pipeline, lq, calls):
    kw = {"tile_plan": UNTILED}
    # all zeros: exactly the one-step result at t_f without noise
    zeros = tiny_pipeline.restore(lq, generator=_g(7), control_map=torch.zeros(128, 128), fidelity_timestep=50, **kw)
    low = tiny_pipeline.restore(lq, generator=_g(7), timestep=50, noise_scale=0.0, **kw)
    torch.testing.assert_close(zeros, low, rtol=0, atol=1e-6)
    # all ones: no second pass, no change
    calls.n["unet"] = 0
    ones = tiny_pipeline.restore(lq, generator=_g(7), control_map=torch.ones(128, 128), fidelity_timestep=50, **kw)
    assert calls.n["unet"] == 1
    assert torch.equal(ones, tiny_pipeline.restore(lq, generator=_g(7), **kw))
    # a half map: two UNet passes
    calls.n["unet"] = 0
    tiny_pipeline.restore(lq, generator=_g(7), control_map=_half_map(), fidelity_timestep=50, **kw)
    assert calls.n["unet"] == 2
    # on the latent grid, the zero half moves toward the low-timestep no-noise result
    gen, emb = tiny_pipeline.generator, tiny_pipeline.encode_prompt([""])
    m = torch.ones(1, 1, 16, 16)
    m[..., :8] = 0
    blend = gen(lq, emb, 100, generator=_g(7), control_map=m, fidelity_timestep=50).z_h[..., :8]
    noise_only = gen(lq, emb, 100, generator=_g(7), control_map=m).z_h[..., :8]
    target = gen(lq, emb, 50, generator=_g(7), noise_scale=0.0).z_h[..., :8]
    assert _mse(blend, target) < 0.5 * _mse(noise_only, target)


def test_fidelity_timestep_latent_blend_is_exact(tiny_pipeline, lq):
    """ẑ_H = lerp(ẑ_H(t_f), ẑ_H(t), m) per latent cell, with both one-step results of Eq. 2."""
    gen = tiny_pipeline.generator
    emb = tiny_pipeline.encode_prompt([""])
    m = torch.rand(1, 1, 16, 16, generator=_g(8))
    out = gen(lq, emb, 100, generator=_g(9), control_map=m, fidelity_timestep=40)
    hi = gen(lq, emb, 100, generator=_g(9), control_map=m)
    lo = gen(lq, emb, 40, generator=_g(9), control_map=m)
    torch.testing.assert_close(out.z_h, torch.lerp(lo.z_h, hi.z_h, m.expand_as(hi.z_h)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- loading and errors
def test_map_resized_to_latent_grid_by_area_averaging():
    m = np.zeros((32, 32), np.float32)
    m[:16, :16] = 1.0  # top-left latent cell of a 2×2 grid fully 1
    m[16:, 16:24] = 1.0  # bottom-right cell half 1
    lat = control_map_to_latent(m, (2, 2), {"input": (32, 32)})
    assert lat.shape == (1, 1, 2, 2) and lat.dtype == torch.float32
    assert lat[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.5]]
    # the output size need not be an integer multiple of the latent grid (132 px over 16 cells)
    lat = control_map_to_latent(np.ones((132, 132)), (16, 16), {"output": (132, 132)})
    assert torch.equal(lat, torch.ones(1, 1, 16, 16))
    # a map coarser than the grid by an integer factor is repeated
    lat = control_map_to_latent(torch.tensor([[0.0, 1.0]]), (2, 4), {"input": (16, 32)})
    assert lat[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_map_input_kinds_agree(tmp_path):
    arr = np.array([[0, 64], [128, 255]], np.uint8)
    expected = torch.tensor([[0, 64], [128, 255]], dtype=torch.float32) / 255
    Image.fromarray(arr).save(tmp_path / "m8.png")
    save_control_map(arr.astype(np.float32) / 255, tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")  # 16-bit
    for value in (arr, Image.fromarray(arr), tmp_path / "m8.png", str(tmp_path / "m16.png"), expected,
                  expected[None, None], np.repeat(arr[..., None], 3, -1)):  # fmt: skip
        got = load_control_map(value)
        torch.testing.assert_close(got[0, 0], expected, rtol=0, atol=1 / 65535)
    assert torch.equal(load_control_map(np.array([[True, False]]))[0, 0], torch.tensor([[1.0, 0.0]]))
    two = load_control_map([arr, arr], batch=2)
    assert two.shape == (2, 1, 2, 2)


BAD_MAPS = [
    pytest.param(np.ones((100, 100)), "fits none of the sizes", id="size"),
    pytest.param(np.ones((128, 96)), "fits none of the sizes", id="aspect"),
    pytest.param(np.full((128, 128), np.nan), "NaN", id="nan"),
    pytest.param(np.full((128, 128), 1.5), "in [0, 1]", id="above-1"),
    pytest.param(np.full((128, 128), -0.1), "in [0, 1]", id="below-0"),
    pytest.param(np.ones((128, 128, 2)), "one channel", id="two-channels"),
    pytest.param(np.dstack([np.zeros((128, 128)), np.ones((128, 128)), np.ones((128, 128))]), "colour", id="colour"),
    pytest.param([np.ones((128, 128))] * 3, "3 maps for 1 images", id="batch"),
    pytest.param("no/such/map.png", "no such file", id="missing-file"),
    pytest.param(np.ones((128, 128), np.int64), "dtype", id="int64"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_MAPS)
def test_bad_maps_fail_before_model_work(tiny_pipeline, lq, calls, bad, message):
    with pytest.raises(ControlMapError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_pipeline.restore(lq, prompt="x", generator=_g(0), control_map=bad)
    assert calls.n == {"text": 0, "vae": 0, "unet": 0}


def test_bad_map_in_image_api_fails_before_tagging(tiny_pipeline, calls):
    tagged = []
    tiny_pipeline.tagger = lambda x: tagged.append(x) or ["cat"]
    try:
        im = Image.new("RGB", (24, 20), (100, 120, 140))
        with pytest.raises(ControlMapError, match="input 24×20"):
            tiny_pipeline(im, upscale=2, control_map=np.ones((21, 24)))
        for kw in ({"noise_scale": -1.0}, {"noise_scale": float("nan")}, {"fidelity_timestep": 100},
                   {"fidelity_timestep": -1}, {"fidelity_timestep": 1.5}):  # fmt: skip
            with pytest.raises(ValueError, match="noise_scale|fidelity_timestep"):
                tiny_pipeline(im, upscale=2, **kw)
    finally:
        tiny_pipeline.tagger = None
    assert not tagged
    assert calls.n == {"text": 0, "vae": 0, "unet": 0}


def test_image_api_maps_at_input_and_output_size(tiny_pipeline, monkeypatch):
    """``pipe(image, control_map=...)`` hands restore() the map on the latent grid of the processing size."""
    got = []

    def fake_restore(lq, **kw):
        got.append(kw["control_map"])
        raise RuntimeError("stop")

    monkeypatch.setattr(tiny_pipeline, "restore", fake_restore)
    im = Image.new("RGB", (30, 22), (90, 100, 110))  # ×2 → output 60×44; processing 696×512 → latent 87×64
    for cmap in (np.zeros((22, 30)), np.zeros((44, 60)), np.zeros((11, 15)), np.zeros((88, 120))):
        with pytest.raises(RuntimeError, match="stop"):
            tiny_pipeline(im, upscale=2, control_map=cmap)
        assert got[-1].shape == (1, 1, 64, 87) and not got[-1].any()
    half_in, half_out = np.ones((22, 30)), np.ones((44, 60))
    half_in[:, :15] = 0
    half_out[:, :30] = 0
    for cmap in (half_in, half_out):
        with pytest.raises(RuntimeError, match="stop"):
            tiny_pipeline(im, upscale=2, control_map=cmap)
    torch.testing.assert_close(got[-1], got[-2])
    # area averaging: cells fully left are 0, fully right 1, the one straddling the middle in between
    row = got[-1][0, 0, 0]
    assert (row[:43] == 0).all() and (row[44:] == 1).all() and float(row[43]) == pytest.approx(0.5)  # 30 px of 60 = 43.5 cells


# ---------------------------------------------------------------------------------- map-making helpers
def test_from_mask():
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:4] = 255
    protect = from_mask(mask)
    assert protect.dtype == np.float32
    assert protect.tolist() == np.where(mask > 0, 0.0, 1.0).tolist()
    assert from_mask(Image.fromarray(mask), protect=False).tolist() == np.where(mask > 0, 1.0, 0.0).tolist()
    # feather: 3×3 box mean, replicate padding; pixel (0, 0) sees 9 ones, pixel (1, 1) 8 ones and 1 zero... (1,2)
    soft = from_mask(mask, feather_px=1)
    assert soft[0, 0] == 1.0
    assert soft[1, 1] == pytest.approx(7 / 9)  # neighbours (1,2), (2,2) masked out of a 3×3 window
    assert soft[1, 2] == pytest.approx(5 / 9)
    # a painted RGBA layer: its alpha selects
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[1:3, 2:4] = (255, 0, 0, 255)
    assert from_mask(Image.fromarray(rgba, "RGBA")).tolist() == protect.tolist()


def test_from_edges_protects_strong_gradients():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255  # one vertical step edge
    m = from_edges(img, threshold=0.25, patch=4)
    assert m.shape == (32, 32)
    assert (m[:, :12] == 1).all() and (m[:, 20:] == 1).all()  # flat: unchanged
    assert (m[:, 15:17] == 0).all()  # the edge: protected
    assert (from_edges(img, threshold=0.25, patch=4, protect=False) == 1 - m).all()


class _FakeSegmenter:
    def __init__(self, masks):
        self.masks, self.seen = masks, []

    def segment(self, image, nouns):
        from codsr.stage2.grounding import NounMask

        self.seen.append((image.size, list(nouns)))
        return [NounMask(n, "ok" if self.masks[n] is not None else "no_box", self.masks[n]) for n in nouns]


def test_from_text_unions_the_masks_of_each_query():
    a = np.zeros((8, 10), bool)
    a[:2] = True
    b = np.zeros((8, 10), bool)
    b[:, -1] = True
    seg = _FakeSegmenter({"face": a, "text": b, "logo": None})
    m = from_text(Image.new("RGB", (10, 8)), ["face", "text", "logo"], segmenter=seg)
    assert seg.seen == [((10, 8), ["face", "text", "logo"])]
    assert m.tolist() == np.where(a | b, 0.0, 1.0).tolist()
    assert (from_text(np.zeros((8, 10, 3)), "logo", segmenter=seg) == 1).all()  # nothing found: no change
    with pytest.raises(ValueError, match="query"):
        from_text(Image.new("RGB", (10, 8)), "  ", segmenter=seg)


def test_from_text_with_tiny_grounding_models(tmp_path):
    from codsr.stage2.grounding import GroundedSAM2
    from codsr.testing import save_tiny_grounding_models

    paths = save_tiny_grounding_models(tmp_path)
    seg = GroundedSAM2.from_pretrained(*paths, box_threshold=0.0, text_threshold=0.0)
    img = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8))
    m = from_text(img, "cat", segmenter=seg)
    expected = seg.segment(img, ["cat"])[0]
    want = np.ones((96, 96)) if expected.mask is None else np.where(expected.mask, 0.0, 1.0)
    assert m.shape == (96, 96) and m.tolist() == want.tolist()


def test_control_map_for_matches_by_name(tmp_path):
    inp, maps = tmp_path / "in", tmp_path / "maps"
    (inp / "sub").mkdir(parents=True)
    (maps / "sub").mkdir(parents=True)
    for p in (inp / "a.jpg", inp / "b.png", inp / "sub" / "c.png", inp / "d.png"):
        p.write_bytes(b"")
    for p in (maps / "a.png", maps / "b.png", maps / "sub" / "c.tif", maps / "d.png", maps / "d.jpg"):
        p.write_bytes(b"")
    assert control_map_for(inp / "a.jpg", maps, inp) == maps / "a.png"  # same stem, other extension
    assert control_map_for(inp / "b.png", maps, inp) == maps / "b.png"  # same name
    assert control_map_for(inp / "sub" / "c.png", maps, inp) == maps / "sub" / "c.tif"  # sub-folder kept
    assert control_map_for(inp / "d.png", maps, inp) == maps / "d.png"  # exact name wins over d.jpg
    (inp / "e.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no control map for 'e.png'"):
        control_map_for(inp / "e.png", maps, inp)
    (maps / "f.png").write_bytes(b"")
    (maps / "f.tif").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="several candidates"):
        control_map_for(inp / "f.jpg", maps, inp)
    assert control_map_for(inp / "e.png", maps / "a.png", inp) == maps / "a.png"  # one file for all


# ---------------------------------------------------------------------------------- CLI and batch runner
def _run(argv):
    from codsr.cli import main

    return main(argv)


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_cli_control_map_file_and_folder(tmp_path, tiny_pipeline, monkeypatch, capsys):
    import codsr.pipeline.pipeline as pipeline_module

    # the in-process tiny model instead of loading files (what is tested is the flags → pipe wiring)
    monkeypatch.setattr(pipeline_module.CODSRPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pipeline))
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png"):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(src / name)
    common = ["-s", "2", "--device", "cpu", "--quiet", "--tile", "256", "--tagger", "none"]

    def out(folder, name):
        return np.asarray(Image.open(tmp_path / folder / name))

    # one map file for one input: an all-zeros map == --noise-scale 0
    Image.new("L", (24, 20), 0).save(tmp_path / "zeros.png")
    assert _run(["upscale", "-i", str(src / "a.png"), "-o", str(tmp_path / "z"), "--control-map",
                 str(tmp_path / "zeros.png"), *common]) == 0  # fmt: skip
    assert _run(["upscale", "-i", str(src / "a.png"), "-o", str(tmp_path / "n0"), "--noise-scale", "0", *common]) == 0
    assert np.array_equal(out("z", "a.png"), out("n0", "a.png"))

    # a folder of maps matched by name (the batch runner); c.png has none → it fails, the others are written
    maps = tmp_path / "maps"
    maps.mkdir()
    Image.new("L", (24, 20), 0).save(maps / "a.tif")
    Image.new("L", (24, 20), 255).save(maps / "unrelated.png")
    capsys.readouterr()
    code = _run(["upscale", "-i", str(src), "-o", str(tmp_path / "f"), "--control-map", str(maps), *common])
    assert code == 1
    err = capsys.readouterr().err
    assert "c.png" in err and "no control map" in err
    assert np.array_equal(out("f", "a.png"), out("n0", "a.png"))
    assert not (tmp_path / "f" / "c.png").exists()


def test_cli_region_flag_errors(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    base = ["upscale", "-i", str(img), "-o", str(tmp_path / "o"), "--device", "cpu"]
    assert _run([*base, "--control-map", str(tmp_path / "none.png")]) == 2
    assert "--control-map" in capsys.readouterr().err
    assert _run([*base, "--fidelity-timestep", "50"]) == 2
    assert "needs --control-map" in capsys.readouterr().err
    assert _run([*base, "--noise-scale", "-1"]) == 2
    assert "--noise-scale" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- ComfyUI node
def _comfy_nodes():
    import importlib.util
    import sys
    from pathlib import Path

    name = "codsr_comfyui_pack"  # the name tests/test_comfyui.py imports the pack under
    if name not in sys.modules:
        pack = Path(__file__).resolve().parents[1] / "comfyui"
        spec = importlib.util.spec_from_file_location(name, pack / "__init__.py", submodule_search_locations=[str(pack)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".nodes"]


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_comfyui_mask_input(tiny_pipeline):
    nodes = _comfy_nodes()
    handle = object.__new__(nodes.CODSRModelHandle)  # a handle around the in-process tiny pipeline
    handle._pipe, handle._scale = tiny_pipeline, 1.0
    images = torch.rand(1, 40, 48, 3, generator=_g(2))
    mask = torch.ones(1, 40, 48)  # ComfyUI MASK: 1 = masked
    (out,) = nodes.CODSRUpscale().upscale(handle, images, scale=2.0, seed=3, mask=mask, mask_mode="protect masked")
    ref = tiny_pipeline(images[0].permute(2, 0, 1), upscale=2.0, output_type="pt", generator=_g(3), noise_scale=0.0)
    assert torch.equal(out[0], ref[0].permute(1, 2, 0))  # everything protected == no noise
    # the two mask meanings, one mask for a batch or one per image
    m = torch.tensor([[0.0, 0.25], [1.0, 0.5]])
    assert torch.equal(nodes.control_maps_from_mask(m, "protect masked", 2), (1 - m)[None])
    assert torch.equal(nodes.control_maps_from_mask(m[None].repeat(2, 1, 1), "control map", 2), m[None].repeat(2, 1, 1))
    assert nodes.control_maps_from_mask(None, "protect masked", 2) is None
    for bad, match in ((torch.ones(3, 4, 4), "3 masks for 2 images"), (torch.full((4, 4), 2.0), r"\[0, 1\]"),
                       (torch.ones(1, 1, 4, 4), "B×H×W")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            nodes.control_maps_from_mask(bad, "protect masked", 2)
    with pytest.raises(ValueError, match="mask_mode"):
        nodes.control_maps_from_mask(m, "invert", 2)


# ---------------------------------------------------------------------------------- web app
def _painted_editor(h: int, w: int, box: tuple[slice, slice]) -> dict:
    layer = np.zeros((h, w, 4), np.uint8)
    layer[box] = (255, 0, 0, 255)  # a brush stroke
    return {"background": Image.new("RGB", (w, h)), "layers": [Image.fromarray(layer, "RGBA")], "composite": None}


def test_app_brush_to_control_map(tmp_path):
    from codsr.app.region import BRUSH_MODES, control_map_from_editor

    editor = _painted_editor(6, 8, (slice(1, 3), slice(2, 5)))
    protect = control_map_from_editor(editor, BRUSH_MODES[0])
    expected = np.ones((6, 8), np.float32)
    expected[1:3, 2:5] = 0
    assert np.array_equal(protect, expected)
    assert np.array_equal(control_map_from_editor(editor, BRUSH_MODES[1]), 1 - expected)
    Image.new("L", (8, 6), 128).save(tmp_path / "map.png")
    assert control_map_from_editor(editor, BRUSH_MODES[0], str(tmp_path / "map.png")) == str(tmp_path / "map.png")
    blank = {"background": Image.new("RGB", (8, 6)), "layers": [Image.new("RGBA", (8, 6))], "composite": None}
    assert control_map_from_editor(blank) is None and control_map_from_editor(None) is None
    with pytest.raises(ValueError, match="brush mode"):
        control_map_from_editor(editor, "erase")


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_app_job_with_a_painted_map(tiny_pipeline, tmp_path):
    from codsr.app.jobs import JobError, restore_image
    from codsr.app.region import control_map_from_editor
    from codsr.app.settings import JobSettings

    src = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)).save(src)
    s = JobSettings(scale=2, seed=7)
    everything = control_map_from_editor(_painted_editor(20, 24, (slice(None), slice(None))))
    painted = restore_image(tiny_pipeline, src, s, tmp_path / "a", max_output_pixels=10**7, control_map=everything)
    no_noise = restore_image(tiny_pipeline, src, s, tmp_path / "b", max_output_pixels=10**7, noise_scale=0.0)
    plain = restore_image(tiny_pipeline, src, s, tmp_path / "c", max_output_pixels=10**7)
    a, b, c = (np.asarray(Image.open(r.output)) for r in (painted, no_noise, plain))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(JobError, match="control_map"):
        restore_image(tiny_pipeline, src, s, tmp_path / "d", max_output_pixels=10**7, control_map=np.ones((7, 7)))


def test_app_page_has_the_region_controls(tiny_pipeline, tmp_path):
    from conftest import OPTIONAL_EXTRA, skip_reason

    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip(skip_reason(OPTIONAL_EXTRA, "gradio (codsr[app])"))
    from codsr.app import build_app

    demo = build_app(tiny_pipeline, work_dir=tmp_path)
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"codsr-region-brush", "codsr-region-map"} <= ids
    (dep,) = [d for d in config["dependencies"] if d.get("api_name") == "upscale"]
    by_id = {c["id"]: c for c in config["components"]}
    kinds = [by_id[i]["type"] for i in dep["inputs"]]
    assert kinds[-4:] == ["imageeditor", "radio", "image", "slider"]  # brush, mode, map upload, noise scale

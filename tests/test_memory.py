"""Memory budget: metering, the memory model and tile planning, offloaded tiled VAE, OOM retry, CLI flag."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

import codsr.pipeline.memory as memory
import codsr.pipeline.vae_tiling as vae_tiling
from codsr.pipeline.memory import (
    GB,
    MemoryBudgetError,
    MemoryModel,
    PeakMemoryMeter,
    TilePlan,
    automatic_budget,
    default_plan,
    is_out_of_memory,
    plan_tiles,
    resolve_budget,
    restore_with_oom_retry,
    shrink_plan,
)
from codsr.pipeline.vae_tiling import tiled_decode, tiled_encode_moments

MB = 1024**2


# --------------------------------------------------------------------------------- metering


def test_cpu_meter_sees_a_256_mb_allocation_and_resets():
    meter = PeakMemoryMeter("cpu")
    assert meter.resettable  # Linux with /proc/self/clear_refs (the CI machine)
    start = meter.reset()
    x = torch.ones(256 * MB // 4)  # touched pages count in RSS
    peak = meter.peak()
    assert peak - start >= 250 * MB
    del x
    start2 = meter.reset()
    assert meter.peak() - start2 < 64 * MB  # the old peak is forgotten


def test_automatic_budget_is_in_use_plus_part_of_available():
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    used = memory.resident_bytes("cpu")
    budget = automatic_budget("cpu", fraction=0.5)
    # both read at slightly different times: allow 256 MB of drift from other processes
    assert abs(budget - (used + 0.5 * avail)) < 256 * MB


def test_resolve_budget_parses_gb_and_rejects_nonsense():
    assert resolve_budget(None, "cpu") is None
    assert resolve_budget(2.5, "cpu") == int(2.5 * GB)
    assert resolve_budget("3", "cpu") == 3 * GB
    assert resolve_budget("auto", "cpu") > memory.resident_bytes("cpu")
    for bad in ("lots", -1, 0):
        with pytest.raises(ValueError, match="max_memory"):
            resolve_budget(bad, "cpu")


# --------------------------------------------------------------------------------- model and planning


def test_memory_model_formulas_by_hand():
    m = MemoryModel(enc_untiled=600.0, vae_latent=5000.0, dec_tile=1000.0, enc_tile=500.0, unet_per_latent_px=10000.0,
                    unet_const=7, image_per_px=50.0, latent_per_px=1000.0, safety=1.0)  # fmt: skip
    # untiled encoder of 1024²: 600·1024²·2 bytes
    assert m.encode(1024, 1024, 2, None, False) == 600 * 1024**2 * 2
    # offloaded encoder, 2048², tile 512 px, halo 80 -> window 672 px on each axis; + mid-block part
    assert m.encode(2048, 2048, 2, 512, True) == (500 * 672 * 672 + 5000 * 256 * 256) * 2
    # offloaded decoder, 4096², tile 512 px = 64 latent px, halo 13 -> window 90 latent px on each axis
    assert m.decode(4096, 4096, 2, 512, True) == (1000 * 64 * 90 * 90 + 5000 * 512 * 512) * 2
    assert m.unet(150 * 150, 2) == 10000 * 22500 * 2 + 7
    assert m.persistent(1024, 1024, 2) == 50 * 1024**2 + 1000 * 16384 * 2
    plan = TilePlan(None, None, 150, 50)
    # 1024² with the untiled default: the decoder is the largest stage (1080 > 660 per px; UNet 128² latent)
    assert MemoryModel(safety=1.0).peak(plan, 1024, 1024, 2) == pytest.approx(
        MemoryModel().persistent(1024, 1024, 2) + 1080 * 1024**2 * 2
    )


def test_plan_with_room_to_spare_is_the_untiled_default():
    plan = plan_tiles(512, 512, budget=64 * GB, dtype=torch.bfloat16, resident=3 * GB)
    assert (plan.vae_encoder_tile, plan.vae_decoder_tile, plan.latent_tile, plan.offload) == (
        None,
        None,
        150,
        None,
    )
    assert 3 * GB < plan.predicted_peak < 64 * GB


def test_tighter_budgets_give_smaller_tiles_then_offload_and_stay_under_budget():
    resident, m = 3 * GB, memory.DEFAULT_MODEL
    untiled = resident + m.peak(TilePlan(None, None, 150, 50), 4096, 4096, 2, batched_unet=False)
    floor = resident + m.peak(TilePlan(128, 128, 32, 10, "disk"), 4096, 4096, 2, batched_unet=False)
    assert floor < untiled / 2  # offloaded tiles bound the VAE: the floor is far below the untiled peak
    previous = None
    for budget in np.geomspace(untiled * 1.01, floor * 1.01, 7):
        plan = plan_tiles(4096, 4096, budget=int(budget), dtype=torch.bfloat16, resident=resident,
                          batched_unet=False)  # fmt: skip
        assert resident < plan.predicted_peak <= budget
        if previous is None:
            assert (plan.vae_encoder_tile, plan.vae_decoder_tile, plan.offload) == (None, None, None)
        else:
            big = 1 << 40
            assert (plan.vae_decoder_tile or big) <= (previous.vae_decoder_tile or big)
            assert (plan.vae_encoder_tile or big) <= (previous.vae_encoder_tile or big)
            assert plan.latent_tile <= previous.latent_tile
        previous = plan
    assert previous.offload == "disk"  # on the CPU idle tiles go to disk
    cuda = plan_tiles(4096, 4096, budget=int(floor * 1.01), dtype=torch.float16, device="cuda", resident=resident,
                      batched_unet=False)  # fmt: skip
    assert cuda.offload == "cpu"  # on a GPU they go to host memory
    with pytest.raises(MemoryBudgetError, match="4096×4096"):
        plan_tiles(
            4096, 4096, budget=int(floor * 0.95), dtype=torch.bfloat16, resident=resident, batched_unet=False
        )


def test_batched_unet_tiles_cost_the_whole_latent():
    sequential = plan_tiles(4096, 4096, 12 * GB, dtype=torch.bfloat16, resident=3 * GB, batched_unet=False)
    m = memory.DEFAULT_MODEL
    one_tile = m.unet(sequential.latent_tile**2, 2)
    tile = memory._unet_latent_px(512, 512, sequential, batched=True)
    assert tile >= 512 * 512  # all tiles at once: at least the whole latent
    assert m.unet(tile, 2) > 10 * one_tile


def test_shrink_plan_halves_and_offloads_until_minimal():
    plan = default_plan(2048, 2048)
    assert (plan.vae_encoder_tile, plan.vae_decoder_tile, plan.latent_tile) == (1024, 1792, 150)
    small = shrink_plan(plan, "cuda")
    assert (small.vae_encoder_tile, small.vae_decoder_tile, small.latent_tile, small.offload) == (
        512,
        896,
        72,
        "cpu",
    )
    assert small.latent_overlap == 24
    steps = 0
    while small is not None:
        last, small = small, shrink_plan(small, "cpu")
        steps += 1
    assert (last.vae_encoder_tile, last.latent_tile) == (128, 32) and steps < 10


def test_plan_kwargs_mean_untiled_with_a_huge_tile():
    kw = TilePlan(None, 512, 64, 21, "disk").restore_kwargs()
    assert kw["vae_encoder_tile_size"] >= 1 << 30 and kw["vae_decoder_tile_size"] == 512
    assert (kw["latent_tile_size"], kw["latent_tile_overlap"], kw["vae_offload"]) == (64, 21, "disk")


# --------------------------------------------------------------------------------- offloaded tiled VAE


@pytest.fixture(scope="module")
def vae(parity_dir):
    return AutoencoderKL.from_pretrained(parity_dir / "tiny-sd21", subfolder="vae").eval()


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_tiled_vae_equals_untiled(vae, offload, tmp_path):
    x = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 3 encoder tiles
    z = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(1))  # 3×4 decoder tiles
    with torch.no_grad():
        ref_enc = vae.quant_conv(vae.encoder(x))
        enc = tiled_encode_moments(vae, x, 128, offload=offload, offload_dir=tmp_path)
        ref_dec = vae.decode(z).sample
        dec = tiled_decode(vae, z, 16, offload=offload, offload_dir=tmp_path)
    assert (enc - ref_enc).abs().max() <= 1e-4 * ref_enc.abs().max()
    assert dec.shape == ref_dec.shape
    assert (dec - ref_dec).abs().max() <= 1e-4 * ref_dec.abs().max()
    assert os.listdir(tmp_path) == []  # the temporary tile folder is removed


def test_disk_store_round_trips_bfloat16_and_cleans_up(tmp_path):
    store = vae_tiling.make_tile_store("disk", torch.device("cpu"), tmp_path)
    t = torch.randn(2, 3, 5, 7).to(torch.bfloat16)
    store.put("a", t)
    (folder,) = os.listdir(tmp_path)
    assert len(os.listdir(tmp_path / folder)) == 1
    assert torch.equal(store.get("a"), t)
    assert torch.equal(store.pop("a"), t)
    assert os.listdir(tmp_path / folder) == []
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="offload"):
        vae_tiling.make_tile_store("gpu", torch.device("cpu"))


def test_chunked_group_norm_is_exact(monkeypatch):
    monkeypatch.setattr(vae_tiling, "_NORM_CHUNK_ELEMENTS", 300)  # forces several chunks
    norm = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 32, 9, 11, generator=torch.Generator().manual_seed(3)) * 3 + 1
    xg = x.reshape(2, 8, -1)
    mean, var = xg.mean(-1), xg.var(-1, unbiased=False)
    out = vae_tiling._TiledRunner._apply_norm(x, norm, mean, var)
    ref = F.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
    assert (out - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------------- pipeline and retry


def _lq(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_restore_with_offloaded_vae_tiles_matches_untiled(tiny_pipeline):
    lq = _lq(128)
    g = torch.Generator
    ref = tiny_pipeline.restore(lq, generator=g().manual_seed(1))
    out = tiny_pipeline.restore(lq, generator=g().manual_seed(1), vae_encoder_tile_size=64,
                                vae_decoder_tile_size=64, vae_offload="disk")  # fmt: skip
    assert (out - ref).abs().max() < 1e-3


def test_max_memory_plans_tiles_for_restore(tiny_pipeline, monkeypatch):
    # A model in which the untiled VAE of a 384² image is huge and offloaded tiles are cheap, so a
    # 1 GB headroom forces tiling with offload.
    big = MemoryModel(enc_untiled=1e6, dec_untiled=1e6, enc_tile=10.0, dec_tile=10.0, vae_latent=10.0,
                      unet_per_latent_px=10.0, unet_const=0, image_per_px=1.0, latent_per_px=1.0)  # fmt: skip
    monkeypatch.setattr(memory, "DEFAULT_MODEL", big)
    lq = _lq(384)
    budget = (memory.resident_bytes("cpu") + 1 * GB) / GB
    kw = memory.budget_tile_kwargs(tiny_pipeline, tuple(lq.shape), budget)
    assert kw["vae_offload"] == "disk"
    assert kw["vae_encoder_tile_size"] == kw["vae_decoder_tile_size"] == 256  # largest tile below the image
    g = torch.Generator
    ref = tiny_pipeline.restore(lq, generator=g().manual_seed(1))
    out = tiny_pipeline.restore(lq, generator=g().manual_seed(1), max_memory=budget)
    assert (out - ref).abs().max() < 1e-3
    # explicit sizes win over the plan
    kw2 = memory.budget_tile_kwargs(tiny_pipeline, tuple(lq.shape), budget, vae_decoder_tile_size=96)
    assert kw2["vae_decoder_tile_size"] == 96
    with pytest.raises(MemoryBudgetError, match="budget"):
        tiny_pipeline.restore(lq, max_memory=0.01)
    with pytest.warns(UserWarning, match="release_compat"):
        kw3 = memory.budget_tile_kwargs(tiny_pipeline, tuple(lq.shape), budget, release_compat=True)
    assert kw3["vae_offload"] is None


def test_oom_is_retried_with_smaller_tiles(tiny_pipeline, monkeypatch):
    lq = _lq(64)
    ref = tiny_pipeline.restore(lq, generator=torch.Generator().manual_seed(2))
    gen = tiny_pipeline.generator
    real_decode = gen.decode
    calls = []

    def flaky_decode(z):
        calls.append(z.shape)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(z)

    monkeypatch.setattr(gen, "decode", flaky_decode)
    seen, retries = [], []

    def run(kw):
        seen.append(kw)
        return tiny_pipeline.restore(lq, generator=torch.Generator().manual_seed(2), **kw)

    out = restore_with_oom_retry(run, default_plan(64, 64), "cpu", on_retry=lambda e, p: retries.append(p))
    assert len(calls) == 2 and len(seen) == 2 and len(retries) == 1
    assert seen[1]["latent_tile_size"] < seen[0]["latent_tile_size"] and seen[1]["vae_offload"] == "disk"
    assert torch.equal(out, ref)  # a 64² image is untiled either way: same result


def test_retry_gives_up_and_other_errors_pass_through():
    attempts = []

    def always_oom(kw):
        attempts.append(kw)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match="allocate"):
        restore_with_oom_retry(always_oom, default_plan(4096, 4096), "cpu", max_retries=3)
    assert len(attempts) == 4

    def broken(kw):
        attempts.append(kw)
        raise ValueError("bad input")

    attempts.clear()
    with pytest.raises(ValueError, match="bad input"):
        restore_with_oom_retry(broken, default_plan(64, 64), "cpu")
    assert len(attempts) == 1
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and not is_out_of_memory(MemoryBudgetError("x"))


def test_cli_max_memory_flag(tmp_path, parity_dir, capsys):
    from codsr.cli import main

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    common = ["upscale", "-i", str(src), "-s", "2", "--device", "cpu", "--quiet",
              "--base-model", str(parity_dir / "tiny-sd21"), "--checkpoint", str(parity_dir / "codsr_tiny.pkl")]  # fmt: skip
    assert main([*common, "-o", str(tmp_path / "auto"), "--max-memory", "auto"]) == 0
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    auto = np.asarray(Image.open(tmp_path / "auto" / "a.png"))
    assert auto.shape == (32, 48, 3)
    # plenty of memory for a tiny image: the plan is the untiled default, so the same output
    assert np.array_equal(auto, np.asarray(Image.open(tmp_path / "plain" / "a.png")))
    assert main([*common, "-o", str(tmp_path / "bad"), "--max-memory", "lots"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def test_budget_too_small_for_the_batched_unet_falls_back_to_sequential_tiles(tiny_pipeline, monkeypatch):
    # A model where the batched UNet (pooled GroupNorm, whole latent at once) cannot fit but one
    # tile at a time can: the plan switches to sequential UNet tiles instead of failing.
    model = MemoryModel(enc_untiled=10.0, dec_untiled=10.0, enc_tile=10.0, dec_tile=10.0, vae_latent=10.0,
                        unet_per_latent_px=8e4, unet_const=0, image_per_px=1.0, latent_per_px=1.0)  # fmt: skip
    monkeypatch.setattr(memory, "DEFAULT_MODEL", model)
    lq = _lq(384)
    budget = (memory.resident_bytes("cpu") + 0.5 * GB) / GB
    with pytest.raises(MemoryBudgetError):
        memory.plan_tiles(384, 384, budget * GB, dtype=torch.float32, device=torch.device("cpu"), batched_unet=True)
    with pytest.warns(UserWarning, match="one by one"):
        kw = memory.budget_tile_kwargs(tiny_pipeline, tuple(lq.shape), budget)
    assert kw["sequential_unet"] is True
    assert kw["latent_tile_size"] < 48  # tiled: 384 px = 48 latent px
    with pytest.warns(UserWarning, match="one by one"):
        out = tiny_pipeline.restore(lq, generator=torch.Generator().manual_seed(1), max_memory=budget)
    assert out.shape == lq.shape and torch.isfinite(out).all()

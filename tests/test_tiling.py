"""codsr.pipeline.tiling: TilePlan, the memory model, the budget planner, shrink/retry."""

from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch

import codsr
import codsr.pipeline
import codsr.pipeline.tiling as tiling
from codsr.pipeline.tiling import (
    GB,
    MemoryBudgetError,
    MemoryModel,
    TilePlan,
    is_out_of_memory,
    plan,
    plan_tiles,
    resolve_budget,
    restore_with_oom_retry,
    shrink_plan,
)

# --------------------------------------------------------------------------------- TilePlan


def test_defaults_are_the_release_tiles_and_exported_once():
    p = TilePlan()
    assert (p.latent_tile, p.latent_overlap, p.vae_encoder_tile, p.vae_decoder_tile) == (150, 50, 1024, 1792)
    assert (p.offload, p.sequential_unet, p.predicted_peak, p.budget) == (None, False, 0, 0)
    assert codsr.TilePlan is TilePlan and codsr.pipeline.TilePlan is TilePlan
    with pytest.raises(FrozenInstanceError):
        p.latent_tile = 64
    with pytest.raises(TypeError):
        TilePlan(64, 16)  # keyword-only: no positional confusion between units


def test_automatic_tiles_a_vae_stage_only_above_its_threshold():
    assert TilePlan.automatic(1024, 768) == TilePlan(vae_encoder_tile=None, vae_decoder_tile=None)
    assert TilePlan.automatic(1025, 8) == TilePlan(vae_encoder_tile=1024, vae_decoder_tile=None)
    p = TilePlan.automatic(2048, 2048)
    assert (p.vae_encoder_tile, p.vae_decoder_tile, p.latent_tile, p.latent_overlap) == (1024, 1792, 150, 50)


def test_from_tile_maps_output_px_to_latent_px():
    p = TilePlan.from_tile(512)
    # default overlap: a third of the tile, at most 50 latent px
    assert (p.vae_encoder_tile, p.vae_decoder_tile, p.latent_tile, p.latent_overlap) == (512, 512, 64, 21)
    assert TilePlan.from_tile(2048).latent_overlap == 50
    assert TilePlan.from_tile(512, 200).latent_overlap == 25
    assert TilePlan.from_tile(64, 400).latent_overlap == 7  # capped at tile − 1 (8 latent px)
    assert TilePlan.from_tile(20).latent_tile == 8  # never below 8 latent px
    assert TilePlan.automatic(64, 64).with_overlap_px(80).latent_overlap == 10
    with pytest.raises(ValueError, match="≥ 8"):
        TilePlan.from_tile(4)
    with pytest.raises(ValueError, match="overlap"):
        TilePlan.from_tile(512, -8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"latent_tile": 0}, "latent_tile"),
        ({"latent_tile": 16, "latent_overlap": 16}, "latent_overlap"),
        ({"latent_overlap": -1}, "latent_overlap"),
        ({"vae_encoder_tile": 0}, "vae_encoder_tile"),
        ({"vae_decoder_tile": 512.0}, "vae_decoder_tile"),
        ({"offload": "gpu"}, "offload"),
    ],
)
def test_bad_plans_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TilePlan(**kw)


def test_describe_states_units():
    s = replace(TilePlan.from_tile(512, 400), offload="disk", sequential_unet=True, budget=4 * GB, predicted_peak=3 * GB)
    assert s.describe() == (
        "UNet tiles 64 latent px (overlap 50, one by one), VAE encoder 512 px, decoder 512 px, "
        "idle VAE tiles on disk, predicted peak 3.00 of 4.00 GiB"
    )


# --------------------------------------------------------------------------------- budget parsing


def test_resolve_budget_parses_gb_and_rejects_nonsense():
    assert resolve_budget(None, "cpu") is None
    assert resolve_budget(2.5, "cpu") == int(2.5 * GB)
    assert resolve_budget("3", "cpu") == 3 * GB
    assert resolve_budget("auto", "cpu") > 0
    for bad in ("lots", -1, 0, float("inf")):
        with pytest.raises(ValueError, match="max_memory"):
            resolve_budget(bad, "cpu")


# --------------------------------------------------------------------------------- the memory model


def test_memory_model_formulas_by_hand():
    m = MemoryModel(enc_untiled=600.0, vae_latent=5000.0, dec_tile=1000.0, enc_tile=500.0, unet_per_latent_px=10000.0,
                    unet_const=7, image_per_px=50.0, latent_per_px=1000.0, safety=1.0)  # fmt: skip
    # untiled encoder of 1024²: 600·1024²·2 bytes
    assert m.encode(1024, 1024, 2, None, False) == 600 * 1024**2 * 2
    assert m.encode(1024, 1024, 2, 1024, True) == 600 * 1024**2 * 2  # a tile ≥ the image: untiled
    # offloaded encoder, 2048², tile 512 px, halo 80 -> window 672 px on each axis; + mid-block part
    assert m.encode(2048, 2048, 2, 512, True) == (500 * 672 * 672 + 5000 * 256 * 256) * 2
    # offloaded decoder, 4096², tile 512 px = 64 latent px, halo 13 -> window 90 latent px on each axis
    assert m.decode(4096, 4096, 2, 512, True) == (1000 * 64 * 90 * 90 + 5000 * 512 * 512) * 2
    assert m.unet(150 * 150, 2) == 10000 * 22500 * 2 + 7
    assert m.persistent(1024, 1024, 2) == 50 * 1024**2 + 1000 * 16384 * 2
    # 1024² untiled: the decoder is the largest stage (1080 > 660 per px; UNet 128² latent untiled)
    auto = TilePlan.automatic(1024, 1024)
    assert MemoryModel(safety=1.0).peak(auto, 1024, 1024, 2) == pytest.approx(
        MemoryModel().persistent(1024, 1024, 2) + 1080 * 1024**2 * 2
    )


def test_batched_unet_tiles_cost_the_whole_latent():
    m = tiling.DEFAULT_MODEL
    # 512² latent, tiles of ≤ 150 with overlap ≥ 50: 5 per axis (as the release's 0, 100, 200, 300,
    # 362), evenly spread with side ceil((512 + 4·50) / 5) = 143, rounded up to a multiple of 8:
    # 25 tiles of 144² at once
    assert tiling._unet_latent_px(512, 512, 150, 50, batched=True) == 25 * 144 * 144
    assert tiling._unet_latent_px(512, 512, 150, 50, batched=False) == 144 * 144
    assert tiling._unet_latent_px(100, 200, 150, 50, batched=True) == 100 * 200  # area ≤ 150²: untiled
    batched = TilePlan(vae_encoder_tile=256, vae_decoder_tile=256, offload="disk")  # the VAE is small here
    seq = replace(batched, sequential_unet=True)
    persistent = 80 * 4096**2 + 800 * 512**2 * 2
    # batched: the UNet holds 25 tiles at once and is the largest stage
    assert m.peak(batched, 4096, 4096, 2) == pytest.approx(1.15 * (persistent + 12000 * 25 * 144**2 * 2 + 400 * 2**20))
    # one by one: one tile, and the offloaded VAE's untiled mid-block (4300 per latent px) is the largest stage
    assert m.peak(seq, 4096, 4096, 2) == pytest.approx(1.15 * (persistent + m.decode(4096, 4096, 2, 256, True)))
    assert m.decode(4096, 4096, 2, 256, True) > m.unet(144**2, 2)


# --------------------------------------------------------------------------------- planning


def test_plan_with_room_to_spare_is_untiled():
    p = plan_tiles(512, 512, budget=64 * GB, dtype=torch.bfloat16, resident=3 * GB)
    assert (p.vae_encoder_tile, p.vae_decoder_tile, p.latent_tile, p.offload, p.sequential_unet) == (
        None, None, 150, None, False,
    )  # fmt: skip
    # bf16: persistent 80·512² + 800·64²·2 bytes; largest stage the untiled decoder 1080·512²·2
    expected = 3 * GB + 1.15 * (80 * 512**2 + 800 * 64**2 * 2 + 1080 * 512**2 * 2)
    assert (p.predicted_peak, p.budget) == (int(expected), 64 * GB)


def test_tighter_budgets_give_smaller_tiles_then_offload_and_stay_under_budget():
    resident, m = 3 * GB, tiling.DEFAULT_MODEL
    untiled = resident + m.peak(TilePlan(vae_encoder_tile=None, vae_decoder_tile=None, sequential_unet=True),
                                4096, 4096, 2)  # fmt: skip
    floor = resident + m.peak(TilePlan(latent_tile=32, latent_overlap=10, vae_encoder_tile=128, vae_decoder_tile=128,
                                       offload="disk", sequential_unet=True), 4096, 4096, 2)  # fmt: skip
    assert floor < untiled / 2  # offloaded tiles bound the VAE: the floor is far below the untiled peak
    previous = None
    for budget in np.geomspace(untiled * 1.01, floor * 1.01, 7):
        p = plan_tiles(4096, 4096, budget=int(budget), dtype=torch.bfloat16, resident=resident, sequential_unet=True)
        assert resident < p.predicted_peak <= budget and p.sequential_unet
        if previous is None:
            assert (p.vae_encoder_tile, p.vae_decoder_tile, p.offload) == (None, None, None)
        else:
            big = 1 << 40
            assert (p.vae_decoder_tile or big) <= (previous.vae_decoder_tile or big)
            assert (p.vae_encoder_tile or big) <= (previous.vae_encoder_tile or big)
            assert p.latent_tile <= previous.latent_tile
        previous = p
    assert previous.offload == "disk"  # on the CPU idle tiles go to disk
    cuda = plan_tiles(4096, 4096, budget=int(floor * 1.01), dtype=torch.float16, device="cuda", resident=resident,
                      sequential_unet=True)  # fmt: skip
    assert cuda.offload == "cpu"  # on a GPU they go to host memory
    with pytest.raises(MemoryBudgetError, match="4096×4096"):
        plan_tiles(4096, 4096, budget=int(floor * 0.95), dtype=torch.bfloat16, resident=resident, sequential_unet=True)


def test_plan_entry_automatic_given_and_budgeted():
    cpu, f32 = torch.device("cpu"), torch.float32
    assert plan(2048, 2048, device=cpu, dtype=f32) == TilePlan.automatic(2048, 2048)
    assert plan(64, 64, device=cpu, dtype=f32, release_compat=True).sequential_unet is True
    given = TilePlan.from_tile(256)
    assert plan(2048, 2048, device=cpu, dtype=f32, tile_plan=given) is given  # used as is
    # given + budget: still used as is, with the prediction filled in and a warning when over budget
    with pytest.warns(UserWarning, match="over max_memory"):
        annotated = plan(2048, 2048, device=cpu, dtype=f32, tile_plan=given, max_memory=1, resident=GB // 2)
    assert replace(annotated, predicted_peak=0, budget=0) == given and annotated.budget == GB
    assert annotated.predicted_peak == int(GB // 2 + tiling.DEFAULT_MODEL.peak(given, 2048, 2048, 4))
    with pytest.raises(TypeError, match="TilePlan"):
        plan(64, 64, device=cpu, dtype=f32, tile_plan={"latent_tile": 16})
    budgeted = plan(512, 512, device=cpu, dtype=torch.bfloat16, max_memory=64, resident=3 * GB)
    assert budgeted == plan_tiles(512, 512, 64 * GB, dtype=torch.bfloat16, resident=3 * GB)


def test_plan_falls_back_to_sequential_unet_tiles(recwarn):
    # 2048² fp32 with 0.5 GiB resident: 8 GiB fits the batched UNet; 5 GiB only tiles one by one.
    cpu, kw = torch.device("cpu"), dict(dtype=torch.float32, resident=GB // 2)
    batched = plan(2048, 2048, device=cpu, max_memory=8, **kw)
    assert not batched.sequential_unet and not recwarn.list
    with pytest.raises(MemoryBudgetError):
        plan_tiles(2048, 2048, 5 * GB, **kw)
    with pytest.warns(UserWarning, match="one by one"):
        seq = plan(2048, 2048, device=cpu, max_memory=5, **kw)
    assert seq == plan_tiles(2048, 2048, 5 * GB, sequential_unet=True, **kw) and seq.sequential_unet
    assert seq.predicted_peak <= 5 * GB
    # release_compat: one by one from the start, and no offload (the release's VAE cannot)
    with pytest.warns(UserWarning, match="release_compat"):
        rc = plan(2048, 2048, device=cpu, max_memory=5, release_compat=True, **kw)
    assert rc.sequential_unet and rc.offload is None
    with pytest.raises(MemoryBudgetError, match="2048×2048"):
        plan(2048, 2048, device=cpu, max_memory=0.6, **kw)


# --------------------------------------------------------------------------------- shrink and retry


def test_shrink_plan_halves_offloads_and_goes_sequential_until_minimal():
    small = shrink_plan(TilePlan.automatic(2048, 2048), "cuda")
    assert (small.vae_encoder_tile, small.vae_decoder_tile, small.latent_tile, small.latent_overlap) == (512, 896, 72, 24)
    assert (small.offload, small.sequential_unet) == ("cpu", True)
    steps = 0
    while small is not None:
        last, small = small, shrink_plan(small, "cpu")
        steps += 1
    assert (last.vae_encoder_tile, last.vae_decoder_tile, last.latent_tile) == (128, 128, 32) and steps < 10


def test_retry_shrinks_gives_up_and_passes_other_errors():
    seen = []

    def oom_once(p):
        seen.append(p)
        if len(seen) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "ok"

    retries = []
    start = TilePlan.automatic(4096, 4096)
    assert restore_with_oom_retry(oom_once, start, "cpu", on_retry=lambda e, p: retries.append(p)) == "ok"
    assert seen == [start, shrink_plan(start, "cpu")] and retries == [seen[1]]

    attempts = []

    def always_oom(p):
        attempts.append(p)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match="allocate"):
        restore_with_oom_retry(always_oom, start, "cpu", max_retries=3)
    assert len(attempts) == 4

    def broken(p):
        attempts.append(p)
        raise ValueError("bad input")

    attempts.clear()
    with pytest.raises(ValueError, match="bad input"):
        restore_with_oom_retry(broken, start, "cpu")
    assert len(attempts) == 1
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and not is_out_of_memory(MemoryBudgetError("x"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_vae_tiled_marks_the_large_image_plans():
    cpu = torch.device("cpu")
    assert not plan(512, 512, device=cpu, dtype=torch.bfloat16).vae_tiled  # VAE untiled, UNet in one tile
    assert plan(2048, 2048, device=cpu, dtype=torch.bfloat16).vae_tiled  # VAE encoder 1024 px, decoder 1792 px
    assert TilePlan(vae_encoder_tile=None, vae_decoder_tile=None, offload="disk").vae_tiled
    assert TilePlan(vae_encoder_tile=None, vae_decoder_tile=None, sequential_unet=True).vae_tiled
    assert not TilePlan(vae_encoder_tile=None, vae_decoder_tile=None).vae_tiled

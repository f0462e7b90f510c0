"""Memory budget end to end through CODSRPipeline on the in-process tiny model: planned tiles,
offloaded VAE tiles, the sequential-UNet fallback and the OOM retry (docs/memory.md)."""

import pytest
import torch

import codsr.hostmem as hostmem
import codsr.pipeline.pipeline as pipeline_module
import codsr.pipeline.tiling as tiling
from codsr import TilePlan
from codsr.pipeline.tiling import GB, MemoryBudgetError, MemoryModel, restore_with_oom_retry

RESIDENT = 2 * GB  # fixed, so plans do not depend on what else the test process holds


def _lq(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def fixed_resident(monkeypatch):
    monkeypatch.setattr(tiling, "resident_bytes", lambda device="cpu": RESIDENT)


@pytest.fixture()
def plans(monkeypatch):
    """The plans restore() runs, recorded."""
    seen = []
    real = pipeline_module.tiled_stages

    def spy(model, plan, **kw):
        seen.append(plan)
        return real(model, plan, **kw)

    monkeypatch.setattr(pipeline_module, "tiled_stages", spy)
    return seen


def test_library_never_changes_the_process_allocator(tiny_pipeline, monkeypatch, fixed_resident):
    def forbidden(*a, **k):
        raise AssertionError("library code changed glibc's malloc settings")

    monkeypatch.setattr(hostmem, "_mallopt", forbidden)
    tiny_pipeline.restore(_lq(64), generator=_g(0), max_memory=64)
    tiny_pipeline.restore(_lq(64), generator=_g(0))


def test_restore_with_offloaded_vae_tiles_matches_untiled(tiny_pipeline):
    lq = _lq(128)
    ref = tiny_pipeline.restore(lq, generator=_g(1))
    out = tiny_pipeline.restore(lq, generator=_g(1), tile_plan=TilePlan(vae_encoder_tile=64, vae_decoder_tile=64,
                                                                         offload="disk"))  # fmt: skip
    assert (out - ref).abs().max() < 1e-3


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_max_memory_plans_offloaded_tiles_for_restore(tiny_pipeline, monkeypatch, fixed_resident, plans):
    # A model in which the untiled VAE of a 384² image is huge and offloaded tiles are cheap, so a
    # 1 GB headroom forces tiling with offload.
    big = MemoryModel(enc_untiled=1e6, dec_untiled=1e6, enc_tile=10.0, dec_tile=10.0, vae_latent=10.0,
                      unet_per_latent_px=10.0, unet_const=0, image_per_px=1.0, latent_per_px=1.0)  # fmt: skip
    monkeypatch.setattr(tiling, "DEFAULT_MODEL", big)
    lq = _lq(384)
    budget = (RESIDENT + 1 * GB) / GB
    ref = tiny_pipeline.restore(lq, generator=_g(1))
    out = tiny_pipeline.restore(lq, generator=_g(1), max_memory=budget)
    p = plans[-1]
    assert (p.offload, p.vae_encoder_tile, p.vae_decoder_tile) == ("disk", 256, 256)  # largest tile below 384
    assert not p.sequential_unet and p.budget == int(budget * GB) and RESIDENT < p.predicted_peak <= p.budget
    assert (out - ref).abs().max() < 1e-3  # exact tiles: the budget does not change the image
    with pytest.raises(MemoryBudgetError, match="budget"):
        tiny_pipeline.restore(lq, max_memory=RESIDENT / GB + 0.001)


def test_budget_too_small_for_the_batched_unet_falls_back_to_sequential_tiles(
    tiny_pipeline, monkeypatch, fixed_resident, plans
):
    # A model where the batched UNet (pooled GroupNorm, whole latent at once) cannot fit but one
    # tile at a time can: the plan switches to sequential UNet tiles instead of failing.
    model = MemoryModel(enc_untiled=10.0, dec_untiled=10.0, enc_tile=10.0, dec_tile=10.0, vae_latent=10.0,
                        unet_per_latent_px=8e4, unet_const=0, image_per_px=1.0, latent_per_px=1.0)  # fmt: skip
    monkeypatch.setattr(tiling, "DEFAULT_MODEL", model)
    lq = _lq(384)
    budget = (RESIDENT + 0.5 * GB) / GB
    with pytest.warns(UserWarning, match="one by one"):
        out = tiny_pipeline.restore(lq, generator=_g(1), max_memory=budget)
    p = plans[-1]
    assert p.sequential_unet and p.latent_tile < 48  # tiled: 384 px = 48 latent px
    assert out.shape == lq.shape and torch.isfinite(out).all()
    # the same result as running that plan explicitly
    assert torch.equal(out, tiny_pipeline.restore(lq, generator=_g(1), tile_plan=p))


def test_oom_is_retried_with_smaller_tiles(tiny_pipeline, monkeypatch):
    lq = _lq(64)
    ref = tiny_pipeline.restore(lq, generator=_g(2))
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

    def run(plan):
        seen.append(plan)
        return tiny_pipeline.restore(lq, generator=_g(2), tile_plan=plan)

    out = restore_with_oom_retry(run, TilePlan.automatic(64, 64), "cpu", on_retry=lambda e, p: retries.append(p))
    assert len(calls) == 2 and len(seen) == 2 and retries == [seen[1]]
    assert seen[1].latent_tile < seen[0].latent_tile and seen[1].offload == "disk" and seen[1].sequential_unet
    assert torch.equal(out, ref)  # a 64² image is untiled either way: same result

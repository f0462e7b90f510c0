"""``codsr upscale``: tile flags, the one memory planner shared with the library, folders and resume.

Runs on the in-process tiny model (``tiny_model_dir`` files for end-to-end runs).
"""

import argparse
import warnings

import numpy as np
import pytest
from PIL import Image

import codsr.pipeline.pipeline as pipeline_module
import codsr.pipeline.tiling as tiling
from codsr import TilePlan
from codsr.cli import main
from codsr.cli.upscale import initial_plan, register, tile_plan_from_args
from codsr.pipeline.tiling import GB, MemoryBudgetError, MemoryModel


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["upscale", "-i", "x", *argv])


def _model_args(tiny_model_dir):
    return ["--base-model", str(tiny_model_dir / "tiny-sd21"), "--checkpoint", str(tiny_model_dir / "codsr_tiny.pkl")]


def test_tile_flags_map_to_a_plan():
    assert tile_plan_from_args(_args(), 2048, 2048) is None  # the planner decides
    assert tile_plan_from_args(_args("--tile", "512"), 2048, 2048) == TilePlan(
        latent_tile=64, latent_overlap=21, vae_encoder_tile=512, vae_decoder_tile=512
    )
    assert tile_plan_from_args(_args("--tile", "64", "--tile-overlap", "400"), 8, 8).latent_overlap == 7
    # --tile-overlap alone applies to the automatic plan's UNet overlap (output px / 8)
    assert tile_plan_from_args(_args("--tile-overlap", "160"), 2048, 2048) == TilePlan(
        latent_overlap=20, vae_encoder_tile=1024, vae_decoder_tile=1792
    )


class _Captured(Exception):
    pass


@pytest.fixture()
def captured_plans(tiny_pipeline, monkeypatch):
    """Plans restore() would run, recorded without running the network (restore stops there);
    ``from_pretrained`` gives the in-process tiny pipeline; resident memory fixed at 0.5 GiB."""
    seen = []

    def stop(model, plan, **kw):
        seen.append(plan)
        raise _Captured

    monkeypatch.setattr(pipeline_module, "tiled_stages", stop)
    monkeypatch.setattr(pipeline_module.CODSRPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pipeline))
    monkeypatch.setattr(tiling, "resident_bytes", lambda device="cpu": GB // 2)
    return seen


def test_cli_and_library_plan_2048_identically_for_budgets_4_6_to_8_gib(tiny_pipeline, captured_plans, tmp_path):
    # 512² input ×4 = 2048² output in float32: the batched UNet fits only from ~6.5 GiB; below, the
    # one shared planner falls back to UNet tiles one by one, in the library and in the CLI alike.
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    image = Image.open(src / "a.png")
    modes = set()
    for budget in np.round(np.arange(4.6, 8.01, 0.2), 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback's warning
            with pytest.raises(_Captured):
                tiny_pipeline(image, upscale=4, max_memory=float(budget))
            library = captured_plans[-1]
            cli = initial_plan(_args("-s", "4", "--max-memory", str(budget)), tiny_pipeline, 512, 512)
            code = main(["upscale", "-i", str(src), "-o", str(tmp_path / f"o{budget}"), "-s", "4", "--device", "cpu",
                         "--quiet", "--max-memory", str(budget)])  # fmt: skip
        assert code == 1  # the run stops at the captured plan: the image is reported as failed
        assert cli == library == captured_plans[-1], budget  # the plan the CLI ran equals the library's
        assert library.budget == int(budget * GB) and library.predicted_peak <= library.budget
        modes.add(library.sequential_unet)
    assert modes == {True, False}  # the range covers the batched plans and the sequential fallback


def test_cli_accepts_a_budget_only_the_sequential_fallback_fits(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # A memory model where the batched UNet cannot fit in 0.5 GB above the (fixed) resident memory
    # but one tile at a time can: the CLI runs the image (before, it exited with an error).
    model = MemoryModel(enc_untiled=10.0, dec_untiled=10.0, enc_tile=10.0, dec_tile=10.0, vae_latent=10.0,
                        unet_per_latent_px=8e4, unet_const=0, image_per_px=1.0, latent_per_px=1.0)  # fmt: skip
    monkeypatch.setattr(tiling, "DEFAULT_MODEL", model)
    monkeypatch.setattr(tiling, "resident_bytes", lambda device="cpu": 2 * GB)
    budget = "2.5"
    with pytest.raises(MemoryBudgetError):
        tiling.plan_tiles(512, 512, int(2.5 * GB), resident=2 * GB)
    seen = []
    real = pipeline_module.tiled_stages
    monkeypatch.setattr(pipeline_module, "tiled_stages", lambda m, p, **k: seen.append(p) or real(m, p, **k))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    argv = ["upscale", "-i", str(src), "-s", "4", "--device", "cpu", "--quiet", *_model_args(tiny_model_dir)]
    with pytest.warns(UserWarning, match="one by one"):
        assert main([*argv, "-o", str(tmp_path / "out"), "--max-memory", budget]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (512, 512)
    assert seen[-1].sequential_unet and seen[-1].latent_tile < 64  # tiled: 512 px = 64 latent px


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_cli_budget_flags(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    common = ["upscale", "-i", str(src), "-s", "2", "--device", "cpu", "--quiet", *_model_args(tiny_model_dir)]
    assert main([*common, "-o", str(tmp_path / "auto"), "--max-memory", "auto"]) == 0
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    auto = np.asarray(Image.open(tmp_path / "auto" / "a.png"))
    assert auto.shape == (32, 48, 3)
    # plenty of memory for a tiny image: the plan is the untiled default, so the same output
    assert np.array_equal(auto, np.asarray(Image.open(tmp_path / "plain" / "a.png")))
    assert main([*common, "-o", str(tmp_path / "bad"), "--max-memory", "lots"]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "bad"), "--max-memory", "8", "--tile-overlap", "64"]) == 2
    assert "--tile-overlap with --max-memory needs --tile" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "bad"), "--tile", "4"]) == 2
    assert "--tile" in capsys.readouterr().err


def test_tile_overlap_alone_changes_the_unet_overlap(tiny_pipeline, captured_plans, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    main(["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "-s", "4", "--device", "cpu", "--quiet",
          "--tile-overlap", "96"])  # fmt: skip
    assert captured_plans[-1] == TilePlan(latent_overlap=12, vae_encoder_tile=None, vae_decoder_tile=None)
    main(["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "-s", "4", "--device", "cpu", "--quiet",
          "--tile", "256", "--max-memory", "64"])  # fmt: skip
    p = captured_plans[-1]  # --tile with a budget: used as given, the prediction filled in
    assert (p.latent_tile, p.vae_encoder_tile, p.budget) == (32, 256, 64 * GB) and p.predicted_peak > GB // 2


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 28, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    rgba = (rng.random((24, 24, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "b.webp.png")  # a PNG with a misleading name
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return src


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_upscale_folder_reports_bad_file_and_resumes(folder, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["upscale", "-i", str(folder), "-o", str(out), "-s", "2", "--device", "cpu", "--quiet",
            *_model_args(tiny_model_dir)]  # fmt: skip
    code = main(argv)
    assert code == 1  # one unreadable file
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    a = Image.open(out / "a.png")
    assert a.size == (56, 40)
    b = Image.open(out / "b.webp.png")
    assert b.mode == "RGBA" and b.size == (48, 48)
    first = np.asarray(a).copy()
    # resume: existing outputs are skipped, the same seed gives the same image when redone
    assert main([*argv, "--skip-existing"]) == 1
    (out / "a.png").unlink()
    main(argv)
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), first)
    assert not [p for p in out.iterdir() if "codsr-tmp" in p.name]


def test_upscale_missing_input(tmp_path, capsys):
    assert main(["upscale", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_python_m_codsr_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "codsr", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "upscale" in r.stdout


def test_alpha_through_the_model(folder, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    code = main(["upscale", "-i", str(folder / "b.webp.png"), "-o", str(out), "-s", "2", "--device", "cpu", "--quiet",
                 "--alpha-upsampler", "model", *_model_args(tiny_model_dir)])  # fmt: skip
    assert code == 0
    b = Image.open(out / "b.webp.png")
    assert b.mode == "RGBA" and b.size == (48, 48)
    src_alpha = np.asarray(Image.open(folder / "b.webp.png"))[..., 3].astype(float)
    bicubic = np.asarray(Image.fromarray(src_alpha.astype(np.uint8)).resize((48, 48), Image.BICUBIC)).astype(float)
    assert np.abs(np.asarray(b)[..., 3] - bicubic).mean() > 1  # not the bicubic alpha

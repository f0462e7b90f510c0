import numpy as np
import pytest
from PIL import Image

from codsr.cli import main
from codsr.cli.upscale import tile_kwargs


def test_tile_flag_mapping():
    assert tile_kwargs(0, 400) == {}
    assert tile_kwargs(512, 400) == {
        "vae_encoder_tile_size": 512, "vae_decoder_tile_size": 512, "latent_tile_size": 64, "latent_tile_overlap": 50,
    }  # fmt: skip
    assert tile_kwargs(64, 400)["latent_tile_overlap"] == 7


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


def test_upscale_folder_reports_bad_file_and_resumes(folder, tmp_path, parity_dir, capsys):
    out = tmp_path / "out"
    argv = ["upscale", "-i", str(folder), "-o", str(out), "-s", "2", "--device", "cpu", "--quiet",
            "--base-model", str(parity_dir / "tiny-sd21"), "--checkpoint", str(parity_dir / "codsr_tiny.pkl")]  # fmt: skip
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


def test_alpha_through_the_model(folder, tmp_path, parity_dir):
    out = tmp_path / "out"
    code = main(["upscale", "-i", str(folder / "b.webp.png"), "-o", str(out), "-s", "2", "--device", "cpu", "--quiet",
                 "--alpha-upsampler", "model", "--base-model", str(parity_dir / "tiny-sd21"),
                 "--checkpoint", str(parity_dir / "codsr_tiny.pkl")])  # fmt: skip
    assert code == 0
    b = Image.open(out / "b.webp.png")
    assert b.mode == "RGBA" and b.size == (48, 48)
    src_alpha = np.asarray(Image.open(folder / "b.webp.png"))[..., 3].astype(float)
    bicubic = np.asarray(Image.fromarray(src_alpha.astype(np.uint8)).resize((48, 48), Image.BICUBIC)).astype(float)
    assert np.abs(np.asarray(b)[..., 3] - bicubic).mean() > 1  # not the bicubic alpha

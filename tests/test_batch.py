"""codsr.batch: input collection, output planning, seeds, and the run's failure/resume semantics."""

from __future__ import annotations

import errno
import unicodedata
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
from PIL import Image

from codsr import batch
from codsr.batch import (
    collect_inputs,
    image_seed,
    input_root_for,
    output_path_for,
    plan_outputs,
    run_batch,
    sniff_image_format,
)
from codsr.imageio import read_image
from conftest import FIXTURES


def save(
    path: Path,
    rgb: tuple[int, ...] = (10, 20, 30),
    size: tuple[int, int] = (4, 3),
    mode: str = "RGB",
    fmt: str | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb).save(path, format=fmt)
    return path


def upscale2(image, seed):
    """Stand-in SR step: 2× nearest-neighbour, plus seeded noise so seeds matter for the output."""
    rng = np.random.default_rng(seed)
    rgb = np.repeat(np.repeat(image.rgb, 2, axis=0), 2, axis=1)
    return np.clip(rgb + rng.uniform(-0.02, 0.02, rgb.shape), 0, 1).astype(np.float32), None


# ---------------------------------------------------------------------------------------------
# collecting inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "in"
    save(root / "a.png")
    save(root / "b.JPG", fmt="JPEG")
    save(root / "noext", fmt="JPEG")  # no extension: found by its JPEG signature
    save(root / "img10.png")
    save(root / "img2.png")
    (root / "fake.png").write_text("not an image")  # image extension: kept, fails later, reported
    (root / "notes.txt").write_text("hello")
    save(root / ".hidden.png")
    save(root / "._b.JPG", fmt="JPEG")  # macOS resource-fork twin
    save(root / "sub" / "c.png")
    save(root / ".git" / "d.png")
    return root


def test_collect_folder_sniffs_and_sorts_naturally(messy_folder):
    names = [p.name for p in collect_inputs(messy_folder)]
    assert names == ["a.png", "b.JPG", "fake.png", "img2.png", "img10.png", "noext"]
    rec = [p.relative_to(messy_folder).as_posix() for p in collect_inputs(str(messy_folder), recursive=True)]
    assert rec == ["a.png", "b.JPG", "fake.png", "img2.png", "img10.png", "noext", "sub/c.png"]
    assert collect_inputs(messy_folder, recursive=True, exclude=[messy_folder / "sub"])[-1].name == "noext"


def test_collect_file_glob_and_missing(messy_folder):
    assert collect_inputs(messy_folder / "notes.txt") == [messy_folder / "notes.txt"]  # explicit file: as is
    assert [p.name for p in collect_inputs(f"{messy_folder}/img*.png")] == ["img2.png", "img10.png"]
    assert [p.name for p in collect_inputs(f"{messy_folder}/**/*.png", recursive=True)] == [
        "a.png", "fake.png", "img2.png", "img10.png", "c.png",
    ]  # fmt: skip
    assert collect_inputs(f"{messy_folder}/*.webp") == []
    assert input_root_for(f"{messy_folder}/**/*.png") == messy_folder
    assert input_root_for(messy_folder / "a.png") == messy_folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_inputs(messy_folder / "nope")


def test_collect_real_folder_and_sniffing():
    root = FIXTURES / "real_lq"
    found = collect_inputs(root, recursive=True)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "Real47/36.png", "Real47/53.jpeg", "Real47/54.jpeg", "RealESRGAN_inputs/00003.png",
        "RealESRGAN_inputs/00017_gray.png", "RealESRGAN_inputs/children-alpha.png",
        "RealESRGAN_inputs/tree_alpha_16bit.png", "RealESRGAN_inputs/wolf_gray.jpg",
    ]  # fmt: skip  (the licence .txt files are not inputs)
    assert sniff_image_format(root / "Real47" / "36.png") == "JPEG"
    assert sniff_image_format(root / "Real47" / "54.jpeg") == "PNG"
    assert sniff_image_format(root / "Real47" / "LICENSE.DiffBIR.txt") is None


# ---------------------------------------------------------------------------------------------
# output names and seeds
# ---------------------------------------------------------------------------------------------


def test_output_path_rules():
    lq = FIXTURES / "real_lq"
    esr, r47 = lq / "RealESRGAN_inputs", lq / "Real47"
    out = Path("/out")
    assert output_path_for(r47 / "36.png", lq, out) == out / "Real47" / "36.jpg"  # JPEG content
    assert output_path_for(r47 / "54.jpeg", lq, out, suffix="_x4") == out / "Real47" / "54_x4.png"
    assert output_path_for(r47 / "53.jpeg", r47, out) == out / "53.jpeg"  # spelling kept
    assert output_path_for(esr / "children-alpha.png", esr, out, ext="jpg") == out / "children-alpha.png"
    assert output_path_for(esr / "tree_alpha_16bit.png", esr, out, ext="webp") == out / "tree_alpha_16bit.png"
    assert output_path_for(esr / "wolf_gray.jpg", esr, out, ext="tif") == out / "wolf_gray.tif"
    assert output_path_for(esr / "00003.png", esr, out, ext="webp") == out / "00003.webp"
    with pytest.raises(ValueError, match="unknown output extension"):
        output_path_for(esr / "00003.png", esr, out, ext="gif")


def test_output_path_unreadable_and_gif(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert output_path_for(tmp_path / "broken.jpg", tmp_path, tmp_path / "o") == tmp_path / "o" / "broken.jpg"
    save(tmp_path / "still.gif", mode="P", rgb=3)
    assert output_path_for(tmp_path / "still.gif", tmp_path, tmp_path / "o") == tmp_path / "o" / "still.png"


def test_image_seed_is_fixed_and_platform_independent():
    # sha256(b"42/sub/photo 1.jpg")[:4] big-endian; hard-coded so any change to the rule is caught.
    assert image_seed(42, "sub/photo 1.jpg") == 487282075
    assert image_seed(42, PureWindowsPath("sub\\photo 1.jpg").as_posix()) == 487282075
    assert image_seed(42, "sub\\photo 1.jpg") == 487282075
    assert image_seed(42, Path("sub") / "photo 1.jpg") == 487282075
    assert image_seed(0, unicodedata.normalize("NFD", "café.png")) == image_seed(0, "café.png")
    assert image_seed(0, "a.png") == 3325714861 and image_seed(1, "a.png") == 326923706
    assert 0 <= image_seed(7, "x") < 2**32


def test_plan_outputs_resolves_collisions_and_refuses_overwriting_inputs(tmp_path):
    a_jpg, a_png = save(tmp_path / "a.jpg", fmt="JPEG"), save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert plan_outputs([a_jpg, a_png], tmp_path, out, ext="png") == [out / "a_jpg.png", out / "a_png.png"]
    assert plan_outputs([a_jpg, a_png], tmp_path, out) == [out / "a.jpg", out / "a.png"]
    with pytest.raises(ValueError, match="would overwrite input"):
        plan_outputs([a_png], tmp_path, tmp_path)
    assert plan_outputs([a_png], tmp_path, tmp_path, suffix="_sr") == [tmp_path / "a_sr.png"]


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def test_run_continues_past_failures_and_reports(tmp_path):
    src = tmp_path / "in"
    good = [save(src / "a.png", (255, 0, 0)), save(src / "b.jpg", (0, 0, 250), fmt="JPEG")]
    save(src / "sub" / "c.png", (0, 255, 0, 128), mode="RGBA")
    (src / "text.png").write_text("not an image")
    save(src / "explode.png")
    save(src / "nan.png")

    seeds = {}

    def process(image, seed):
        seeds[image.path.relative_to(src).as_posix()] = seed
        if image.path.name == "explode.png":
            raise RuntimeError("CUDA out of memory")
        if image.path.name == "nan.png":
            return np.full((6, 8, 3), np.nan, np.float32)
        rgb, _ = upscale2(image, seed)
        return rgb  # a bare array is accepted; alpha is then upscaled for RGBA inputs

    inputs = collect_inputs(src, recursive=True)
    report = run_batch(
        inputs, process, out_dir=tmp_path / "out", skip_existing=False, input_root=src, progress=False
    )
    out = tmp_path / "out"
    assert [i.output for i in report.done] == [out / "a.png", out / "b.jpg", out / "sub" / "c.png"]
    assert {i.input.name: i.reason.split(":")[0] for i in report.failed} == {
        "explode.png": "process", "nan.png": "write", "text.png": "read",
    }  # fmt: skip
    reasons = {i.input.name: i.reason for i in report.failed}
    assert reasons["explode.png"] == "process: RuntimeError: CUDA out of memory"
    assert "NaN" in reasons["nan.png"] and "not an image" in reasons["text.png"]
    assert report.exit_code == 1 and not report.interrupted and report.skipped == []
    summary = report.summary()
    assert (
        summary.startswith("3 done, 0 skipped (output exists), 3 failed")
        and "explode.png: process" in summary
    )
    assert report.as_dict()["exit_code"] == 1
    assert seeds["sub/c.png"] == image_seed(0, "sub/c.png") and seeds["a.png"] == 3325714861

    a = read_image(out / "a.png")
    assert a.rgb.shape == (6, 8, 3) and abs(a.rgb[0, 0, 0] - 1.0) <= 0.021  # red, 2× size
    c = read_image(out / "sub" / "c.png")
    np.testing.assert_allclose(c.alpha, 128 / 255, atol=1e-6)  # alpha kept and upscaled
    assert c.alpha.shape == (6, 8)
    assert not (out / "explode.png").exists() and not (out / "nan.png").exists()
    assert good[0].exists()


def test_gray_and_16bit_inputs_keep_their_kind(tmp_path):
    src = tmp_path / "in"
    save(src / "g.png", 77, mode="L")
    codes = np.array([[1000, 1001], [65535, 3]], np.uint16)
    Image.fromarray(codes).save(src / "g16.png")
    report = run_batch(
        collect_inputs(src),
        lambda im, s: im.rgb,
        out_dir=tmp_path / "out",
        skip_existing=False,
        progress=False,
    )
    assert report.exit_code == 0
    assert Image.open(tmp_path / "out" / "g.png").mode == "L"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "g16.png")), codes)


def test_interrupt_then_resume_gives_the_same_outputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).save(src / f"{i}.png")
    inputs = collect_inputs(src)

    reference = run_batch(
        inputs, upscale2, out_dir=tmp_path / "ref", skip_existing=False, seed=5, progress=False
    )
    assert reference.exit_code == 0 and len(reference.done) == 5

    def flaky(image, seed):
        if image.path.name == "3.png":
            raise KeyboardInterrupt
        return upscale2(image, seed)

    first = run_batch(inputs, flaky, out_dir=tmp_path / "out", skip_existing=True, seed=5, progress=False)
    assert first.interrupted and first.exit_code == 130
    assert [p.name for p in first.not_processed] == ["3.png", "4.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "2.png"]
    assert "interrupted" in first.summary()

    # A killed writer's leftover temp file must be cleaned at the start of the next run.
    leftover = tmp_path / "out" / ".3.png.codsr-tmp-0badc0de"
    leftover.write_bytes(b"half")
    second = run_batch(inputs, upscale2, out_dir=tmp_path / "out", skip_existing=True, seed=5, progress=True)
    assert [i.input.name for i in second.skipped] == ["0.png", "1.png", "2.png"]
    assert [i.input.name for i in second.done] == ["3.png", "4.png"]
    assert second.removed_temp_files == [leftover] and not leftover.exists()
    assert second.exit_code == 0
    for i in range(5):
        assert (tmp_path / "out" / f"{i}.png").read_bytes() == (tmp_path / "ref" / f"{i}.png").read_bytes()


def test_interrupt_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    src = tmp_path / "in"
    save(src / "a.png")

    def interrupted_save(self, fp, format=None, **params):  # noqa: A002
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    report = run_batch(
        [src / "a.png"], upscale2, out_dir=tmp_path / "out", skip_existing=False, progress=False
    )
    assert report.interrupted and report.exit_code == 130 and report.done == []
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_stops_the_run(tmp_path, monkeypatch):
    src = tmp_path / "in"
    inputs = [save(src / f"{i}.png") for i in range(3)]
    processed = []

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "write_image", no_space)
    report = run_batch(inputs, lambda im, s: processed.append(1) or im.rgb, out_dir=tmp_path / "out",
                       skip_existing=False, progress=False)  # fmt: skip
    assert len(processed) == 1 and report.exit_code == 3
    assert "No space left" in report.aborted and [p.name for p in report.not_processed] == ["1.png", "2.png"]


def test_planning_errors_raise_before_any_work(tmp_path):
    src = tmp_path / "in"
    inputs = [save(src / "a.png")]
    called = []
    with pytest.raises(ValueError, match="would overwrite input"):
        run_batch(inputs, lambda im, s: called.append(1), out_dir=src, skip_existing=False, progress=False)
    assert called == []

"""`codsr app` (codsr.app): the Gradio page driven by gradio_client and by a real headless Chromium.

The pipeline is the tiny random SD-2.1-like model built in-process (fp32, CPU). Skips only when
the optional pieces are missing: Gradio (extra `codsr[app]`), Playwright (Python package) or
Debian's Chromium at /usr/bin/chromium (`.ci/run` installs it).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from codsr.app.jobs import JobError, restore_image, restore_many, tag_image  # noqa: E402
from codsr.app.settings import (  # noqa: E402
    AppConfig,
    JobSettings,
    OutputTooLargeError,
    check_output_size,
    upscale_command,
)
from codsr.batch import image_seed  # noqa: E402
from codsr.imageio import read_image, upscale_alpha  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT_COPY = os.environ.get("CODSR_APP_SCREENSHOT")  # also save the screenshot here (docs)


@pytest.fixture(scope="module")
def tiny_pipe():
    """CODSRPipeline on the tiny random model with a synthetic checkpoint, built in-process (fp32, CPU)."""
    from codsr.testing import TinyModelConfig, tiny_pipeline

    return tiny_pipeline(seed=0, config=TinyModelConfig(unet={"layers_per_block": [0, 1]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory):
    """The app on 127.0.0.1 with a free port and a 0.6 MP output limit; stopped after the module."""
    pytest.importorskip("gradio", reason="optional extra not installed: gradio (codsr[app])")
    from codsr.app import build_app

    demo = build_app(tiny_pipe, max_output_pixels=600_000, work_dir=tmp_path_factory.mktemp("app-jobs"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A small RGBA landscape (sky, sun, hills, a transparent corner) with seeded grain, uint8."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    rgb = np.dstack([0.35 + 0.4 * v, 0.55 + 0.3 * v, 0.95 - 0.3 * v])
    sun = ((u - 0.72) * width) ** 2 + ((v - 0.28) * height) ** 2 < (0.12 * height) ** 2
    rgb[sun] = (1.0, 0.85, 0.3)
    hills = v > 0.62 + 0.08 * np.sin(u * 9.0)
    rgb[hills] = np.dstack([0.2 + 0.1 * u, 0.5 - 0.2 * v, 0.15 + 0 * u])[hills]
    rgb += np.random.default_rng(seed).normal(0, 0.03, rgb.shape)
    alpha = np.clip(4 * (u + v) - 0.2, 0, 1)[..., None]  # the top-left corner fades out
    return (np.dstack([rgb, alpha]).clip(0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"rgba": folder / "photo.png", "big": folder / "big.png"}
    Image.fromarray(_scene(64, 48), "RGBA").save(paths["rgba"])
    Image.fromarray(_scene(400, 300, seed=1)[..., :3]).save(paths["big"])
    return paths


def test_output_limit_and_command_line():
    # 400×300 at ×4 = 1600×1200 = 1.92 MP: refused under 0.6 MP, with the scale that would fit.
    with pytest.raises(OutputTooLargeError, match=r"1600×1200 px \(1\.9 MP\).*at most ×2\.23"):
        check_output_size(400, 300, 4, 600_000)
    # small inputs are processed at ≥ 512 px on the short side: that size counts too
    assert check_output_size(32, 24, 2, 600_000) == (64, 48)
    with pytest.raises(OutputTooLargeError):
        check_output_size(32, 24, 2, 300_000)  # processed at 680×512 = 348 kpx
    cmd = upscale_command("/tmp/x/photo.png", JobSettings(scale=2, timestep=150, seed=7, prompt="a b"),
                          AppConfig(base_model="m", checkpoint="c.pkl", device="cpu"), tagger_tags=True)  # fmt: skip
    assert cmd == ("codsr upscale -i photo.png -o results -s 2 --timestep 150 --seed 7 --color-fix adain "
                   "--prompt 'a b' --device cpu --base-model m --checkpoint c.pkl --ext png")  # fmt: skip


def test_tags_come_from_the_image_the_pipeline_tags(images):
    from types import SimpleNamespace

    seen = []

    def tagger(x):
        seen.append(tuple(x.shape))
        return ["hill, sky, sun"]

    pipe = SimpleNamespace(tagger=tagger, device=torch.device("cpu"))
    # 64×48 at ×2: short side to 256 (release rule), ×2, floored to multiples of 8 → 680×512
    assert tag_image(pipe, images["rgba"], 2) == "hill, sky, sun"
    assert seen == [(1, 3, 512, 680)]
    assert tag_image(SimpleNamespace(tagger=None), images["rgba"], 2) == ""


def _expected(pipe, path: Path, scale: float, timestep: int, seed: int) -> np.ndarray:
    """What codsr upscale writes for ``path``: the pipeline on the decoded file, the file's seed,
    8-bit rounding, the alpha resized bicubically."""
    image = read_image(path)
    out = pipe(torch.from_numpy(image.rgb).permute(2, 0, 1), upscale=scale, timestep=timestep,
               prompt="", color_fix="adain", output_type="np",
               generator=torch.Generator().manual_seed(image_seed(seed, path.name)))  # fmt: skip
    alpha = upscale_alpha(image.alpha, out.shape[:2])
    return np.round(np.dstack([out, alpha]).clip(0, 1) * 255).astype(np.uint8)


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_gradio_client_upscale_equals_pipeline(tiny_pipe, served, images):
    gradio_client = pytest.importorskip("gradio_client", reason="optional extra not installed: gradio_client (codsr[app])")
    client = gradio_client.Client(served, verbose=False)
    result = client.predict(gradio_client.handle_file(str(images["rgba"])), 2, 150, 7, api_name="/upscale")
    got = np.asarray(Image.open(result[0]))
    assert Image.open(result[0]).format == "PNG" and got.shape == (96, 128, 4)
    expected = _expected(tiny_pipe, images["rgba"], 2, 150, 7)
    assert np.array_equal(got, expected), f"max abs diff {np.abs(got.astype(int) - expected).max()}"
    assert result[5] == 7  # the seed used is given back
    assert "--seed 7" in result[4] and "--timestep 150" in result[4]


def test_restore_image_refuses_before_compute(tiny_pipe, images, tmp_path):
    with pytest.raises(OutputTooLargeError):
        restore_image(tiny_pipe, images["big"], JobSettings(scale=4), tmp_path, max_output_pixels=600_000)
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_batch_zip_in_zip_out_with_errors_listed(tiny_pipe, images, tmp_path):
    import zipfile

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.write(images["rgba"], "sub/inside.png")
    seen: list[tuple[int, int, str]] = []
    result = restore_many(tiny_pipe, [images["rgba"], broken, bundle, images["big"]], JobSettings(scale=2, seed=3),
                          tmp_path / "work", max_output_pixels=400_000,
                          on_image=lambda *a: seen.append(a))  # fmt: skip
    assert [i.input.name for i in result.report.failed] == ["broken.jpg"]
    assert result.report.failed[0].reason.startswith("read: ")
    assert [name for name, _ in result.refused] == ["big.png"]  # 800×600 > 0.4 MP: refused, not run
    assert [(done, total) for done, total, _ in seen] == [(0, 3), (1, 3)]  # broken.jpg counts, fails at reading
    with zipfile.ZipFile(result.archive) as zf:
        assert sorted(zf.namelist()) == ["bundle/sub/inside.png", "photo.png"]
        photo = np.asarray(Image.open(zf.open("photo.png")))
    # the batch writes what a single job writes for the same file, settings and base seed
    single = restore_image(tiny_pipe, images["rgba"], JobSettings(scale=2, seed=3), tmp_path / "work",
                           max_output_pixels=400_000)  # fmt: skip
    assert np.array_equal(photo, np.asarray(Image.open(single.output)))
    with pytest.raises(JobError, match="outside the archive"):
        evil = tmp_path / "evil.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("../escape.png", b"x")
        restore_many(tiny_pipe, [evil], JobSettings(), tmp_path / "work", max_output_pixels=400_000)


@pytest.fixture(scope="module")
def browser_page(served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="optional extra not installed: playwright (Python package, codsr[test])")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"optional extra not installed: Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        page.set_default_timeout(180_000)
        page.goto(served)
        page.wait_for_selector("#codsr-run")
        try:
            yield page
        finally:
            browser.close()


def _upload(page, path: Path) -> None:
    page.locator("#codsr-input input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#codsr-input img")


def _set_scale(page, value: float) -> None:
    box = page.locator("#codsr-scale input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_browser_upload_run_slider_download(browser_page, images, tmp_path_factory):
    page = browser_page
    _upload(page, images["rgba"])
    _set_scale(page, 2)
    page.click("#codsr-run")
    page.wait_for_selector("#codsr-slider img", state="visible")
    page.wait_for_function("document.querySelectorAll('#codsr-slider img').length >= 2")
    page.wait_for_selector("#codsr-report:has-text('Done')")
    shot = tmp_path_factory.mktemp("artifacts") / "app-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    if SCREENSHOT_COPY:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    assert Image.open(shot).size[0] == 1400
    with page.expect_download() as info:
        page.locator("#codsr-download a").first.click()
    saved = tmp_path_factory.mktemp("download") / "result.png"
    info.value.save_as(str(saved))
    with Image.open(saved) as im:
        assert im.format == "PNG" and im.size == (128, 96) and im.mode == "RGBA"


def test_browser_oversized_input_message_then_normal_job(browser_page, images):
    page = browser_page
    _upload(page, images["big"])
    _set_scale(page, 4)
    page.click("#codsr-run")
    toast = page.get_by_text("Output too large", exact=False).first
    toast.wait_for(state="visible")
    assert "1600×1200" in page.content()
    # the app keeps serving: a normal job right after succeeds
    _upload(page, images["rgba"])
    _set_scale(page, 3)
    page.click("#codsr-run")
    page.wait_for_selector("#codsr-report:has-text('192×144 px')")


def test_loader_reloads_only_for_another_precision_or_lambda(tmp_path):
    from codsr.app.loader import PipelineLoader
    from codsr.testing import save_tiny_release

    base, ckpt = save_tiny_release(tmp_path, seed=0)
    loader = PipelineLoader(AppConfig(base_model=str(base), checkpoint=str(ckpt), device="cpu"))
    first = loader.get()
    assert first.dtype == torch.float32  # CPU default, as codsr upscale
    assert loader.get(1.0, "fp32") is first
    bf16 = loader.get(1.0, "bf16")
    assert bf16 is not first and bf16.dtype == torch.bfloat16
    assert loader.get(0.5, "bf16") is not bf16


def test_app_command_refuses_bad_limit_before_loading(capsys):
    pytest.importorskip("gradio", reason="optional extra not installed: gradio (codsr[app])")
    from codsr.cli import main

    assert main(["app", "--max-output-mp", "0", "--checkpoint", "missing.pkl"]) == 2
    assert "--max-output-mp must be positive" in capsys.readouterr().err

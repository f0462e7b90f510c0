"""Tests for codsr.evaluation: the paper's Table 1 protocol (docs/method.md#evaluation) and its tooling.

Reference numbers: OSEDiff's logged per-image PSNR/SSIM for DRealSR (pyiqa, 2024-10) and the
bicubic Y-PSNR of DRealSR pairs (30.54 dB over all 93 pairs; 3 of them are in tests/fixtures/drealsr).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import shutil
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codsr.evaluation import (
    METRICS,
    PairingError,
    PyiqaNotInstalledError,
    ResumeMismatchError,
    evaluate_dirs,
    image_seed,
    make_pipeline_restorer,
    pair_images,
    parse_metric_list,
    psnr_y,
    pyiqa_backend,
    restore_folder,
    rgb_to_y,
    rgb_to_y_u8,
    run_benchmark,
    select_metrics,
    ssim_y,
    table1_markdown,
)
from codsr.evaluation import cli as eval_cli
from codsr.evaluation.metrics import default_metric_names
from conftest import FIXTURES

DREALSR = FIXTURES / "drealsr"  # 3 DRealSR pairs + one OSEDiff output and its log
OSEDIFF_LINE = re.compile(r"results_osediff/(\S+) \| PSNR: ([\d.]+); SSIM: ([\d.]+)")


# --------------------------------------------------------------------------- helpers


def _osediff_logged() -> dict[str, tuple[float, float]]:
    logs = sorted((DREALSR / "results_osediff_subset" / "metrics").glob("*.log"))
    assert logs, "OSEDiff metric log missing"
    text = logs[0].read_text()
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in OSEDIFF_LINE.finditer(text)}


def _u8(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _random_pair_folders(tmp_path: Path, names=("a", "b", "c"), size=24, pred_suffix="_out"):
    """GT images and noisy predictions named ``<name><pred_suffix>.png``."""
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for n in names:
        gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        noise = rng.integers(-12, 13, gt.shape)
        pred = np.clip(gt.astype(int) + noise, 0, 255).astype(np.uint8)
        _write(gt_dir / f"{n}.png", gt)
        _write(pred_dir / f"{n}{pred_suffix}.png", pred)
    return pred_dir, gt_dir


def _torch_home(monkeypatch, path: Path) -> None:
    """Point torch.hub (hence pyiqa's cache lookup) at ``path`` even if some test called set_dir."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codsr")
    eval_cli.register(parser.add_subparsers(dest="command"))
    return parser


def _bicubic_x4(img: Image.Image, seed: int) -> Image.Image:
    return img.resize((img.width * 4, img.height * 4), Image.BICUBIC)


# --------------------------------------------------------------------------- Y conversion


def test_y_channel_hand_computed_pixels():
    # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, by hand:
    px = np.array(
        [[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 204, 68], [2, 44, 141]]],
        dtype=np.uint8,
    )
    expected = [16.0, 235.0, 81.481, 144.553, 40.966, 125.5, 52.5]
    np.testing.assert_allclose(rgb_to_y(px)[0], expected, rtol=0, atol=1e-12)
    # Rounded Y (SSIM input): exact ties go to even (125.5 -> 126, 52.5 -> 52), like torch.round.
    np.testing.assert_array_equal(rgb_to_y_u8(px)[0], [16, 235, 81, 145, 41, 126, 52])


def test_y_rejects_non_uint8_and_wrong_shape():
    with pytest.raises(TypeError, match="uint8"):
        rgb_to_y(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb_to_y(np.zeros((4, 4), np.uint8))


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim_constant_images_hand_values():
    a = np.full((16, 16, 3), 10, np.uint8)  # Y = 24.588..., rounded 25
    b = np.full((16, 16, 3), 12, np.uint8)  # Y = 26.305..., rounded 26
    dy = 2 * 219.0 / 255.0
    assert psnr_y(a, b) == pytest.approx(10 * math.log10(1 / ((dy / 255) ** 2 + 1e-8)), abs=1e-9)
    assert psnr_y(a, b) == pytest.approx(43.431168, abs=1e-6)
    c1 = (0.01 * 255) ** 2  # variances are 0, so SSIM is the luminance term alone
    assert ssim_y(a, b) == pytest.approx((2 * 25 * 26 + c1) / (25**2 + 26**2 + c1), abs=1e-12)
    assert ssim_y(a, a) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y(a, a) == pytest.approx(80.0, abs=1e-9)  # pyiqa's eps caps identical images at 80 dB


def test_psnr_ssim_reject_mismatched_shapes_and_tiny_images():
    with pytest.raises(ValueError, match="resize"):
        psnr_y(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim_y(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_psnr_ssim_reproduce_osediff_logged_values():
    """OSEDiff's DRealSR output in tests/fixtures: logged PSNR/SSIM (6 decimals) to 1e-5 dB / 2e-6.

    (The brief asks for 1e-3 dB / 1e-4; we reproduce to the logs' printed precision.)
    """
    logged = _osediff_logged()
    assert len(logged) == 93
    preds = sorted((DREALSR / "results_osediff_subset").glob("*.png"))
    assert [p.name for p in preds] == ["Canon_10_x1.png"]
    for pred in preds:
        p, s = _u8(pred), _u8(DREALSR / "test_HR" / pred.name)
        want_psnr, want_ssim = logged[pred.name]
        assert psnr_y(p, s) == pytest.approx(want_psnr, abs=1e-5), pred.name
        assert ssim_y(p, s) == pytest.approx(want_ssim, abs=2e-6), pred.name


def test_bicubic_baseline_drealsr_pairs():
    """LQ folder evaluated against HR: the resize rule (Pillow bicubic) gives the bicubic baseline.

    The same evaluation over all 93 DRealSR pairs gives 30.54396 dB (the dataset's bicubic baseline,
    30.54 dB); the three pairs kept in tests/fixtures give the per-image values below.
    """
    lr, hr = DREALSR / "test_LR", DREALSR / "test_HR"
    result = evaluate_dirs(lr, hr, metrics="psnr", dataset="DRealSR", method="Bicubic")
    assert len(result.images) == 3
    assert all(im.resized and im.pair_rule == "exact" for im in result.images)
    by_name = {im.image: im.scores["psnr"] for im in result.images}
    assert by_name["Canon_10_x1.png"] == pytest.approx(32.0427, abs=1e-4)
    assert by_name["Canon_14_x1.png"] == pytest.approx(35.7532, abs=1e-4)
    assert by_name["Canon_40_x1.png"] == pytest.approx(25.8061, abs=1e-4)
    assert result.mean("psnr") == pytest.approx((32.04265 + 35.75316 + 25.80613) / 3, abs=1e-4)


# --------------------------------------------------------------------------- pairing


def test_pairing_rules():
    gts = [Path(f"gt/{n}.png") for n in ("x", "img_1", "img_1_2", "Canon_001_HR", "Mixed")]
    preds = [Path(f"p/{n}.png") for n in ("x_out", "img_1_2_out", "img_1_SR", "Canon_001_LR4", "mixed")]
    report = pair_images(preds, gts)
    assert report.complete, report.describe()
    got = {p.pred.stem: (p.gt.stem, p.rule) for p in report.pairs}
    assert got == {
        "x_out": ("x", "prefix"),
        "img_1_2_out": ("img_1_2", "prefix"),  # longest ground-truth stem wins
        "img_1_SR": ("img_1", "prefix"),
        "Canon_001_LR4": ("Canon_001_HR", "normalized"),
        "mixed": ("Mixed", "casefold"),
    }


def test_pairing_reports_every_problem():
    gts = [Path("g/a.png"), Path("g/a.jpg"), Path("g/b.png"), Path("g/lonely.png")]
    preds = [Path("p/a_out.png"), Path("p/b.png"), Path("p/b_sr.png"), Path("p/stray.png")]
    report = pair_images(preds, gts)
    assert not report.consistent
    assert [p.name for p in report.unmatched_pred] == ["stray.png"]
    assert {p.name for p in report.unmatched_gt} == {"lonely.png"}
    assert [(p.name, sorted(g.name for g in c)) for p, c in report.ambiguous] == [
        ("a_out.png", ["a.jpg", "a.png"])
    ]
    assert [(g.name, sorted(p.name for p in ps)) for g, ps in report.duplicates] == [
        ("b.png", ["b.png", "b_sr.png"])
    ]
    text = report.describe()
    for name in ("stray.png", "lonely.png", "a_out.png", "b_sr.png"):
        assert name in text


def test_evaluate_dirs_raises_on_unpaired_unless_allowed(tmp_path):
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    (pred_dir / "c_out.png").unlink()
    with pytest.raises(PairingError, match=r"1 ground truth\(s\) with no prediction: c\.png"):
        evaluate_dirs(pred_dir, gt_dir)
    result = evaluate_dirs(pred_dir, gt_dir, allow_unpaired=True)
    assert [im.image for im in result.images] == ["a_out.png", "b_out.png"]
    assert result.record["unpaired"]["ground_truths"] == ["c.png"]


# --------------------------------------------------------------------------- outputs


def test_reports_csv_markdown_json(tmp_path):
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    (pred_dir.parent / "benchmark_manifest.json").write_text(json.dumps({"seed": 1234, "config": {}}))
    out = tmp_path / "report"
    result = evaluate_dirs(pred_dir, gt_dir, out_dir=out, dataset="Synth", method="Noisy")

    # Per-image values equal the per-image functions.
    expected = {}
    for n in "abc":
        p, g = _u8(pred_dir / f"{n}_out.png"), _u8(gt_dir / f"{n}.png")
        expected[f"{n}_out.png"] = (psnr_y(p, g), ssim_y(p, g))
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "psnr", "ssim"]
    assert [r["image"] for r in rows] == ["a_out.png", "b_out.png", "c_out.png"]
    for r in rows:
        assert float(r["psnr"]) == pytest.approx(expected[r["image"]][0], abs=1e-6)
        assert float(r["ssim"]) == pytest.approx(expected[r["image"]][1], abs=1e-6)

    mean_psnr = float(np.mean([v[0] for v in expected.values()]))
    mean_ssim = float(np.mean([v[1] for v in expected.values()]))
    md = (out / "summary.md").read_text()
    assert "| Dataset | Metric | Noisy |" in md
    assert f"| Synth | PSNR (dB) ↑ | {mean_psnr:.2f} |" in md
    assert f"|  | SSIM ↑ | {mean_ssim:.4f} |" in md

    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["means"]["psnr"] == pytest.approx(mean_psnr, abs=1e-12)
    assert meta["num_images"] == 3
    assert meta["protocol"]["crop_border"] == 0
    assert "BT.601" in meta["protocol"]["colour_space"]
    assert "bicubic" in meta["protocol"]["resize_rule"]
    assert meta["protocol"]["ssim"]["window"].startswith("Gaussian 11x11, sigma 1.5")
    assert meta["seed"] == 1234 and meta["seed_source"].startswith("manifest")
    assert meta["versions"]["numpy"] == np.__version__
    assert meta["versions"]["codsr"] is not None
    assert meta["metrics"]["psnr"]["pyiqa_name"] is None
    assert [im["gt"] for im in meta["images"]] == ["a.png", "b.png", "c.png"]
    assert result.record["seed"] == 1234


def test_table1_markdown_several_methods_and_datasets():
    from codsr.evaluation.result import EvaluationResult, ImageScores

    def res(ds, method, psnr, niqe=None):
        scores = {"psnr": psnr} if niqe is None else {"psnr": psnr, "niqe": niqe}
        return EvaluationResult(
            ds, method, list(scores), [ImageScores("x.png", "x.png", "exact", False, scores)]
        )

    md = table1_markdown(
        [res("RealSR", "A", 25.371), res("RealSR", "B", 26.0, 5.312), res("DRealSR", "A", 28.19)]
    )
    lines = md.splitlines()
    assert lines[0] == "| Dataset | Metric | A | B |"
    assert lines[2] == "| RealSR | PSNR (dB) ↑ | 25.37 | 26.00 |"
    assert lines[3] == "|  | NIQE ↓ | - | 5.31 |"
    assert lines[4] == "| DRealSR | PSNR (dB) ↑ | 28.19 | - |"


# --------------------------------------------------------------------------- metric names / pyiqa


def test_metric_names_and_variants():
    assert [s.name for s in parse_metric_list("clipqa, SSIM,psnr,maniqa-pipal")] == [
        "psnr",
        "ssim",
        "maniqa",
        "clipiqa",
    ]
    assert METRICS["lpips"].pyiqa_name == "lpips" and not METRICS["lpips"].higher_is_better
    assert METRICS["maniqa"].pyiqa_name == "maniqa-pipal"
    assert METRICS["clipiqa"].pyiqa_name == "clipiqa+_vitL14_512"
    assert METRICS["niqe"].arrow == "↓" and METRICS["musiq"].arrow == "↑"
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        parse_metric_list("psnr,fid")
    assert default_metric_names(pyiqa_available=False, has_gt=True) == ["psnr", "ssim"]
    assert default_metric_names(pyiqa_available=True, has_gt=False) == ["niqe", "musiq", "maniqa", "clipiqa"]
    with pytest.raises(ValueError, match="need ground truth"):
        select_metrics("psnr,niqe", has_gt=False)


def test_missing_pyiqa_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` raise ImportError
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    with pytest.raises(PyiqaNotInstalledError, match=re.escape("pip install 'codsr[metrics]'")):
        evaluate_dirs(pred_dir, gt_dir, metrics="psnr,lpips")
    # Without pyiqa the default is PSNR + SSIM.
    assert [s.name for s in select_metrics(None, has_gt=True)] == ["psnr", "ssim"]
    # CLI: exit code 3 and the hint on stderr.
    args = _parser().parse_args(
        ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics", "musiq"]
    )
    assert args.func(args) == eval_cli.EXIT_METRIC_UNAVAILABLE


def _fake_pyiqa(monkeypatch, created: list, fail: BaseException | None = None):
    mod = types.ModuleType("pyiqa")

    def create_metric(name, device=None, as_loss=False):
        created.append((name, device, as_loss))
        if fail is not None:
            raise fail

        def metric(x, ref=None):
            # Stand-in score: mean intensity, so the test can see which tensor arrived.
            import torch

            assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == 3
            assert float(x.min()) >= 0 and float(x.max()) <= 1
            return torch.tensor([[float(x.mean()) + (0.0 if ref is None else 10.0 * ref.shape[-1])]])

        return metric

    mod.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", mod)
    return mod


def test_pyiqa_variant_names_and_tensor_wiring(tmp_path, monkeypatch):
    _torch_home(monkeypatch, tmp_path / "th")  # no real weight files get hashed
    created: list = []
    _fake_pyiqa(monkeypatch, created)
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pred = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # smaller: FR metrics see it resized
    _write(tmp_path / "gt" / "x.png", gt)
    _write(tmp_path / "pred" / "x.png", pred)
    result = evaluate_dirs(
        tmp_path / "pred", tmp_path / "gt", metrics="lpips,dists,niqe,musiq,maniqa,clipiqa", device="cpu"
    )
    assert [c[0] for c in created] == [
        "lpips",
        "dists",
        "niqe",
        "musiq",
        "maniqa-pipal",
        "clipiqa+_vitL14_512",
    ]
    assert all(c[1] == "cpu" and c[2] is False for c in created)
    s = result.images[0].scores
    resized = np.asarray(Image.fromarray(pred).resize((32, 32), Image.BICUBIC))
    # Full-reference: the prediction resized to the ground truth, plus the reference (32 px wide).
    want_fr = resized.astype(np.float32).mean() / 255 + 320.0
    assert s["lpips"] == pytest.approx(want_fr, abs=1e-4)
    # No-reference: the prediction as saved.
    assert s["niqe"] == pytest.approx(pred.astype(np.float32).mean() / 255, abs=1e-6)
    assert result.record["metrics"]["maniqa"]["pyiqa_name"] == "maniqa-pipal"
    assert result.record["metrics"]["clipiqa"]["weights"][0]["file"] == "CLIPIQA+_ViTL14_512-e66488f2.pth"


def test_pyiqa_offline_missing_weights_names_file_and_folder(tmp_path, monkeypatch):
    _torch_home(monkeypatch, tmp_path / "th")
    created: list = []
    _fake_pyiqa(monkeypatch, created, fail=urllib.error.URLError("Name or service not known"))
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    with pytest.raises(pyiqa_backend.MetricWeightsMissingError) as info:
        evaluate_dirs(pred_dir, gt_dir, metrics="psnr,maniqa")
    msg = str(info.value)
    assert "MANIQA_PIPAL-ae6d356b.pth" in msg
    assert str(tmp_path / "th" / "hub" / "pyiqa" / "MANIQA_PIPAL-ae6d356b.pth") in msg
    assert "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k" in msg
    assert "URLError" in msg


def test_weight_files_found_and_hashed_in_torch_home(tmp_path, monkeypatch):
    _torch_home(monkeypatch, tmp_path / "th")
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    niqe = METRICS["niqe"]
    assert not pyiqa_backend.weights_present(niqe)
    f = tmp_path / "th" / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not really a mat file")
    assert pyiqa_backend.weights_present(niqe)
    (rec,) = pyiqa_backend.weight_file_records(niqe)
    assert rec["path"] == str(f)
    assert rec["sha256"] == hashlib.sha256(b"not really a mat file").hexdigest()


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_writes_outputs(tmp_path, capsys):
    from codsr.cli import COMMAND_MODULES

    assert "codsr.evaluation.cli" in COMMAND_MODULES
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "evaluate",
            "--pred",
            str(pred_dir),
            "--gt",
            str(gt_dir),
            "--out",
            str(out),
            "--seed",
            "7",
            "--quiet",
            "--method",
            "M",
        ]
    )
    assert args.func(args) == 0
    stdout = capsys.readouterr().out
    assert "| Dataset | Metric | M |" in stdout and "PSNR (dB) ↑" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "per_image.csv", "summary.md"]
    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["seed"] == 7 and meta["seed_source"] == "argument"
    assert list(meta["metrics"]) == ["psnr", "ssim"]


def test_cli_evaluate_pairing_error_exit_code(tmp_path, capsys):
    pred_dir, gt_dir = _random_pair_folders(tmp_path)
    _write(pred_dir / "zzz.png", np.zeros((24, 24, 3), np.uint8))
    args = _parser().parse_args(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)])
    assert args.func(args) == eval_cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "zzz.png" in err and "--allow-unpaired" in err


# --------------------------------------------------------------------------- benchmark


def test_benchmark_seed_is_the_upscale_seed():
    # sha256(b"42/Canon_10_x1.png")[:4] big-endian: the formula codsr.batch (codsr upscale) uses.
    assert image_seed(42, "Canon_10_x1.png") == 348317088
    assert image_seed(0, "a.png") == 3325714861
    assert image_seed(42, "a.png") != image_seed(43, "a.png")


def _lq_folder(tmp_path: Path, n=3, size=8) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        _write(tmp_path / "lq" / f"im{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return tmp_path / "lq"


def _noisy_restorer(calls: list, fail_on: str | None = None):
    """Bicubic ×4 plus seed-dependent noise: outputs reveal which seed each image got."""

    def restore(img: Image.Image, seed: int) -> Image.Image:
        calls.append(seed)
        if fail_on is not None and len(calls) == 2:
            raise KeyboardInterrupt(fail_on)
        up = np.asarray(_bicubic_x4(img, seed)).astype(int)
        noise = np.random.default_rng(seed).integers(-3, 4, up.shape)
        return Image.fromarray(np.clip(up + noise, 0, 255).astype(np.uint8))

    return restore


def test_restore_folder_resume_equals_uninterrupted_run(tmp_path):
    lq = _lq_folder(tmp_path)
    full_calls: list = []
    summary = restore_folder(lq, tmp_path / "full", _noisy_restorer(full_calls), seed=3)
    assert summary.written == ["im0.png", "im1.png", "im2.png"] and summary.skipped == []
    assert full_calls == [image_seed(3, f"im{i}.png") for i in range(3)]
    assert full_calls == [3788330914, 3361856925, 1955698973]

    calls: list = []
    with pytest.raises(KeyboardInterrupt):
        restore_folder(lq, tmp_path / "resumed", _noisy_restorer(calls, fail_on="stop"), seed=3)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["benchmark_manifest.json", "im0.png"]
    calls2: list = []
    summary = restore_folder(lq, tmp_path / "resumed", _noisy_restorer(calls2), seed=3)
    assert summary.skipped == ["im0.png"] and summary.written == ["im1.png", "im2.png"]
    assert calls2 == full_calls[1:]
    for i in range(3):
        a = (tmp_path / "full" / f"im{i}.png").read_bytes()
        assert a == (tmp_path / "resumed" / f"im{i}.png").read_bytes()
    manifest = json.loads((tmp_path / "resumed" / "benchmark_manifest.json").read_text())
    assert manifest["seed"] == 3
    assert len(manifest["sessions"]) == 2  # interrupted + resumed, each with its package versions
    assert manifest["sessions"][1]["versions"]["numpy"] == np.__version__
    assert {k: v["seed"] for k, v in manifest["images"].items()} == {
        f"im{i}.png": full_calls[i] for i in range(3)
    }
    assert manifest["images"]["im1.png"]["size"] == [32, 32]


def test_restore_folder_refuses_mixed_settings(tmp_path):
    lq = _lq_folder(tmp_path, n=2)
    out = tmp_path / "out"
    restore_folder(lq, out, _bicubic_x4, seed=1, config={"timestep": 100})
    with pytest.raises(ResumeMismatchError, match="seed: was 1, now 2"):
        restore_folder(lq, out, _bicubic_x4, seed=2, config={"timestep": 100})
    with pytest.raises(ResumeMismatchError, match="timestep: was 100, now 200"):
        restore_folder(lq, out, _bicubic_x4, seed=1, config={"timestep": 200})
    calls: list = []
    summary = restore_folder(
        lq, out, _noisy_restorer(calls), seed=2, config={"timestep": 200}, overwrite=True
    )
    assert len(summary.written) == 2 and len(calls) == 2
    # Outputs with no manifest are not trusted.
    stray = tmp_path / "stray"
    _write(stray / "im0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ResumeMismatchError, match="no run manifest"):
        restore_folder(lq, stray, _bicubic_x4)


def test_run_benchmark_bicubic_reproduces_baseline(tmp_path):
    """Bicubic 'restorer' over 3 DRealSR pairs: the evaluated PSNR is the bicubic baseline."""
    names = ["Canon_10_x1.png", "Canon_14_x1.png", "Canon_40_x1.png"]
    for n in names:
        shutil.copy(DREALSR / "test_LR" / n, _lq_dir(tmp_path) / n)
    gt_dir = DREALSR / "test_HR"
    summary, result = run_benchmark(
        tmp_path / "lq",
        gt_dir,
        tmp_path / "run",
        _bicubic_x4,
        seed=42,
        config={"method": "bicubic"},
        metrics="psnr",
        allow_unpaired=True,
        dataset="DRealSR",
        method="Bicubic",
    )
    assert summary.written == names
    scores = {im.image: im.scores["psnr"] for im in result.images}
    assert scores["Canon_10_x1.png"] == pytest.approx(32.0427, abs=1e-4)
    assert scores["Canon_14_x1.png"] == pytest.approx(35.7532, abs=1e-4)
    assert not any(im.resized for im in result.images)
    meta = json.loads((tmp_path / "run" / "metrics" / "evaluation.json").read_text())
    assert meta["seed"] == 42 and meta["run_manifest"].endswith("benchmark_manifest.json")
    # Second call: everything skipped, same numbers.
    summary2, result2 = run_benchmark(
        tmp_path / "lq",
        gt_dir,
        tmp_path / "run",
        _bicubic_x4,
        seed=42,
        config={"method": "bicubic"},
        metrics="psnr",
        allow_unpaired=True,
    )
    assert summary2.written == [] and summary2.skipped == names
    assert result2.means == result.means


def _lq_dir(tmp_path: Path) -> Path:
    d = tmp_path / "lq"
    d.mkdir(exist_ok=True)
    return d


class _FakePipeline:
    """Stands in for CODSRPipeline: bicubic upscaling, records how it was called."""

    loaded: list = []
    calls: list = []

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.loaded.append(kwargs)
        return cls()

    def __call__(self, image, *, upscale, prompt, timestep, color_fix, generator, output_type):
        type(self).calls.append(
            {
                "upscale": upscale,
                "prompt": prompt,
                "timestep": timestep,
                "color_fix": color_fix,
                "seed": generator.initial_seed(),
                "output_type": output_type,
            }
        )
        return image.resize((image.width * upscale, image.height * upscale), Image.BICUBIC)


def test_make_pipeline_restorer_seeds_a_cpu_generator():
    _FakePipeline.calls = []
    restore = make_pipeline_restorer(_FakePipeline(), upscale=2, timestep=50, prompt="p", color_fix="wavelet")
    out = restore(Image.new("RGB", (4, 4)), 123)
    assert out.size == (8, 8)
    assert _FakePipeline.calls == [
        {
            "upscale": 2,
            "prompt": "p",
            "timestep": 50,
            "color_fix": "wavelet",
            "seed": 123,
            "output_type": "pil",
        }
    ]


def test_cli_benchmark_sets_with_stand_in_pipeline(tmp_path, monkeypatch, capsys):
    import torch

    import codsr

    monkeypatch.setattr(codsr, "CODSRPipeline", _FakePipeline, raising=False)
    _FakePipeline.loaded, _FakePipeline.calls = [], []
    lq = _lq_folder(tmp_path, n=2, size=16)
    gt = tmp_path / "gt"
    rng = np.random.default_rng(9)
    for i in range(2):
        _write(gt / f"im{i}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ckpt = tmp_path / "codsr.pkl"
    ckpt.write_bytes(b"checkpoint bytes")
    argv = [
        "benchmark-sets",
        "--lq",
        str(lq),
        "--gt",
        str(gt),
        "--out",
        str(tmp_path / "run"),
        "--base-model",
        "sd21",
        "--checkpoint",
        str(ckpt),
        "--seed",
        "5",
        "--device",
        "cpu",
        "--quiet",
    ]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert _FakePipeline.loaded == [
        {"base_model": "sd21", "checkpoint": str(ckpt), "device": "cpu", "torch_dtype": torch.float32}
    ]
    assert [c["seed"] for c in _FakePipeline.calls] == [
        image_seed(5, "im0.png"),
        image_seed(5, "im1.png"),
    ]
    assert all(
        c["timestep"] == 100 and c["upscale"] == 4 and c["color_fix"] == "adain" for c in _FakePipeline.calls
    )
    manifest = json.loads((tmp_path / "run" / "benchmark_manifest.json").read_text())
    assert manifest["config"]["checkpoint_sha256"] == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert manifest["config"]["dtype"] == "float32"
    assert "| Dataset | Metric | CODSR |" in capsys.readouterr().out
    # Resume: nothing recomputed. A different timestep is refused (exit code 2).
    assert args.func(args) == 0 and len(_FakePipeline.calls) == 2
    args = _parser().parse_args([*argv, "--timestep", "200"])
    assert args.func(args) == eval_cli.EXIT_BAD_INPUT
    assert "timestep: was 100, now 200" in capsys.readouterr().err


def test_cli_benchmark_sets_with_the_real_pipeline(tmp_path, tiny_model_dir, capsys):
    """End to end on the tiny model: two DRealSR LQ crops (64² → 256²), then PSNR/SSIM."""
    from codsr.cli import main

    lq, gt = tmp_path / "lq", tmp_path / "gt"
    lq.mkdir(), gt.mkdir()
    names = sorted(p.name for p in (DREALSR / "test_LR").iterdir())[:2]
    for n in names:  # aligned ×4 crops keep the test fast
        Image.open(DREALSR / "test_LR" / n).crop((32, 32, 96, 96)).save(lq / n)
        Image.open(DREALSR / "test_HR" / n).crop((128, 128, 384, 384)).save(gt / n)
    argv = ["benchmark-sets", "--lq", str(lq), "--gt", str(gt), "--out", str(tmp_path / "run"),
            "--base-model", str(tiny_model_dir / "tiny-sd21"), "--checkpoint", str(tiny_model_dir / "codsr_tiny.pkl"),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    outs = sorted((tmp_path / "run" / "images").iterdir())
    assert len(outs) == 2
    assert Image.open(outs[0]).size == Image.open(gt / names[0]).size == (256, 256)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics" / "per_image.csv")))
    assert len(rows) == 2
    # a random tiny model is no restorer: PSNR is finite and low, but computed for real
    assert all(5 < float(r["psnr"]) < 40 for r in rows)
    assert "| Dataset | Metric |" in capsys.readouterr().out

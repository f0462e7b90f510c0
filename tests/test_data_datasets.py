"""Tests for codsr.data.datasets: HQ→synthetic-LQ dataset, paired dataset, bad files, collate."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.data.datasets import (
    HQImageDataset,
    PairedImageDataset,
    collate,
    derive_seed,
    list_images,
    load_image,
)
from codsr.data.degradation import BatchDegrader
from conftest import FIXTURES


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def kodak_dir(tmp_path_factory) -> Path:
    """Three 96×112 crops of photos (tests/fixtures) in nested folders (recursive listing)."""
    root = tmp_path_factory.mktemp("hq")
    sources = [
        ("real_lq/RealESRGAN_inputs/00003.png", "a"),
        ("real_lq/RealESRGAN_inputs/children-alpha.png", "a/b"),
        ("drealsr/test_HR/Canon_40_x1.png", ""),
    ]
    for i, (name, sub) in enumerate(sources):
        arr = np.asarray(Image.open(FIXTURES / name).convert("RGB"))[100 : 100 + 96, 50 + i : 50 + i + 112]
        _save(root / sub / f"img{i}.png", arr)
    (root / "notes.txt").write_text("not an image")
    return root


def _unit(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- listing / loading


def test_list_images_folder_and_txt(kodak_dir, tmp_path):
    found = list_images(kodak_dir)
    # sorted by path parts: a/b/img1 < a/img0 < img2
    assert [p.relative_to(kodak_dir).as_posix() for p in found] == ["a/b/img1.png", "a/img0.png", "img2.png"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{found[2]}\n\n{found[1].relative_to(kodak_dir)}\n")
    shutil.copytree(kodak_dir / "a", tmp_path / "a")  # relative entries resolve next to the list
    assert list_images(lst) == [found[2], tmp_path / "a" / "img0.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        list_images(tmp_path / "empty")


def test_load_image_modes(tmp_path):
    grey16 = np.array([[0, 65535], [257 * 100, 257 * 7]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[:, :, 0].tolist() == [[0, 255], [100, 7]] and (out[:, :, 1] == out[:, :, 0]).all()
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png")[0, 0].tolist() == [200, 0, 0]


def test_derive_seed_distinct_and_stable():
    seeds = {derive_seed(0, e, i) for e in range(3) for i in range(100)}
    assert len(seeds) == 300
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(2, 1, 3)


# ----------------------------------------------------------------------------- HQ dataset


def test_hq_item_contents_match_file(kodak_dir):
    calls = []

    def prompt_fn(path, box):
        calls.append((path, box))
        return f"tags of {Path(path).name}"

    ds = HQImageDataset(kodak_dir, crop_size=64, seed=3, prompt_fn=prompt_fn)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["hq"].shape == (3, 64, 64) and item["lq"].shape == (3, 64, 64)
        for key in ("hq", "lq"):
            assert item[key].min() >= -1 and item[key].max() <= 1 and item[key].dtype == torch.float32
        top, left, h, w = item["crop_box"].tolist()
        src = load_image(item["path"])[top : top + h, left : left + w]
        if item["flipped"]:
            src = src[:, ::-1]
        np.testing.assert_array_equal(_unit(item["hq"]), src)  # exact crop of the file, in [-1, 1]
        assert item["prompt"] == f"tags of {Path(item['path']).name}"
        assert item["resize_mode"] in ("nearest", "bilinear", "bicubic")
        assert item["num_skipped"] == 0 and item["index"] == i
        # the LQ is a degraded version of the same crop
        corr = np.corrcoef(item["lq"].flatten().numpy(), item["hq"].flatten().numpy())[0, 1]
        assert corr > 0.5 and (item["lq"] - item["hq"]).abs().mean() > 0.02
    assert calls[0][1] == tuple(ds[0]["crop_box"].tolist())


def test_hq_reproducible_and_independent_of_access_order(kodak_dir):
    a = HQImageDataset(kodak_dir, crop_size=64, seed=7)
    b = HQImageDataset(kodak_dir, crop_size=64, seed=7)
    _ = [a[i] for i in (0, 1, 2)]
    for i in (2, 1):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["hq"], ib["hq"]) and torch.equal(ia["lq"], ib["lq"])
    c = HQImageDataset(kodak_dir, crop_size=64, seed=8)
    b.set_epoch(1)
    for other in (b, c):
        assert not torch.equal(a[0]["lq"], other[0]["lq"])


def test_hq_dataloader_worker_count_does_not_matter(kodak_dir):
    ds = HQImageDataset(kodak_dir, crop_size=64, seed=1)
    ds.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate)
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]["lq"], batches[1]["lq"]) and torch.equal(batches[0]["hq"], batches[1]["hq"])
    assert batches[0]["path"] == batches[1]["path"] and isinstance(batches[0]["path"], list)
    assert batches[0]["crop_box"].shape == (3, 4) and batches[0]["flipped"].dtype == torch.bool


def test_hq_flip_happens_about_half_the_time(kodak_dir):
    ds = HQImageDataset(kodak_dir, crop_size=32, degrade_in="none", seed=0)
    flips = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        flips += [ds[i]["flipped"] for i in range(3)]
    assert 15 <= sum(flips) <= 45
    assert "lq" not in ds[0]
    assert not any(
        HQImageDataset(kodak_dir, crop_size=32, flip=False, degrade_in="none")[i]["flipped"] for i in range(3)
    )


def test_hq_batch_mode_returns_kernels_for_batch_degrader(kodak_dir):
    ds = HQImageDataset(kodak_dir, crop_size=64, degrade_in="batch", seed=0)
    batch = collate([ds[i] for i in range(3)])
    assert "lq" not in batch
    for key in ("kernel1", "kernel2", "sinc_kernel"):
        assert batch[key].shape == (3, 21, 21)
        torch.testing.assert_close(batch[key].sum((1, 2)), torch.ones(3), atol=1e-5, rtol=0)
    out = BatchDegrader(seed=0)(batch["hq"], kernels=batch)
    assert out["lq"].shape == (3, 3, 64, 64) and out["lq_small"].shape == (3, 3, 16, 16)
    assert out["lq"].min() >= -1 and out["lq"].max() <= 1


def test_small_images_pad_or_skip(tmp_path, kodak_dir):
    small = np.asarray(Image.open(next(kodak_dir.rglob("img0.png"))))[:40, :50]
    _save(tmp_path / "a_small.png", small)
    shutil.copy(next(kodak_dir.rglob("img1.png")), tmp_path / "b_big.png")

    pad = HQImageDataset(tmp_path, crop_size=64, flip=False, degrade_in="none")
    item = pad[0]
    assert item["path"].endswith("a_small.png") and item["crop_box"].tolist() == [0, 0, 64, 64]
    hq = _unit(item["hq"])
    np.testing.assert_array_equal(hq[:40, :50], small)
    np.testing.assert_array_equal(hq[40, :50], small[38])  # reflected about the last row
    np.testing.assert_array_equal(hq[:40, 50], small[:, 48])  # ... and about the last column

    skip = HQImageDataset(tmp_path, crop_size=64, degrade_in="none", small_images="skip")
    with pytest.warns(UserWarning, match=r"a_small\.png.*smaller than the 64x64 crop"):
        item = skip[0]
    assert item["path"].endswith("b_big.png") and item["num_skipped"] == 1 and skip.num_skipped == 1
    with pytest.raises(ValueError, match="small_images"):
        HQImageDataset(tmp_path, crop_size=64, small_images="crop")


def test_corrupt_files_are_skipped_and_counted(tmp_path, kodak_dir):
    shutil.copy(next(kodak_dir.rglob("img2.png")), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bad2.jpg").write_bytes(b"")
    ds = HQImageDataset(tmp_path, crop_size=32)
    with pytest.warns(UserWarning) as rec:
        item = ds[0]  # bad.png, then bad2.jpg, then good.png
    messages = " ".join(str(w.message) for w in rec)
    assert "bad.png" in messages and "bad2.jpg" in messages
    assert item["path"].endswith("good.png") and item["num_skipped"] == 2
    assert ds.num_skipped == 2 and set(Path(p).name for p in ds.skipped) == {"bad.png", "bad2.jpg"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file is reported once per process
        assert ds[1]["path"].endswith("good.png")
    (tmp_path / "good.png").unlink()
    with pytest.raises(RuntimeError, match="every one of the 2 images was skipped"):
        with pytest.warns(UserWarning, match="bad"):
            HQImageDataset(tmp_path, crop_size=32)[0]


def test_hq_rejects_crop_not_multiple_of_scale(kodak_dir):
    with pytest.raises(ValueError, match="multiple of scale 4"):
        HQImageDataset(kodak_dir, crop_size=66)


# ----------------------------------------------------------------------------- paired dataset


def _box_down(arr: np.ndarray, s: int) -> np.ndarray:
    h, w = arr.shape[0] // s, arr.shape[1] // s
    return (
        arr[: h * s, : w * s].reshape(h, s, w, s, 3).astype(np.float64).mean((1, 3)).round().astype(np.uint8)
    )


def test_paired_crops_are_aligned(tmp_path, kodak_dir):
    for i, p in enumerate(list_images(kodak_dir)):
        hq = load_image(p)
        _save(tmp_path / "hq" / f"x{i}.png", hq)
        _save(tmp_path / "lq" / f"x{i}.png", _box_down(hq, 4))  # LQ = exact 4×4 box average
    ds = PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=48, resize_back=False, seed=2)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["hq"].shape == (3, 48, 48) and item["lq"].shape == (3, 12, 12)
        top, left, _, _ = item["crop_box"].tolist()
        assert top % 4 == 0 and left % 4 == 0
        np.testing.assert_array_equal(_box_down(_unit(item["hq"]), 4), _unit(item["lq"]))
        assert Path(item["lq_path"]).name == Path(item["path"]).name
    back = PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=48, seed=2)[0]
    assert back["lq"].shape == (3, 48, 48) and back["resize_mode"] in ("nearest", "bilinear", "bicubic")
    assert torch.equal(back["hq"], ds[0]["hq"])


def test_paired_real_drealsr_with_suffixes(tmp_path):
    src = FIXTURES / "drealsr"
    (tmp_path / "hq").mkdir(), (tmp_path / "lq").mkdir()
    for stem in ("Canon_10_x1", "Canon_14_x1"):
        shutil.copy(src / "test_HR" / f"{stem}.png", tmp_path / "hq" / f"{stem}_HR.png")
        shutil.copy(src / "test_LR" / f"{stem}.png", tmp_path / "lq" / f"{stem}_LR.png")
    ds = PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=64, lq_suffix="_LR", hq_suffix="_HR")
    item = ds[0]
    assert item["path"].endswith("Canon_10_x1_HR.png") and item["lq_path"].endswith("Canon_10_x1_LR.png")
    # the real ×4 pair is aligned: the LQ resized back is close to the HQ crop
    err = (item["lq"] - item["hq"]).abs().mean().item()
    assert err < 0.15
    whole = PairedImageDataset(
        tmp_path / "lq", tmp_path / "hq", crop_size=None, resize_back=False, lq_suffix="_LR", hq_suffix="_HR"
    )[1]
    assert whole["hq"].shape[1] == 4 * whole["lq"].shape[1] == 512


def test_paired_mismatch_errors_list_files(tmp_path):
    arr = np.zeros((32, 32, 3), np.uint8)
    for name in ("a", "b"):
        _save(tmp_path / "hq" / f"{name}.png", arr)
    for name in ("a", "c"):
        _save(tmp_path / "lq" / f"{name}.png", arr[:8, :8])
    with pytest.raises(
        ValueError, match=r"(?s)LQ files without an HQ match.*c\.png.*HQ files without an LQ match.*b\.png"
    ):
        PairedImageDataset(tmp_path / "lq", tmp_path / "hq")
    (tmp_path / "lq" / "c.png").rename(tmp_path / "lq" / "b.png")
    _save(tmp_path / "hq" / "a.jpg", arr)
    with pytest.raises(
        ValueError, match=r"same stem: .*a\.jpg and .*a\.png|same stem: .*a\.png and .*a\.jpg"
    ):
        PairedImageDataset(tmp_path / "lq", tmp_path / "hq")
    (tmp_path / "hq" / "a.jpg").unlink()
    _save(tmp_path / "lq" / "b.png", arr[:10, :7])  # 32 is not 4 × 10 (nor within a mod-crop)
    ds = PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=16)
    assert ds[0]["hq"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"b\.png.*not an integer multiple"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="LQ folder"):
        PairedImageDataset(tmp_path / "missing", tmp_path / "hq")


def test_collate_rejects_empty_and_keeps_strings():
    batch = collate([{"x": torch.zeros(2), "s": "a", "n": 1}, {"x": torch.ones(2), "s": "b", "n": 2}])
    assert batch["x"].shape == (2, 2) and batch["s"] == ["a", "b"] and batch["n"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="empty"):
        collate([])


# ----------------------------------------------------------------------------- make-lq command


def _run_make_lq(argv: list[str]) -> int:
    import argparse

    from codsr.data import make_lq

    parser = argparse.ArgumentParser()
    make_lq.register(parser.add_subparsers())
    args = parser.parse_args(["make-lq", *argv])
    return args.func(args)


def test_make_lq_writes_a_paired_folder(tmp_path, kodak_dir, capsys):
    cfg = tmp_path / "deg.yaml"
    cfg.write_text("degradation:\n  jpeg_range: [60, 60]\n  jpeg_range2: [60, 60]\n")
    out = tmp_path / "out"
    assert (
        _run_make_lq(["--hq", str(kodak_dir), "--out", str(out), "--crop", "64", "--config", str(cfg)]) == 0
    )
    assert "wrote 3 LQ images" in capsys.readouterr().out
    lq_files = sorted(p.relative_to(out / "lq").as_posix() for p in (out / "lq").rglob("*.png"))
    assert lq_files == ["a/b/img1.png", "a/img0.png", "img2.png"]
    assert Image.open(out / "lq" / "img2.png").size == (16, 16) and Image.open(
        out / "hq" / "img2.png"
    ).size == (64, 64)
    ds = PairedImageDataset(out / "lq", out / "hq", crop_size=64, flip=False)
    assert ds[0]["lq"].shape == (3, 64, 64)
    # same seed → same files
    first = np.asarray(Image.open(out / "lq" / "img2.png"))
    _run_make_lq(
        ["--hq", str(kodak_dir), "--out", str(tmp_path / "again"), "--crop", "64", "--config", str(cfg)]
    )
    np.testing.assert_array_equal(first, np.asarray(Image.open(tmp_path / "again" / "lq" / "img2.png")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("jpeg_rnge: [1, 2]\n")
    with pytest.raises(ValueError, match="unknown degradation config keys"):
        _run_make_lq(["--hq", str(kodak_dir), "--out", str(out), "--config", str(bad)])


def test_paired_small_images_padded_stay_aligned(tmp_path, kodak_dir):
    hq = load_image(next(kodak_dir.rglob("img0.png")))[:40, :48]  # smaller than the 64 crop
    _save(tmp_path / "hq" / "s.png", hq)
    _save(tmp_path / "lq" / "s.png", _box_down(hq, 4))
    item = PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=64, resize_back=False)[0]
    assert item["hq"].shape == (3, 64, 64) and item["lq"].shape == (3, 16, 16)
    np.testing.assert_array_equal(_box_down(_unit(item["hq"]), 4), _unit(item["lq"]))
    with pytest.warns(UserWarning, match="smaller than the 16x16 crop"):
        with pytest.raises(RuntimeError, match="skipped"):
            PairedImageDataset(tmp_path / "lq", tmp_path / "hq", crop_size=64, small_images="skip")[0]

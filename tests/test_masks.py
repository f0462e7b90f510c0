"""``codsr masks`` and the stage-2 dataset on tiny random Grounding DINO / SAM 2 models (docs/method.md#stage-2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.stage2.dataset import Stage2Dataset, realesrgan_degrade, stage2_collate
from codsr.stage2.grounding import MASK_STATUSES, GroundedSAM2, NounMask, grounding_prompt
from codsr.stage2.masks import (
    CropBox,
    apply_crop,
    choose_crop,
    item_key,
    load_captions,
    load_masks,
    parse_shard,
    read_sidecar,
    write_item,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random Grounding DINO (96 px) and SAM 2 (128 px), the models of ``codsr make-tiny-model --grounding``."""
    from codsr.testing.grounding import save_tiny_grounding_models

    return save_tiny_grounding_models(tmp_path_factory.mktemp("grounding"), seed=0)


@pytest.fixture(scope="module")
def segmenter(models):
    return GroundedSAM2.from_pretrained(*models)


def _noise_image(path, width, height, seed):
    rgb = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return rgb


@pytest.fixture
def dataset_dir(tmp_path):
    data = tmp_path / "hq"
    _noise_image(data / "a.png", 120, 100, 0)
    _noise_image(data / "sub" / "b.png", 100, 130, 1)
    _noise_image(data / "c.png", 90, 70, 2)  # smaller than the 96 crop: padded
    captions = tmp_path / "tags.tsv"
    captions.write_text(
        "a.png\tcat, black, grass\nsub/b.png\tdog, tree, green\nc.png\tsky, blue\n", encoding="utf-8"
    )
    return data, captions


def _run(*argv):
    from codsr.cli import main

    return main(["masks", *map(str, argv)])


# ---------------------------------------------------------------------- crops, keys, files
def test_crops_are_reproducible(tmp_path):
    assert choose_crop(100, 120, 96, "a.png") == CropBox(2, 12, 96)
    r1 = choose_crop(400, 300, 96, "x/y.png", mode="random", seed=5)
    assert r1 == choose_crop(400, 300, 96, "x/y.png", mode="random", seed=5)
    assert r1 != choose_crop(400, 300, 96, "x/y.png", mode="random", seed=6)
    assert 0 <= r1.top <= 304 and 0 <= r1.left <= 204
    small = np.arange(5 * 4).reshape(5, 4)
    crop = choose_crop(5, 4, 6, "s")
    assert crop == CropBox(0, 0, 6)
    out = apply_crop(small, crop)
    assert out.shape == (6, 6)
    assert out[:, 4].tolist() == [2, 6, 10, 14, 18, 14]  # reflect: a b c d | c b
    assert CropBox.from_json(r1.to_json()) == r1
    assert item_key(tmp_path / "d" / "x.png", tmp_path) == "d/x.png"
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("4/4")


def test_load_captions_json_and_tsv(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"a.png": "cat, sky"}))
    assert load_captions(tmp_path / "c.json") == {"a.png": "cat, sky"}
    (tmp_path / "c.tsv").write_text("a.png\tcat, sky\n\n# note\n")
    assert load_captions(tmp_path / "c.tsv") == {"a.png": "cat, sky"}
    (tmp_path / "bad.tsv").write_text("a.png cat\n")
    with pytest.raises(ValueError, match="line 1"):
        load_captions(tmp_path / "bad.tsv")


# ---------------------------------------------------------------------- segmentation
def test_segment_matches_manual_grounded_sam(segmenter):
    image = Image.fromarray((np.random.default_rng(3).random((96, 96, 3)) * 255).astype(np.uint8))
    results = segmenter.segment(image, ["cat", "Cat", "grass"])
    assert [r.noun for r in results] == ["cat", "Cat", "grass"]
    assert grounding_prompt("Cat.") == "cat."
    for res in results:
        assert res.status in MASK_STATUSES
    ok = [r for r in results if r.status == "ok"]
    assert ok, [r.status for r in results]
    res = ok[0]
    assert 1 <= len(res.boxes) <= 2 and res.scores == sorted(res.scores, reverse=True)
    assert all(s > 0.4 for s in res.scores)
    # by hand: detector → top-2 boxes → SAM on the raw pixels (no cached embedding) → union
    d_proc, sam, s_proc = segmenter.detector_processor, segmenter.sam, segmenter.sam_processor
    inputs = d_proc(images=image, text=grounding_prompt(res.noun), return_tensors="pt")
    with torch.no_grad():
        det = d_proc.post_process_grounded_object_detection(
            segmenter.detector(**inputs),
            inputs["input_ids"],
            threshold=0.4,
            text_threshold=0.3,
            target_sizes=[(96, 96)],
        )[0]
        top = torch.topk(det["scores"], k=min(2, len(det["scores"]))).indices
        boxes = det["boxes"][top]
        sam_in = s_proc(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        out = sam(
            pixel_values=sam_in["pixel_values"], input_boxes=sam_in["input_boxes"], multimask_output=False
        )
    masks = s_proc.post_process_masks(
        out.pred_masks, sam_in["original_sizes"], mask_threshold=0.0, binarize=True
    )[0]
    expected = masks.any(dim=0)[0].numpy()
    assert np.array_equal(res.mask, expected)
    assert res.mask.shape == (96, 96) and res.pixels == int(expected.sum())
    assert np.allclose(res.boxes, boxes.numpy(), atol=0.01)
    # duplicates (case-insensitive) share the result
    assert results[0].status == results[1].status and np.array_equal(results[0].mask, results[1].mask)


def test_failures_are_reported_not_empty_masks(segmenter, monkeypatch):
    image = Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8))
    strict = GroundedSAM2(segmenter.detector, segmenter.detector_processor, segmenter.sam, segmenter.sam_processor,
                          box_threshold=1.01)  # fmt: skip
    assert [r.status for r in strict.segment(image, ["cat", "sky"])] == ["no_box", "no_box"]
    assert all(r.mask is None and r.pixels == 0 for r in strict.segment(image, ["cat"]))

    broken = GroundedSAM2(segmenter.detector, segmenter.detector_processor, segmenter.sam, segmenter.sam_processor,
                          box_threshold=0.0)  # fmt: skip

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(broken, "segment_boxes", boom)
    res = broken.segment(image, ["cat"])[0]
    assert res.status == "sam_error" and "out of memory" in res.error and res.boxes


# ---------------------------------------------------------------------- the command
def test_codsr_masks_end_to_end(models, dataset_dir, tmp_path, capsys):
    data, captions = dataset_dir
    out = tmp_path / "masks"
    gd, sam = models
    args = ["--data", data, "--out", out, "--crop", 96, "--grounding-dino", gd, "--sam2", sam,
            "--captions", captions, "--noun-backend", "spacy", "--device", "cpu"]  # fmt: skip
    assert _run(*args) == 0
    meta = read_sidecar(out, "a.png")
    assert meta["caption"] == "cat, black, grass" and meta["caption_source"] == "file"
    assert meta["nouns"] == ["cat", "grass"] and meta["noun_backend"] == "spacy"
    assert meta["image_size"] == [100, 120]
    assert meta["crop"] == {"top": 2, "left": 12, "size": 96, "mode": "center", "seed": 0}
    assert meta["models"]["box_threshold"] == 0.4 and meta["models"]["max_boxes"] == 2
    assert read_sidecar(out, "c.png")["crop"] == {
        "top": 0,
        "left": 0,
        "size": 96,
        "mode": "center",
        "seed": 0,
    }
    assert read_sidecar(out, "sub/b.png")["nouns"] == ["dog", "tree"]
    statuses = []
    for key in ("a.png", "sub/b.png", "c.png"):
        meta = read_sidecar(out, key)
        for entry in meta["masks"]:
            statuses.append(entry["status"])
            if entry["status"] == "ok":
                with Image.open((out / key).parent / entry["file"]) as im:
                    assert im.mode == "1" and im.size == (96, 96)
                    assert int(np.asarray(im).sum()) == entry["pixels"] > 0
            else:
                assert entry["file"] is None
        masks, ok = load_masks(out, key, meta)
        assert masks.shape == (len(meta["nouns"]), 96, 96) and masks.dtype == np.float32
        assert ok.tolist() == [e["status"] == "ok" for e in meta["masks"]]
    assert "ok" in statuses  # the tiny random models do find boxes above 0.4 for some nouns
    summary = json.loads((out / "summary-0-of-1.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 0 and summary["nouns"] == 5
    assert sum(summary["status"].values()) == 5 and sorted(statuses) == sorted(
        s for s, n in summary["status"].items() for _ in range(n)
    )
    # resumable: a second run skips everything
    assert _run(*args) == 0
    assert json.loads((out / "summary-0-of-1.json").read_text())["skipped_existing"] == 3
    assert "3 already done" in capsys.readouterr().err


def test_codsr_masks_shards_and_failures(models, dataset_dir, tmp_path, capsys):
    data, captions = dataset_dir
    gd, sam = models
    out = tmp_path / "masks"
    captions.write_text("a.png\tcat, grass\nc.png\tsky\n", encoding="utf-8")  # sub/b.png has none
    common = ["--data", data, "--out", out, "--crop", 96, "--grounding-dino", gd, "--sam2", sam,
              "--captions", captions, "--noun-backend", "spacy", "--box-threshold", 1.01]  # fmt: skip
    # sorted images: a.png, c.png, sub/b.png -> shard 1/2 holds c.png only
    assert _run(*common, "--shard", "1/2") == 0
    assert read_sidecar(out, "c.png") is not None and read_sidecar(out, "a.png") is None
    assert [e["status"] for e in read_sidecar(out, "c.png")["masks"]] == ["no_box"]
    assert _run(*common, "--shard", "0/2") == 1  # sub/b.png has no caption: reported, exit 1
    summary = json.loads((out / "summary-0-of-2.json").read_text())
    assert summary["failed"] == 1 and summary["failures"][0]["image"] == "sub/b.png"
    assert "no caption" in summary["failures"][0]["reason"]
    assert summary["status"] == {"no_box": 2}
    err = capsys.readouterr().err
    assert "cat: no_box" in err and "FAILED" in err


def test_codsr_masks_missing_models_fail_clearly(dataset_dir, tmp_path, capsys):
    data, captions = dataset_dir
    code = _run("--data", data, "--out", tmp_path / "m", "--crop", 96, "--captions", captions,
                "--noun-backend", "spacy", "--grounding-dino", tmp_path / "nowhere", "--sam2", tmp_path / "nowhere")  # fmt: skip
    assert code == 2
    assert "Grounding DINO could not be loaded" in capsys.readouterr().err


# ---------------------------------------------------------------------- the dataset
def _handmade_item(tmp_path):
    data, out = tmp_path / "hq", tmp_path / "masks"
    rgb = _noise_image(data / "img.png", 40, 30, 7)
    crop = choose_crop(30, 40, 16, "img.png")
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:6, 1:4] = True
    tiny = np.zeros((16, 16), dtype=bool)
    tiny[0, 0] = True
    results = [
        NounMask("cat", "ok", mask, [[1.0, 2.0, 4.0, 6.0]], [0.9]),
        NounMask("sky", "no_box"),
        NounMask("dot", "ok", tiny, [[0, 0, 1, 1]], [0.5]),
    ]
    write_item(out, "img.png", image_size=(30, 40), crop=crop, caption="cat, sky, dot", caption_source="file",
               nouns=["cat", "sky", "dot"], noun_backend="spacy", results=results)  # fmt: skip
    return data, out, rgb, crop, mask


def test_stage2_dataset_applies_stored_crop_and_shared_flip(tmp_path):
    data, out, rgb, crop, mask = _handmade_item(tmp_path)
    expected = torch.from_numpy(apply_crop(rgb, crop).copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    ds = Stage2Dataset(
        data, out, degrade=lambda hq, g: hq * 0.5, text_drop_rate=0.0, min_mask_pixels=2, seed=0
    )
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        flips.add(item["flipped"])
        hq, masks = item["hq"], item["masks"]
        if item["flipped"]:
            hq, masks = hq.flip(-1), masks.flip(-1)
        assert torch.allclose(hq, expected, atol=1e-6)
        assert torch.equal(masks[0], torch.from_numpy(mask).float())  # flipped together with the image
        assert masks[1].sum() == 0
        assert item["mask_valid"].tolist() == [True, False, False]  # failed noun; 1-pixel mask < 2
        assert item["nouns"] == ["cat", "sky", "dot"] and item["caption"] == item["prompt"] == "cat, sky, dot"
        assert torch.allclose(item["lq"], ((item["hq"] + 1) / 2 * 0.5) * 2 - 1, atol=1e-6)
        assert item["crop_box"].tolist() == [crop.top, crop.left, 16, 16]
    assert flips == {True, False}
    ds.set_epoch(2)
    assert torch.equal(ds[0]["hq"], ds[0]["hq"])  # items depend on (seed, epoch, index) only


def test_stage2_dataset_text_drop_missing_and_collate(tmp_path):
    data, out, rgb, crop, mask = _handmade_item(tmp_path)
    dropped = Stage2Dataset(data, out, text_drop_rate=1.0)[0]
    assert dropped["caption"] == "" and not dropped["mask_valid"].any() and "lq" not in dropped
    _noise_image(data / "new.png", 20, 20, 9)
    with pytest.raises(FileNotFoundError, match="new.png.json"):
        Stage2Dataset(data, out)
    ds = Stage2Dataset(data, out, missing="skip", text_drop_rate=0.0, degrade=realesrgan_degrade())
    assert len(ds) == 1 and ds.num_missing == 1
    item = ds[0]
    assert item["lq"].shape == (3, 16, 16) and item["lq"].min() >= -1 and item["lq"].max() <= 1
    empty = dict(item, nouns=[], masks=torch.zeros(0, 16, 16), mask_valid=torch.zeros(0, dtype=torch.bool))
    batch = stage2_collate([item, empty])
    assert batch["masks"].shape == (2, 3, 16, 16) and batch["mask_valid"].shape == (2, 3)
    assert batch["mask_valid"][1].tolist() == [False, False, False] and batch["num_nouns"].tolist() == [3, 0]
    assert batch["hq"].shape == (2, 3, 16, 16) and batch["nouns"] == [["cat", "sky", "dot"], []]
    Image.fromarray(rgb[:20]).save(data / "img.png")  # the image changed after the masks were made
    with pytest.raises(ValueError, match="codsr masks --overwrite"):
        Stage2Dataset(data, out, missing="skip")[0]

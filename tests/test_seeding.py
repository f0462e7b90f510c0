"""codsr.seeding: the one per-image seed formula (codsr upscale, batch runs, benchmark runner)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
from PIL import Image

from codsr import batch, evaluation
from codsr.evaluation import ResumeMismatchError
from codsr.evaluation.benchmark import restore_folder
from codsr.seeding import SEED_RULE, image_seed


def test_known_values():
    # sha256(b"42/sub/photo 1.jpg")[:4] big-endian, written out so a change of rule is caught.
    assert hashlib.sha256(b"42/sub/photo 1.jpg").digest()[:4].hex() == "1d0b559b"
    assert image_seed(42, "sub/photo 1.jpg") == 0x1D0B559B == 487282075
    assert image_seed(0, "a.png") == 3325714861 and image_seed(1, "a.png") == 326923706
    assert image_seed(42, "Canon_10_x1.png") == 348317088
    assert "sha256" in SEED_RULE and "[:4]" in SEED_RULE


def test_names_are_normalised():
    assert image_seed(42, "sub\\photo 1.jpg") == image_seed(42, Path("sub") / "photo 1.jpg") == 487282075
    assert image_seed(42, PureWindowsPath("sub\\photo 1.jpg")) == 487282075
    assert image_seed(0, unicodedata.normalize("NFD", "café.png")) == image_seed(0, "café.png")
    assert image_seed("7", "x") == image_seed(7, "x")  # the base seed is read as an int


def test_upscale_and_benchmark_use_the_same_function():
    assert batch.image_seed is image_seed and evaluation.image_seed is image_seed


def test_benchmark_outputs_depend_only_on_the_seed(tmp_path):
    """Two runs give the same seeds and bit-identical images, which follow from the seed alone."""
    lq = tmp_path / "lq"
    lq.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(lq / f"im{i}.png")

    def restore(img, seed):
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))

    restore_folder(lq, tmp_path / "a", restore, seed=9)
    restore_folder(lq, tmp_path / "b", restore, seed=9)
    for i in range(3):
        a, b = (np.asarray(Image.open(tmp_path / d / f"im{i}.png")) for d in "ab")
        np.testing.assert_array_equal(a, b)
        expected = np.random.default_rng(image_seed(9, f"im{i}.png")).integers(0, 256, (8, 8, 3), np.uint8)
        np.testing.assert_array_equal(a, expected)


def test_resume_refuses_a_run_made_with_another_seed_rule(tmp_path):
    lq = tmp_path / "lq"
    lq.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(lq / "im0.png")
    out = tmp_path / "out"
    restore_folder(lq, out, lambda img, seed: img, seed=1)
    manifest = json.loads((out / "benchmark_manifest.json").read_text())
    assert manifest["seed_rule"] == SEED_RULE and manifest["images"]["im0.png"]["seed"] == image_seed(
        1, "im0.png"
    )
    manifest["seed_rule"] = "int.from_bytes(sha256(f'{seed}:{lq_file_name}'.encode()).digest()[:8], 'big')"
    (out / "benchmark_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeMismatchError, match="seed_rule"):
        restore_folder(lq, out, lambda img, seed: img, seed=1)

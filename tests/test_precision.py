"""codsr.precision: the one map from precision names to torch dtypes, and device defaults."""

from __future__ import annotations

import pytest
import torch

from codsr.precision import PRECISIONS, default_precision, precision_name, resolve_dtype


def test_names_and_aliases():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    for name, dtype in [
        ("fp32", torch.float32), ("float32", torch.float32), ("FLOAT", torch.float32),
        ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16), ("half", torch.float16), (" float16 ", torch.float16),
    ]:  # fmt: skip
        assert resolve_dtype(name) is dtype, name
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert precision_name(torch.float16) == "fp16" and precision_name("BFloat16") == "bf16"


def test_device_defaults():
    assert default_precision(None) == default_precision("cpu") == "fp32"
    assert default_precision("cuda") == default_precision("cuda:1") == default_precision("mps") == "fp16"
    assert default_precision(torch.device("cpu")) == "fp32"
    assert resolve_dtype(None, "cuda:0") is torch.float16 and resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("AUTO", torch.device("mps")) is torch.float16 and resolve_dtype() is torch.float32


@pytest.mark.parametrize("bad", ["int8", "fp64", torch.float64, "", "f p 3 2"])
def test_unknown_names_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match=r"unknown precision .*use one of fp32, bf16, fp16"):
        resolve_dtype(bad)


def test_tagger_reports_a_bad_dtype_before_loading(tmp_path):
    from codsr.tagging.tagger import RAMTagger

    with pytest.raises(ValueError, match=r"torch_dtype: unknown precision 'int8'"):
        RAMTagger.from_pretrained(tmp_path / "missing.pth", torch_dtype="int8")

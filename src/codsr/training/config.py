"""Training configuration: one typed tree (pydantic v2), read from YAML + ``--set key=value`` overrides.

A config file is a nested mapping whose sections mirror the models below; :func:`load_config` turns
it into a validated :class:`TrainConfig`. Each leaf has one type and one default, written once
here; the shipped ``configs/stage1.yaml`` is exactly these defaults. The top-level keys
``output_dir``, ``max_steps``, ``seed`` and ``resume`` keep these names (tools rely on them).

Every error is a :class:`ConfigError` that names the dotted key (``optim.lr``), where the value
came from (the YAML file, or the ``--set`` override) and what is expected, e.g.::

    configs/stage1.yaml: config key 'train.batch_size' must be an integer, got 'four'
    configs/stage1.yaml with --set optim.lrr=1: unknown config key 'optim.lrr'; valid keys of
        section 'optim': lr, betas, weight_decay, eps, lr_scheduler, warmup_steps

``--config`` accepts a path, or a bare name (``stage1``, ``tiny/stage1``) resolved against the
configs shipped inside the package (``codsr/configs/<name>.yaml``); the repository's top-level
``configs/`` folder holds links to those same files.

Overrides use dotted keys; values are parsed as YAML (``gan.enabled=false``, ``optim.betas=[0.9,
0.99]``, ``resume=latest``). Types are checked strictly (``true`` is not an integer, ``1`` is not
a boolean), with three conveniences for YAML: numbers such as ``1e-4`` that YAML 1.1 reads as
strings are accepted for number fields, ``stage: 1`` means ``"1"``, and one path where a list of
paths is expected (``data.train_hq=/data/hq``) becomes a one-item list.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from codsr.model.checkpoint import DEFAULT_BASE_MODEL
from codsr.precision import PRECISIONS

__all__ = [
    "CONFIG_DIR",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "GANConfig",
    "LoggingConfig",
    "LossConfig",
    "MasksConfig",
    "ModelConfig",
    "OptimConfig",
    "PromptConfig",
    "TMGConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "VAEPretrainConfig",
    "VSDConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_config",
    "load_config_dict",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot be used.

    ``str(error)`` is ``"<source>: <message>"``; the message names the dotted ``key``; ``source``
    is the YAML file and/or the ``--set`` override the value came from (None when unknown).
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.message, self.key, self.source = message, key, source
        super().__init__(f"{source}: {message}" if source else message)


# ----------------------------------------------------------------------------------- leaf types
def _yaml_number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string: accept it for a number field."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # the strict float check reports it
    return value


def _one_path_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _stage_name(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _no_is_false(value: Any) -> Any:
    return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


Float = Annotated[float, BeforeValidator(_yaml_number)]
Probability = Annotated[float, BeforeValidator(_yaml_number), Field(ge=0.0, le=1.0)]
NonNegFloat = Annotated[float, BeforeValidator(_yaml_number), Field(ge=0.0)]
PosFloat = Annotated[float, BeforeValidator(_yaml_number), Field(gt=0.0)]
Betas = Annotated[
    list[Annotated[float, BeforeValidator(_yaml_number), Field(ge=0.0, lt=1.0)]],
    Field(min_length=2, max_length=2),
]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Timestep = Annotated[int, Field(ge=0, le=999)]
CropSize = Annotated[int, Field(ge=8, multiple_of=8)]
Paths = Annotated[list[str] | None, BeforeValidator(_one_path_as_list)]


class _Section(BaseModel):
    """A config section: unknown keys are errors, leaf types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


# ----------------------------------------------------------------------------------- sections
class ModelConfig(_Section):
    """Base model and LoRA layout (docs/method.md#base-model, #lora-layout)."""

    base_model: str = DEFAULT_BASE_MODEL  # Hub id or local diffusers folder
    revision: str | None = None
    rank_vae: PosInt = 4
    rank_unet: PosInt = 16
    # Start from an existing CODSR checkpoint (.pkl / .safetensors) instead of fresh adapters.
    init_checkpoint: str | None = None


class DataConfig(_Section):
    """Training data (docs/method.md#stage-1). Either ``train_hq`` (HQ images, LQ synthesised
    with the Real-ESRGAN degradation) or ``train_lq_dir`` + ``train_hq_dir`` (pre-degraded pairs)."""

    train_hq: Paths = None  # folders, .txt lists or image files
    train_lq_dir: str | None = None
    train_hq_dir: str | None = None
    crop_size: CropSize = 512
    flip: bool = True
    # "worker": degrade each crop in the DataLoader workers; "batch": degrade the batch on the
    # training device (Real-ESRGAN style, BatchDegrader).
    degrade_in: Literal["worker", "batch"] = "worker"
    # codsr.data.DegradationConfig overrides; keys and values are checked against it on load.
    degradation: dict[str, Any] = Field(default_factory=dict)
    # How the LQ is resized back to the crop for the generator (docs/training.md#lq-resize):
    # "release" = the authors' loader (PIL on the 8-bit LQ, filter drawn from
    # degradation.resize_back_modes); "inference" = PIL bicubic in float, exactly as inference
    # upsamples every input; "torch" = F.interpolate with a drawn mode (earlier behaviour).
    lq_resize: Literal["release", "inference", "torch"] = "release"
    small_images: Literal["pad", "skip"] = "pad"
    num_workers: NonNegInt = 8

    @field_validator("degradation")
    @classmethod
    def _degradation_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            return value
        from codsr.data.degradation import DegradationConfig

        names = [f.name for f in dataclasses.fields(DegradationConfig)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            key = f"data.degradation.{unknown[0]}"
            raise ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(names)}", key=key)
        try:
            DegradationConfig(**value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'data.degradation': {e}", key="data.degradation") from e
        return value


class PromptConfig(_Section):
    """Prompts (docs/method.md#stage-1: RAM tags of the HQ crop). ``mode``: ``"none"`` (empty
    prompt), ``"file"`` (per-image prompts from a ``codsr tag`` TSV/JSON file), ``"ram"`` (tag each
    HQ crop with RAM on the fly, cached per crop) or, in stage 2 with precomputed masks,
    ``"masks"`` (the caption stored with each crop's masks by ``codsr masks``)."""

    mode: Literal["none", "file", "ram", "masks"] = "ram"
    file: str | None = None
    # Null-text dropout: the release intends 0.2 but its stage-1 code never applies it
    # (docs/method.md#release-differences).
    null_text_prob: Probability = 0.0
    ram_weights: str | None = None  # default: codsr.tagging.hub.DEFAULT_RAM
    cache_dir: str | None = None  # tag cache; default <output_dir>/tag_cache


class TrainLoopConfig(_Section):
    """Batching, precision and the timestep range (docs/method.md#generator-forward, #stage-1)."""

    batch_size: PosInt = 4  # per device and micro-step
    # Global batch = batch_size × gradient_accumulation_steps × processes. Give one of the two;
    # gradient_accumulation_steps is derived from global_batch_size when it is null.
    global_batch_size: PosInt | None = 16
    gradient_accumulation_steps: PosInt | None = None
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_no_is_false)] = "fp16"
    gradient_checkpointing: bool = False
    max_grad_norm: PosFloat = 1.0
    timestep_min: Timestep = 50  # t ~ U{timestep_min..timestep_max} per sample
    timestep_max: Timestep = 250
    allow_tf32: bool = True


class OptimConfig(_Section):
    """AdamW for the generator (docs/method.md#stage-1)."""

    lr: PosFloat = 5.0e-5
    betas: Betas = Field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegFloat = 1.0e-2
    eps: PosFloat = 1.0e-8
    lr_scheduler: Literal["constant", "constant_with_warmup"] = "constant"  # release: constant
    warmup_steps: NonNegInt = 0


class LossConfig(_Section):
    """Reconstruction loss ``mse_weight·MSE + lpips_weight·LPIPS-VGG`` (docs/method.md#stage-1)."""

    mse_weight: NonNegFloat = 1.0
    lpips_weight: NonNegFloat = 2.0
    # False = random VGG trunk: for tests only; must be asked for explicitly.
    lpips_pretrained: bool = True
    vgg_weights: str | None = None


class GANConfig(_Section):
    """Vision-aided DINO GAN (docs/method.md#stage-1); active from ``start_step`` on."""

    enabled: bool = True
    weight: NonNegFloat = 0.2
    start_step: NonNegInt = 3000
    lr: PosFloat = 5.0e-5
    betas: Betas = Field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegFloat = 1.0e-2
    max_grad_norm: PosFloat = 1.0
    backbone_weights: str | None = None
    pretrained_backbone: bool = True  # False: random backbone (tests only)
    backbone_arch: dict[str, Any] = Field(default_factory=dict)  # timm kwargs (tests: a tiny ViT)
    feature_blocks: list[NonNegInt] = Field(default_factory=lambda: [4, 8, 11])
    diffaug_policy: str = "color,translation,cutout"
    blur_taps: PosInt = 4


class EMAConfig(_Section):
    """Optional EMA of the trainable weights (HYPIR-style; not in the release)."""

    enabled: bool = False
    decay: Annotated[float, BeforeValidator(_yaml_number), Field(gt=0.0, lt=1.0)] = 0.999


class LoggingConfig(_Section):
    log_every: PosInt = 10
    tensorboard: bool = True
    progress_bar: bool = True


class CheckpointConfig(_Section):
    """``every``: write a CODSR checkpoint (release ``.pkl`` and/or ``.safetensors``) every N steps
    and at the end. ``state_every``: write the full training state for exact resume (default:
    ``every``); ``keep_states`` most recent states are kept."""

    every: PosInt = 1000
    format: Literal["pkl", "safetensors", "both"] = "pkl"  # pkl: the release format
    state_every: PosInt | None = None
    keep_states: PosInt = 2


class ValidationConfig(_Section):
    """Periodic validation images and PSNR (``every`` = 0 disables). Images come from
    ``lq_dir`` + ``hq_dir`` (pairs) or from ``hq`` (HQ images degraded with a fixed seed)."""

    every: NonNegInt = 500
    lq_dir: str | None = None
    hq_dir: str | None = None
    hq: Paths = None
    num_images: PosInt = 4
    crop_size: CropSize = 512
    timestep: Timestep = 100
    seed: NonNegInt = 1234


class VAEPretrainConfig(_Section):
    """Tiny recipe only: autoencoder pre-training of a random VAE (MSE + kl_weight·KL)."""

    kl_weight: NonNegFloat = 1.0e-6
    # Set vae.config.scaling_factor = 1/std(latent) (SD's recipe) when the model is exported.
    calibrate_scaling_factor: bool = True


class TMGConfig(_Section):
    """Stage 2: text-matching guidance (paper §3.3, docs/method.md#stage-2). Release: the first
    attn2 layer, ``0.5·L_area + 0.025·L_bce``; paper: ``layers: all``, ``area_weight: 1``,
    ``bce_weight: 0``."""

    layers: Literal["first", "all"] = "first"  # "all" (paper): mean over every attn2 layer
    area_weight: NonNegFloat = 0.5
    bce_weight: NonNegFloat = 0.025
    min_mask_pixels: PosInt = 1  # a mask with fewer positive pixels is ignored


class VSDConfig(_Section):
    """Stage 2: VSD regulariser (paper Eq. 5, docs/method.md#stage-2): weight, fake-score LoRA
    and its optimizer."""

    weight: NonNegFloat = 2.0  # 0 disables VSD (no second UNet is loaded)
    rank: PosInt = 4  # fake-score LoRA rank
    guidance_scale: NonNegFloat = 7.5  # real-score CFG
    negative_prompt: str | None = None  # null: the release's (codsr.stage2.vsd.NEGATIVE_PROMPT)
    timestep_min: Timestep = 20  # VSD t ~ U{timestep_min..timestep_max}
    timestep_max: Timestep = 979
    lr: PosFloat = 5.0e-5
    betas: Betas = Field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegFloat = 1.0e-2
    max_grad_norm: PosFloat = 1.0
    # dtype of the frozen SD UNet shared by both scores: "auto" = the mixed-precision dtype on a
    # GPU, float32 on the CPU. The fake-score LoRA stays float32.
    base_dtype: Literal[("auto", *PRECISIONS)] = "auto"  # type: ignore[valid-type]


class MasksConfig(_Section):
    """Stage 2: where the TMG masks come from (docs/method.md#stage-2). ``offline``: the folder
    written by ``codsr masks`` (``dir``); ``online``: Grounded-SAM2 on each HQ crop in the loop."""

    mode: Literal["offline", "online"] = "offline"
    dir: str | None = None  # offline: the --out folder of `codsr masks` (with data.train_hq = its --data)
    missing: Literal["error", "skip"] = "error"  # offline: images without a finished sidecar
    grounding_dino: str = "IDEA-Research/grounding-dino-tiny"  # online: Hub id or local folder
    sam2: str = "facebook/sam2.1-hiera-large"
    box_threshold: Float = 0.4
    text_threshold: Float = 0.3
    max_boxes: PosInt = 2
    noun_backend: Literal["auto", "nltk", "spacy"] = "auto"  # online noun extraction


class TrainConfig(_Section):
    """The whole training configuration (the root of the tree)."""

    stage: Annotated[Literal["1", "2", "vae"], BeforeValidator(_stage_name)] = "1"
    output_dir: Annotated[str, Field(min_length=1)] = "runs/stage1"
    max_steps: NonNegInt = 14000
    seed: NonNegInt = 0
    resume: str | None = None  # null, "latest" or a training-state folder
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    gan: GANConfig = Field(default_factory=GANConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    vae: VAEPretrainConfig = Field(default_factory=VAEPretrainConfig)
    tmg: TMGConfig = Field(default_factory=TMGConfig)
    vsd: VSDConfig = Field(default_factory=VSDConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls, values: dict[str, Any] | None, *, source: str | Path | None = None, overrides: Sequence[str] = ()
    ) -> TrainConfig:
        """Build and validate from a nested mapping. ``source`` (the YAML file) and ``overrides``
        (the ``--set`` items applied to it) only make error messages say where a value came from."""
        try:
            return cls.model_validate(dict(values or {}))
        except ValidationError as e:
            raise _config_error(e, _Origin(source, overrides)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested mapping; ``TrainConfig.from_dict(cfg.to_dict()) == cfg``."""
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ derived values
    def accumulation_steps(self, num_processes: int = 1) -> int:
        """Micro-steps per optimizer step, from ``train.gradient_accumulation_steps`` or
        ``train.global_batch_size / (train.batch_size × num_processes)``."""
        t = self.train
        per_step = t.batch_size * num_processes
        if t.gradient_accumulation_steps is not None:
            accum = t.gradient_accumulation_steps
            if t.global_batch_size is not None and t.global_batch_size != per_step * accum:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} != train.batch_size ({t.batch_size}) × "
                    f"train.gradient_accumulation_steps ({accum}) × {num_processes} process(es); "
                    "set one of them to null",
                    key="train.global_batch_size",
                )
            return accum
        if t.global_batch_size is None:
            return 1
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.batch_size "
                f"({t.batch_size}) × {num_processes} process(es); change one, or set "
                "train.gradient_accumulation_steps and train.global_batch_size=null",
                key="train.global_batch_size",
            )
        return t.global_batch_size // per_step

    @property
    def state_every(self) -> int:
        c = self.checkpoint
        return c.every if c.state_every is None else c.state_every

    # ------------------------------------------------------------------ cross-key rules
    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        """Rules that tie several keys together (single keys are checked by their types)."""
        d, p, t, g, v = self.data, self.prompts, self.train, self.gan, self.validation
        paired = d.train_lq_dir is not None or d.train_hq_dir is not None
        _check(
            not (paired and d.train_hq),
            "data.train_hq",
            "give either data.train_hq (synthetic LQ) or data.train_lq_dir + data.train_hq_dir (pairs), not both",
        )
        _check(
            not paired or (d.train_lq_dir is not None and d.train_hq_dir is not None),
            "data.train_lq_dir" if d.train_lq_dir is None else "data.train_hq_dir",
            "paired data needs both data.train_lq_dir and data.train_hq_dir",
        )
        _check(
            p.mode != "file" or bool(p.file),
            "prompts.file",
            "prompts.mode='file' needs prompts.file (a `codsr tag` TSV or JSON)",
        )
        _check(
            t.timestep_min <= t.timestep_max,
            "train.timestep_min",
            f"need train.timestep_min ({t.timestep_min}) <= train.timestep_max ({t.timestep_max})",
        )
        _check(
            g.pretrained_backbone or g.backbone_weights is None,
            "gan.backbone_weights",
            "is set but gan.pretrained_backbone is false; drop one",
        )
        _check(
            (v.lq_dir is None) == (v.hq_dir is None),
            "validation.lq_dir",
            "give both validation.lq_dir and validation.hq_dir, or neither",
        )
        _check(
            not (v.hq and v.lq_dir),
            "validation.hq",
            "give validation.hq or validation.lq_dir/hq_dir, not both",
        )
        self._check_stage2()
        self.accumulation_steps(1)  # global batch consistency
        return self

    def _check_stage2(self) -> None:
        """How the stage-2 sections (``tmg``, ``vsd``, ``masks``) combine with the others."""
        vs, mk, p = self.vsd, self.masks, self.prompts
        _check(
            vs.timestep_min <= vs.timestep_max,
            "vsd.timestep_min",
            f"need vsd.timestep_min ({vs.timestep_min}) <= vsd.timestep_max ({vs.timestep_max})",
        )
        if self.stage != "2":
            _check(
                p.mode != "masks",
                "prompts.mode",
                "'masks' (captions of `codsr masks`) exists in stage 2 only",
            )
            return
        _check(
            not self.gan.enabled,
            "gan.enabled",
            "must be false in stage 2: stage 2 has no GAN term (docs/method.md#stage-2)",
        )
        _check(
            self.data.degrade_in == "worker",
            "data.degrade_in",
            f"must be 'worker' in stage 2 (degradation runs in the DataLoader workers), got {self.data.degrade_in!r}",
        )
        if mk.mode == "offline":
            _check(
                p.mode == "masks",
                "prompts.mode",
                f"must be 'masks' with masks.mode=offline (the captions are stored with the masks), got {p.mode!r}",
            )
        else:
            _check(
                p.mode in ("file", "ram"),
                "prompts.mode",
                f"must be 'file' or 'ram' with masks.mode=online (TMG needs captions), got {p.mode!r}",
            )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}", key=key)


# ----------------------------------------------------------------------------------- errors
class _Origin:
    """Where a key's value came from: the YAML file, or the last ``--set`` override touching it."""

    def __init__(self, source: str | Path | None, overrides: Sequence[str]) -> None:
        self.source = str(source) if source is not None else None
        self.overrides = [(item.partition("=")[0].strip(), item) for item in overrides]

    def of(self, key: str | None) -> str | None:
        for okey, item in reversed(self.overrides):
            if key is not None and (
                key == okey or key.startswith((okey + ".", okey + "[")) or okey.startswith(key + ".")
            ):
                return f"{self.source} with --set {item}" if self.source else f"--set {item}"
        return self.source


_CONSTRAINT_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "multiple_of",
    "too_short",
    "too_long",
    "string_too_short",
    "literal_error",
}


def _config_error(error: ValidationError, origin: _Origin) -> ConfigError:
    """One :class:`ConfigError` for pydantic's errors (one line each), naming keys and the source."""
    lines: list[tuple[str | None, str]] = []
    for err in error.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # raised by a validator of ours: already names its key
            lines.append((cause.key, cause.message))
            continue
        key = _dotted(err["loc"])
        if err["type"] == "extra_forbidden":
            section = ".".join(str(part) for part in err["loc"][:-1])
            valid = ", ".join(_model_at(err["loc"][:-1]).model_fields)
            where = f"section '{section}'" if section else "the top level"
            lines.append((key, f"unknown config key '{key}'; valid keys of {where}: {valid}"))
        else:
            if err["type"] in _CONSTRAINT_ERRORS:  # a value of the right type out of its domain
                wanted = err["msg"].replace("Input should be", "must be")
            else:  # a value of the wrong type
                wanted = f"must be {_expected(err['loc'])}"
            lines.append((key, f"config key '{key}' {wanted}, got {err['input']!r}"))
    key = lines[0][0]
    sources = {origin.of(k) for k, _ in lines}
    if len(sources) == 1:
        return ConfigError("\n".join(m for _, m in lines), key=key, source=sources.pop())
    return ConfigError("\n".join(f"{origin.of(k)}: {m}" for k, m in lines), key=key)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    tp: Any = TrainConfig
    for part in loc:
        tp = tp.model_fields[part].annotation
    return tp


def _strip(tp: Any) -> tuple[Any, bool]:
    """(annotation without Annotated/None, whether null is allowed)."""
    nullable = False
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return tp, nullable
            tp = args[0]
        else:
            return tp, nullable


def _describe(tp: Any) -> str:
    tp, nullable = _strip(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        text = "true or false"
    elif tp is int:
        text = "an integer"
    elif tp is float:
        text = "a number"
    elif tp is str:
        text = "a string"
    elif origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif origin is list:
        text = f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict:
        text = "a mapping"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = "a mapping (a config section)"
    else:
        text = str(tp).replace("typing.", "")
    return f"{text} or null" if nullable else text


def _expected(loc: tuple[int | str, ...]) -> str:
    """What the field at ``loc`` takes, in words (``an integer``, ``a list of numbers``...)."""
    tp: Any = TrainConfig
    for part in loc:
        bare, _ = _strip(tp)
        if isinstance(bare, type) and issubclass(bare, BaseModel) and isinstance(part, str):
            if part not in bare.model_fields:
                break
            tp = bare.model_fields[part].annotation
        elif typing.get_origin(bare) is list and isinstance(part, int):
            tp = typing.get_args(bare)[0]
        else:
            break  # a union member tag or a dict key: describe what we have
    return _describe(tp)


# ----------------------------------------------------------------------------------- files
def resolve_config_path(config: str | Path) -> Path:
    """A config path as given, or a bare name (``stage1``, ``tiny/stage1``) shipped in the package."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = str(config)
    if not path.is_absolute():
        for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / name):
            if candidate.is_file():
                return candidate
    shipped = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
    raise FileNotFoundError(
        f"config {str(config)!r} is not a file and not a config shipped with codsr; shipped configs: {shipped}"
    )


def load_config_dict(config: str | Path) -> dict[str, Any]:
    """Read a YAML config (path or shipped name) into a plain mapping."""
    path = resolve_config_path(config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({e})", source=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping at the top level, got {type(data).__name__}", source=str(path)
        )
    return data


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e
        node = values
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {item!r}: config key '{section}' is a value, not a section", key=section
                )
            node = child
        node[parts[-1]] = value
    return values


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load ``config`` (path, shipped name, or ``None`` for the defaults), apply ``--set``
    overrides, and validate into a :class:`TrainConfig`; any error is a :class:`ConfigError`."""
    path = resolve_config_path(config) if config is not None else None
    values = load_config_dict(path) if path is not None else {}
    apply_overrides(values, overrides)
    return TrainConfig.from_dict(values, source=path, overrides=overrides)

"""Training configuration: YAML files + ``--set key=value`` overrides → typed, validated dataclasses.

A config file is a nested mapping whose sections mirror the dataclasses below. The top-level keys
``output_dir``, ``max_steps``, ``seed`` and ``resume`` keep these names (tools rely on them).
Every error names the offending dotted key (``optim.lr``) and what would fix it.

``--config`` accepts a path, or a bare name (``stage1``, ``tiny/stage1``) resolved against the
configs shipped inside the package (``codsr/configs/<name>.yaml``); the repository's top-level
``configs/`` folder holds links to those same files.

Overrides use dotted keys; values are parsed as YAML (``gan.enabled=false``, ``optim.betas=[0.9,
0.99]``, ``resume=latest``); numbers such as ``1e-4`` that YAML 1.1 reads as strings are
converted for numeric fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codsr.model.checkpoint import DEFAULT_BASE_MODEL

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
MIXED_PRECISION = ("no", "fp16", "bf16")
STAGES = ("1", "2", "vae")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the dotted key."""


# ----------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Base model and LoRA layout (SPEC §1, §5)."""

    base_model: str = DEFAULT_BASE_MODEL  # Hub id or local diffusers folder
    revision: str | None = None
    rank_vae: int = 4
    rank_unet: int = 16
    # Start from an existing CODSR checkpoint (.pkl / .safetensors) instead of fresh adapters.
    init_checkpoint: str | None = None


@dataclass
class DataConfig:
    """Training data (SPEC §8). Either ``train_hq`` (HQ images, LQ synthesised with the
    Real-ESRGAN degradation) or ``train_lq_dir`` + ``train_hq_dir`` (pre-degraded pairs)."""

    train_hq: list[str] | None = None  # folders, .txt lists or image files
    train_lq_dir: str | None = None
    train_hq_dir: str | None = None
    crop_size: int = 512
    flip: bool = True
    # "worker": degrade each crop in the DataLoader workers; "batch": degrade the batch on the
    # training device (Real-ESRGAN style, BatchDegrader).
    degrade_in: str = "worker"
    degradation: dict[str, Any] = field(default_factory=dict)  # DegradationConfig overrides
    small_images: str = "pad"
    num_workers: int = 8


@dataclass
class PromptConfig:
    """Prompts (SPEC §8: RAM tags of the HQ crop). ``mode``: ``"none"`` (empty prompt),
    ``"file"`` (per-image prompts from a ``codsr tag`` TSV/JSON file), ``"ram"`` (tag each HQ
    crop with RAM on the fly, cached per crop) or, in stage 2 with precomputed masks,
    ``"masks"`` (the caption stored with each crop's masks by ``codsr masks``)."""

    mode: str = "ram"
    file: str | None = None
    # Null-text dropout: the release intends 0.2 but its stage-1 code never applies it (SPEC §8/§11).
    null_text_prob: float = 0.0
    ram_weights: str | None = None  # default: codsr.tagging.hub.DEFAULT_RAM
    cache_dir: str | None = None  # tag cache; default <output_dir>/tag_cache


@dataclass
class TrainLoopConfig:
    """Batching, precision and the timestep range (SPEC §2, §8)."""

    batch_size: int = 4  # per device and micro-step
    # Global batch = batch_size × gradient_accumulation_steps × processes. Give one of the two;
    # gradient_accumulation_steps is derived from global_batch_size when it is null.
    global_batch_size: int | None = 16
    gradient_accumulation_steps: int | None = None
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    timestep_min: int = 50  # t ~ U{timestep_min..timestep_max} per sample
    timestep_max: int = 250
    allow_tf32: bool = True


@dataclass
class OptimConfig:
    """AdamW for the generator (SPEC §8)."""

    lr: float = 5.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    eps: float = 1.0e-8
    lr_scheduler: str = "constant"  # "constant" (release) or "constant_with_warmup"
    warmup_steps: int = 0


@dataclass
class LossConfig:
    """Reconstruction loss ``mse_weight·MSE + lpips_weight·LPIPS-VGG`` (SPEC §8)."""

    mse_weight: float = 1.0
    lpips_weight: float = 2.0
    # False = random VGG trunk: for tests only; must be asked for explicitly.
    lpips_pretrained: bool = True
    vgg_weights: str | None = None


@dataclass
class GANConfig:
    """Vision-aided DINO GAN (SPEC §8); active from ``start_step`` on."""

    enabled: bool = True
    weight: float = 0.2
    start_step: int = 3000
    lr: float = 5.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    max_grad_norm: float = 1.0
    backbone_weights: str | None = None
    pretrained_backbone: bool = True  # False: random backbone (tests only)
    backbone_arch: dict[str, Any] = field(default_factory=dict)  # timm overrides (tests: a tiny ViT)
    feature_blocks: list[int] = field(default_factory=lambda: [4, 8, 11])
    diffaug_policy: str = "color,translation,cutout"
    blur_taps: int = 4


@dataclass
class EMAConfig:
    """Optional EMA of the trainable weights (HYPIR-style; not in the release)."""

    enabled: bool = False
    decay: float = 0.999


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    """``every``: write a CODSR checkpoint (release ``.pkl`` and/or ``.safetensors``) every N steps
    and at the end. ``state_every``: write the full training state for exact resume (default:
    ``every``); ``keep_states`` most recent states are kept."""

    every: int = 1000
    format: str = "pkl"  # "pkl" (release format), "safetensors" or "both"
    state_every: int | None = None
    keep_states: int = 2


@dataclass
class ValidationConfig:
    """Periodic validation images and PSNR (``every`` = 0 disables). Images come from
    ``lq_dir`` + ``hq_dir`` (pairs) or from ``hq`` (HQ images degraded with a fixed seed)."""

    every: int = 500
    lq_dir: str | None = None
    hq_dir: str | None = None
    hq: list[str] | None = None
    num_images: int = 4
    crop_size: int = 512
    timestep: int = 100
    seed: int = 1234


@dataclass
class VAEPretrainConfig:
    """Tiny recipe only: autoencoder pre-training of a random VAE (MSE + kl_weight·KL)."""

    kl_weight: float = 1.0e-6
    # Set vae.config.scaling_factor = 1/std(latent) (SD's recipe) when the model is exported.
    calibrate_scaling_factor: bool = True


@dataclass
class TMGConfig:
    """Stage 2: text-matching guidance (SPEC §9 "TMG"). Release: the first attn2 layer,
    ``0.5·L_area + 0.025·L_bce``; paper: ``layers: all``, ``area_weight: 1``, ``bce_weight: 0``."""

    layers: str = "first"  # "first" (release) or "all" (paper: mean over every attn2 layer)
    area_weight: float = 0.5
    bce_weight: float = 0.025
    min_mask_pixels: int = 1  # a mask with fewer positive pixels is ignored


@dataclass
class VSDConfig:
    """Stage 2: VSD regulariser (SPEC §9 "VSD"): weight, fake-score LoRA and its optimizer."""

    weight: float = 2.0  # 0 disables VSD (no second UNet is loaded)
    rank: int = 4  # fake-score LoRA rank
    guidance_scale: float = 7.5  # real-score CFG
    negative_prompt: str | None = None  # null: the release's (codsr.stage2.vsd.NEGATIVE_PROMPT)
    timestep_min: int = 20  # VSD t ~ U{timestep_min..timestep_max}
    timestep_max: int = 979
    lr: float = 5.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    max_grad_norm: float = 1.0
    # dtype of the frozen SD UNet shared by both scores: "auto" = the mixed-precision dtype on a
    # GPU, float32 on the CPU; "fp32" | "bf16" | "fp16". The fake-score LoRA stays float32.
    base_dtype: str = "auto"


@dataclass
class MasksConfig:
    """Stage 2: where the TMG masks come from (SPEC §9 "Masks"). ``offline``: the folder written
    by ``codsr masks`` (``dir``); ``online``: Grounded-SAM2 on each HQ crop in the training loop."""

    mode: str = "offline"
    dir: str | None = None  # offline: the --out folder of `codsr masks` (with data.train_hq = its --data)
    missing: str = "error"  # offline: "error" or "skip" images without a finished sidecar
    grounding_dino: str = "IDEA-Research/grounding-dino-tiny"  # online: Hub id or local folder
    sam2: str = "facebook/sam2.1-hiera-large"
    box_threshold: float = 0.4
    text_threshold: float = 0.3
    max_boxes: int = 2
    noun_backend: str = "auto"  # online: "auto" | "nltk" | "spacy"


@dataclass
class TrainConfig:
    """The whole training configuration."""

    stage: str = "1"
    output_dir: str = "runs/stage1"
    max_steps: int = 14000
    seed: int = 0
    resume: str | None = None  # null, "latest" or a training-state folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    vae: VAEPretrainConfig = field(default_factory=VAEPretrainConfig)
    tmg: TMGConfig = field(default_factory=TMGConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build and validate from a nested mapping; unknown keys and bad types name the key."""
        cfg = _build(cls, dict(values or {}), "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
                    "set one of them to null"
                )
            return accum
        if t.global_batch_size is None:
            return 1
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.batch_size "
                f"({t.batch_size}) × {num_processes} process(es); change one, or set "
                "train.gradient_accumulation_steps and train.global_batch_size=null"
            )
        return t.global_batch_size // per_step

    @property
    def state_every(self) -> int:
        c = self.checkpoint
        return c.every if c.state_every is None else c.state_every

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of the first invalid value."""
        _check(self.stage in STAGES, "stage", f"must be one of {list(STAGES)}, got {self.stage!r}")
        _check(bool(self.output_dir), "output_dir", "must be a folder path")
        _check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        m, d, p, t, o, lo, g = (
            self.model,
            self.data,
            self.prompts,
            self.train,
            self.optim,
            self.loss,
            self.gan,
        )
        _check(m.rank_vae >= 1, "model.rank_vae", f"must be >= 1, got {m.rank_vae}")
        _check(m.rank_unet >= 1, "model.rank_unet", f"must be >= 1, got {m.rank_unet}")
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
            d.crop_size >= 8 and d.crop_size % 8 == 0,
            "data.crop_size",
            f"must be a positive multiple of 8, got {d.crop_size}",
        )
        _check(
            d.degrade_in in ("worker", "batch"),
            "data.degrade_in",
            f"must be 'worker' or 'batch', got {d.degrade_in!r}",
        )
        _check(
            d.small_images in ("pad", "skip"),
            "data.small_images",
            f"must be 'pad' or 'skip', got {d.small_images!r}",
        )
        _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
        _check(
            p.mode in ("none", "file", "ram", "masks"),
            "prompts.mode",
            f"must be 'none', 'file', 'ram' or 'masks' (stage 2), got {p.mode!r}",
        )
        _check(
            p.mode != "file" or bool(p.file),
            "prompts.file",
            "prompts.mode='file' needs prompts.file (a `codsr tag` TSV or JSON)",
        )
        _check(
            0.0 <= p.null_text_prob <= 1.0,
            "prompts.null_text_prob",
            f"must be in [0, 1], got {p.null_text_prob}",
        )
        _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
        _check(
            t.global_batch_size is None or t.global_batch_size >= 1,
            "train.global_batch_size",
            f"must be >= 1 or null, got {t.global_batch_size}",
        )
        _check(
            t.gradient_accumulation_steps is None or t.gradient_accumulation_steps >= 1,
            "train.gradient_accumulation_steps",
            f"must be >= 1 or null, got {t.gradient_accumulation_steps}",
        )
        _check(
            t.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            f"must be one of {list(MIXED_PRECISION)}, got {t.mixed_precision!r}",
        )
        _check(t.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0, got {t.max_grad_norm}")
        _check(0 <= t.timestep_min <= t.timestep_max <= 999, "train.timestep_min",
               f"need 0 <= train.timestep_min ({t.timestep_min}) <= train.timestep_max ({t.timestep_max}) <= 999")  # fmt: skip
        _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _check(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {o.betas}",
        )
        _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
        _check(o.lr_scheduler in ("constant", "constant_with_warmup"), "optim.lr_scheduler",
               f"must be 'constant' or 'constant_with_warmup', got {o.lr_scheduler!r}")  # fmt: skip
        _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        _check(lo.mse_weight >= 0, "loss.mse_weight", f"must be >= 0, got {lo.mse_weight}")
        _check(lo.lpips_weight >= 0, "loss.lpips_weight", f"must be >= 0, got {lo.lpips_weight}")
        _check(g.weight >= 0, "gan.weight", f"must be >= 0, got {g.weight}")
        _check(g.start_step >= 0, "gan.start_step", f"must be >= 0, got {g.start_step}")
        _check(g.lr > 0, "gan.lr", f"must be > 0, got {g.lr}")
        _check(
            len(g.betas) == 2 and all(0 <= b < 1 for b in g.betas),
            "gan.betas",
            f"must be two numbers in [0, 1), got {g.betas}",
        )
        _check(g.max_grad_norm > 0, "gan.max_grad_norm", f"must be > 0, got {g.max_grad_norm}")
        _check(
            g.pretrained_backbone or g.backbone_weights is None,
            "gan.backbone_weights",
            "is set but gan.pretrained_backbone is false; drop one",
        )
        _check(0.0 < self.ema.decay < 1.0, "ema.decay", f"must be in (0, 1), got {self.ema.decay}")
        _check(
            self.logging.log_every >= 1, "logging.log_every", f"must be >= 1, got {self.logging.log_every}"
        )
        c = self.checkpoint
        _check(c.every >= 1, "checkpoint.every", f"must be >= 1, got {c.every}")
        _check(
            c.format in ("pkl", "safetensors", "both"),
            "checkpoint.format",
            f"must be 'pkl', 'safetensors' or 'both', got {c.format!r}",
        )
        _check(
            c.state_every is None or c.state_every >= 1,
            "checkpoint.state_every",
            f"must be >= 1 or null, got {c.state_every}",
        )
        _check(c.keep_states >= 1, "checkpoint.keep_states", f"must be >= 1, got {c.keep_states}")
        v = self.validation
        _check(v.every >= 0, "validation.every", f"must be >= 0 (0 = off), got {v.every}")
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
        _check(
            v.crop_size >= 8 and v.crop_size % 8 == 0,
            "validation.crop_size",
            f"must be a positive multiple of 8, got {v.crop_size}",
        )
        _check(0 <= v.timestep <= 999, "validation.timestep", f"must be in [0, 999], got {v.timestep}")
        _check(v.num_images >= 1, "validation.num_images", f"must be >= 1, got {v.num_images}")
        _check(self.vae.kl_weight >= 0, "vae.kl_weight", f"must be >= 0, got {self.vae.kl_weight}")
        self._validate_stage2()
        self.accumulation_steps(1)  # global batch consistency

    def _validate_stage2(self) -> None:
        """The stage-2 sections (``tmg``, ``vsd``, ``masks``) and how they combine with ``prompts``."""
        tm, vs, mk, p = self.tmg, self.vsd, self.masks, self.prompts
        _check(tm.layers in ("first", "all"), "tmg.layers", f"must be 'first' or 'all', got {tm.layers!r}")
        _check(tm.area_weight >= 0, "tmg.area_weight", f"must be >= 0, got {tm.area_weight}")
        _check(tm.bce_weight >= 0, "tmg.bce_weight", f"must be >= 0, got {tm.bce_weight}")
        _check(tm.min_mask_pixels >= 1, "tmg.min_mask_pixels", f"must be >= 1, got {tm.min_mask_pixels}")
        _check(vs.weight >= 0, "vsd.weight", f"must be >= 0, got {vs.weight}")
        _check(vs.rank >= 1, "vsd.rank", f"must be >= 1, got {vs.rank}")
        _check(vs.guidance_scale >= 0, "vsd.guidance_scale", f"must be >= 0, got {vs.guidance_scale}")
        _check(0 <= vs.timestep_min <= vs.timestep_max <= 999, "vsd.timestep_min",
               f"need 0 <= vsd.timestep_min ({vs.timestep_min}) <= vsd.timestep_max ({vs.timestep_max}) <= 999")  # fmt: skip
        _check(vs.lr > 0, "vsd.lr", f"must be > 0, got {vs.lr}")
        _check(
            len(vs.betas) == 2 and all(0 <= b < 1 for b in vs.betas),
            "vsd.betas",
            f"must be two numbers in [0, 1), got {vs.betas}",
        )
        _check(vs.weight_decay >= 0, "vsd.weight_decay", f"must be >= 0, got {vs.weight_decay}")
        _check(vs.max_grad_norm > 0, "vsd.max_grad_norm", f"must be > 0, got {vs.max_grad_norm}")
        _check(vs.base_dtype in ("auto", "fp32", "bf16", "fp16"), "vsd.base_dtype",
               f"must be 'auto', 'fp32', 'bf16' or 'fp16', got {vs.base_dtype!r}")  # fmt: skip
        _check(
            mk.mode in ("offline", "online"), "masks.mode", f"must be 'offline' or 'online', got {mk.mode!r}"
        )
        _check(
            mk.missing in ("error", "skip"), "masks.missing", f"must be 'error' or 'skip', got {mk.missing!r}"
        )
        _check(mk.max_boxes >= 1, "masks.max_boxes", f"must be >= 1, got {mk.max_boxes}")
        _check(mk.noun_backend in ("auto", "nltk", "spacy"), "masks.noun_backend",
               f"must be 'auto', 'nltk' or 'spacy', got {mk.noun_backend!r}")  # fmt: skip
        if self.stage != "2":
            _check(
                p.mode != "masks",
                "prompts.mode",
                "'masks' (captions of `codsr masks`) exists in stage 2 only",
            )
            return
        if mk.mode == "offline":
            _check(p.mode == "masks", "prompts.mode",
                   f"must be 'masks' with masks.mode=offline (the captions are stored with the masks), got {p.mode!r}")  # fmt: skip
        else:
            _check(p.mode in ("file", "ram"), "prompts.mode",
                   f"must be 'file' or 'ram' with masks.mode=online (TMG needs captions), got {p.mode!r}")  # fmt: skip


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


# ----------------------------------------------------------------------------------- typing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}' must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}")
    if value is None:
        raise ConfigError(f"config key '{key}' must not be null (expected {_type_name(tp)})")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. stage: 1
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp is str:
            value = [value]  # a single path where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping (a config section), got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in {where}; valid keys: {', '.join(names)}"
        )
    kwargs = {
        name: _coerce(values[name], hints[name], _join(prefix, name)) for name in names if name in values
    }
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
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
                raise ConfigError(
                    f"override {item!r}: config key '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return values


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load ``config`` (path, shipped name, or ``None`` for the defaults), apply overrides, validate."""
    values = load_config_dict(config) if config is not None else {}
    apply_overrides(values, overrides)
    return TrainConfig.from_dict(values)

"""Vision-aided DINO discriminator and its "multilevel sigmoid" GAN loss (docs/method.md#stage-1, S3Diff style).

Pipeline of ``VisionAidedDiscriminator(x)`` for images ``x`` in [-1, 1], shape (B, 3, H, W):

1. DiffAugment ``"color,translation,cutout"`` on ``x`` at its own resolution, in [-1, 1]
   (:mod:`codsr.training.diffaugment`; every draw from an explicit :class:`torch.Generator`);
2. ``(x + 1) / 2``, ``F.interpolate(size=224, mode="area")``, normalised with mean
   (0.48145466, 0.4578275, 0.40821073) (0.4815, 0.4578, 0.4082 rounded to 4 decimals) and
   std (0.229, 0.224, 0.225);
3. frozen DINO ViT-B/16 (timm ``vit_base_patch16_224.dino``). Features of blocks 5, 9 and 12
   (1-based), i.e. the outputs of ``blocks[4]``, ``blocks[8]`` and ``blocks[11]``, each passed through
   the ViT's final LayerNorm. This is what the reference obtains with DINO's
   ``get_intermediate_layers(x, n=8)[0, 4, -1]`` (which applies ``norm`` to every returned block).
   Blocks 5 and 9 give two (B, 768, 14, 14) patch-token maps (CLS dropped); block 12 gives the CLS
   token (B, 768);
4. trainable heads, one per level (weights in ``disc.heads``):
   patch map → BlurPool → SN-Conv3×3 stride 2 (768→128, no padding) → LeakyReLU 0.2 → BlurPool →
   SN-Conv1×1 stride 2 (128→1) → (B, 3, 3) logits; CLS → SN-Linear 768→128 → LeakyReLU 0.2 →
   SN-Linear 128→1 → (B, 1) logits. SN = ``torch.nn.utils.parametrizations.spectral_norm``.

BlurPool filter and padding (choice, and why). The method does not fix the filter; the discriminator is
S3Diff's, i.e. the ``vision_aided_loss`` package (``cv_type='dino'``, ``conv_multi_level``), whose BlurPool default is ``filt_size=4``: the binomial filter
``[1, 3, 3, 1] ⊗ [1, 3, 3, 1] / 64``, depthwise, stride 1, zero padding ``(taps - 1) // 2`` per side
plus one extra pixel before the 3×3 conv (which has no padding of its own). We default to exactly
that (``blur_taps=4``) so the logit maps match the release (14 → 15 → 7 → 6 → 3). ``blur_taps=3``
gives the ``[1, 2, 1] ⊗ [1, 2, 1] / 16`` filter with the same padding rule (14 → 16 → 7 → 7 → 4).

Loss (vision_aided_loss ``multilevel_sigmoid_s``): per level BCE-with-logits against a constant
target, averaged over batch and spatial positions, summed over the three levels. Targets: 0.8 for
real images and for the generator term, 0 for fakes. From step ``GANLossConfig.start_step`` (3000) on,
the trainer adds ``generator_loss`` to the generator objective, then takes a discriminator step on
``discriminator_loss``; both are already scaled by ``GANLossConfig.weight`` (0.2).

Gradients: backbone parameters never require grad, so the discriminator optimizer changes only the
heads; the generator term still backpropagates through the (frozen) backbone into the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from codsr.training.diffaugment import DEFAULT_POLICY, diff_augment, parse_policy

__all__ = [
    "DINO_FILENAME",
    "DINO_HF_REPO",
    "DINO_MODEL_NAME",
    "DINO_URL",
    "BlurPool",
    "ClsHead",
    "DiscriminatorConfig",
    "GANLossConfig",
    "PatchHead",
    "VisionAidedDiscriminator",
    "binomial_filter",
    "build_dino_backbone",
    "discriminator_loss",
    "generator_loss",
    "load_vit_weights",
    "multilevel_sigmoid_loss",
]

DINO_MODEL_NAME = "vit_base_patch16_224.dino"
DINO_HF_REPO = "timm/vit_base_patch16_224.dino"
DINO_FILENAME = "dino_vitbase16_pretrain.pth"
DINO_URL = f"https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/{DINO_FILENAME}"


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------


def _dino_hint() -> str:
    return (
        f"The discriminator needs the DINO ViT-B/16 weights: either the timm hub model '{DINO_HF_REPO}' "
        f"(model.safetensors) in the Hugging Face cache, or the original '{DINO_FILENAME}' ({DINO_URL}) "
        f"passed as weights=... or placed in $TORCH_HOME/hub/checkpoints/."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
    # DINO's full training checkpoints nest the released network under 'teacher'.
    for key in ("teacher", "state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return state


def load_vit_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a ViT state dict (timm or original DINO layout, ``.pth``/``.safetensors``) strictly.

    ``module.``/``backbone.`` prefixes are stripped and DINO projection-head tensors (``head.*``,
    absent from the headless timm model) are dropped; everything else must match.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DINO weights file not found: {path}. {_dino_hint()}")
    state = {}
    for key, value in _read_state_dict(path).items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    model_keys = set(model.state_dict())
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and k not in model_keys)}
    state = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the ViT architecture: missing keys {sorted(missing)[:5]}, "
            f"unexpected keys {sorted(unexpected)[:5]}. {_dino_hint()}"
        )


def build_dino_backbone(
    weights: str | os.PathLike[str] | None = None,
    *,
    pretrained: bool = True,
    **arch_overrides: object,
) -> nn.Module:
    """Build timm's ``vit_base_patch16_224.dino`` (frozen, eval mode) with its weights.

    Weight sources, in order: ``weights`` (a local file, must exist); the places
    :func:`codsr.weights.find_weight` knows for ``"dino"`` (``$CODSR_DINO``, the codsr cache,
    ``$TORCH_HOME/hub/checkpoints/dino_vitbase16_pretrain.pth``); timm's hub model
    ``timm/vit_base_patch16_224.dino`` (the Hugging Face cache; downloaded on first use with
    huggingface_hub's progress bar). When none is available a
    :class:`codsr.weights.WeightNotFoundError` (a ``FileNotFoundError``) names the files, the places
    looked at and the URLs. ``pretrained=False`` gives random weights
    (tests only). ``arch_overrides`` go to ``timm.create_model`` (e.g. ``embed_dim=32,
    num_heads=2`` for a tiny test model).
    """
    import timm

    if not pretrained:
        if weights is not None:
            raise ValueError("build_dino_backbone: weights were given but pretrained=False; drop one")
        model = timm.create_model(DINO_MODEL_NAME, pretrained=False, **arch_overrides)
    else:
        from codsr.weights import WeightNotFoundError, find_weight, not_found_message

        status = find_weight("dino")
        cached = Path(torch.hub.get_dir()) / "checkpoints" / DINO_FILENAME
        local = weights
        if local is None:
            local = status.path if status.found else (cached if cached.is_file() else None)
        if local is not None:
            model = timm.create_model(DINO_MODEL_NAME, pretrained=False, **arch_overrides)
            load_vit_weights(model, local)
        else:
            try:
                model = timm.create_model(DINO_MODEL_NAME, pretrained=True, **arch_overrides)
            except Exception as err:  # hub/network errors differ by library version
                detail = (str(err).splitlines() or [""])[0]
                status.looked_at.append(f"timm hub model {DINO_HF_REPO} ({type(err).__name__}: {detail})")
                raise WeightNotFoundError(
                    f"{not_found_message(status, 'for the GAN discriminator')} {_dino_hint()}"
                ) from err
    model.requires_grad_(False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


def binomial_filter(taps: int) -> torch.Tensor:
    """The normalised 2-D binomial low-pass ``a ⊗ a / sum``, ``a`` = row ``taps - 1`` of Pascal's triangle.

    ``taps=3``: ``[1, 2, 1] ⊗ [1, 2, 1] / 16``; ``taps=4``: ``[1, 3, 3, 1] ⊗ [1, 3, 3, 1] / 64``.
    """
    if not 1 <= taps <= 7:
        raise ValueError(f"blur taps must be in 1..7, got {taps}")
    row = torch.tensor([math.comb(taps - 1, k) for k in range(taps)], dtype=torch.float64)
    kernel = row[:, None] * row[None, :]
    return (kernel / kernel.sum()).float()


class BlurPool(nn.Module):
    """Fixed depthwise binomial low-pass (stride 1) with symmetric zero padding.

    ``out = conv2d(zero_pad(x, pad), binomial_filter(taps), groups=C)``; output size
    ``H + 2·pad - taps + 1``. The filter is a buffer, not a parameter.
    """

    def __init__(self, channels: int, taps: int = 4, pad: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.taps = taps
        self.pad = (taps - 1) // 2 if pad is None else pad
        kernel = binomial_filter(taps)
        self.register_buffer("filt", kernel[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4)
        return F.conv2d(x, self.filt.to(x.dtype), groups=self.channels)


class PatchHead(nn.Sequential):
    """Patch-map head: BlurPool → SN-Conv3×3 s2 → LReLU 0.2 → BlurPool → SN-Conv1×1 s2 (→ 1 channel)."""

    def __init__(self, in_channels: int, hidden: int = 128, blur_taps: int = 4) -> None:
        base_pad = (blur_taps - 1) // 2
        super().__init__(
            # +1 pixel: the 3×3 conv itself is unpadded (vision_aided_loss, down=2).
            BlurPool(in_channels, blur_taps, pad=base_pad + 1),
            spectral_norm(nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=0)),
            nn.LeakyReLU(0.2),
            BlurPool(hidden, blur_taps, pad=base_pad),
            spectral_norm(nn.Conv2d(hidden, 1, kernel_size=1, stride=2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)


class ClsHead(nn.Sequential):
    """CLS-token head: SN-Linear C→hidden → LReLU 0.2 → SN-Linear hidden→1."""

    def __init__(self, in_features: int, hidden: int = 128) -> None:
        super().__init__(
            spectral_norm(nn.Linear(in_features, hidden)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(hidden, 1)),
        )


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Discriminator settings (docs/method.md#stage-1 defaults).

    ``feature_blocks`` are 0-based indices into ``backbone.blocks``: every index but the last gives a
    patch map, the last gives the CLS token. ``augment_seed`` seeds the discriminator's own DiffAugment
    generator (a trainer should offset it by the process rank).
    """

    feature_blocks: tuple[int, ...] = (4, 8, 11)
    head_hidden: int = 128
    blur_taps: int = 4
    diffaug_policy: str = DEFAULT_POLICY
    augment_seed: int = 0
    input_size: int = 224
    # The release's (vision_aided_loss) exact CLIP mean; often quoted rounded to 4 decimals.
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    backbone_weights: str | None = None
    pretrained_backbone: bool = True


class VisionAidedDiscriminator(nn.Module):
    """DINO-ViT feature discriminator with multi-level heads (see the module docstring).

    Args:
        backbone: a timm ``VisionTransformer`` with a CLS token and at least
            ``max(config.feature_blocks) + 1`` blocks; default: :func:`build_dino_backbone` with
            ``config.backbone_weights`` / ``config.pretrained_backbone``. It is frozen here.
        config: :class:`DiscriminatorConfig`.

    ``disc(x)`` returns the per-level logits ``[patch_5 (B, h, w), patch_9 (B, h, w), cls_12 (B, 1)]``.
    Only ``disc.heads`` is trainable: give ``disc.head_parameters()`` to the optimizer and save
    ``disc.heads.state_dict()`` (the backbone is fixed and large).
    """

    def __init__(self, backbone: nn.Module | None = None, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        if backbone is None:
            backbone = build_dino_backbone(config.backbone_weights, pretrained=config.pretrained_backbone)
        if not hasattr(backbone, "forward_intermediates") or getattr(backbone, "cls_token", None) is None:
            raise TypeError(
                "backbone must be a timm VisionTransformer with a class token "
                f"(got {type(backbone).__name__})"
            )
        depth = len(backbone.blocks)
        blocks = tuple(config.feature_blocks)
        if len(blocks) < 1 or min(blocks) < 0 or max(blocks) >= depth or list(blocks) != sorted(set(blocks)):
            raise ValueError(
                f"feature_blocks {blocks} must be increasing 0-based block indices below the backbone "
                f"depth {depth} (the release: (4, 8, 11) for a 12-block ViT)"
            )
        parse_policy(config.diffaug_policy)  # fail early on a bad policy string
        self.backbone = backbone.requires_grad_(False).eval()
        width = int(backbone.embed_dim)
        self.heads = nn.ModuleList(
            [PatchHead(width, config.head_hidden, config.blur_taps) for _ in blocks[:-1]]
            + [ClsHead(width, config.head_hidden)]
        )
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.augment_generator = torch.Generator().manual_seed(config.augment_seed)

    def train(self, mode: bool = True) -> VisionAidedDiscriminator:
        # The backbone is a fixed feature extractor: keep it in eval whatever the parent does.
        super().train(mode)
        self.backbone.eval()
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (the heads); the discriminator optimizer's parameter list."""
        return self.heads.parameters()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → backbone input: ``(x + 1) / 2``, area-resize to 224, mean/std normalise."""
        size = self.config.input_size
        x = (x + 1) / 2
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        return (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of preprocessed ``x``: patch maps (B, C, 14, 14) then the CLS (B, C)."""
        x = x.to(self.backbone.patch_embed.proj.weight.dtype)
        outs = self.backbone.forward_intermediates(
            x,
            indices=list(self.config.feature_blocks),
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        feats = [patch for patch, _ in outs[:-1]]
        feats.append(outs[-1][1][:, 0])  # prefix tokens of the last block; index 0 is CLS
        return feats

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Per-level logits for images ``x`` in [-1, 1]; DiffAugment draws from ``generator``
        (default: the discriminator's own ``augment_generator``)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator expects (B, 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        if generator is None:
            generator = self.augment_generator
        x = diff_augment(x, generator, self.config.diffaug_policy)
        feats = self.extract_features(self.preprocess(x))
        head_dtype = next(self.heads.parameters()).dtype
        return [head(f.to(head_dtype)) for head, f in zip(self.heads, feats, strict=True)]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GANLossConfig:
    """Adversarial-loss settings (docs/method.md#stage-1).

    ``weight`` scales both the generator and the discriminator terms (0.2). ``start_step``: the
    trainer adds the GAN terms from this global step on (3000; ``is_active``). Targets follow
    vision_aided_loss ``multilevel_sigmoid_s``: 0.8 for real and for the generator, 0 for fake.
    """

    weight: float = 0.2
    start_step: int = 3000
    real_target: float = 0.8
    fake_target: float = 0.0

    def is_active(self, step: int) -> bool:
        """Whether the GAN terms are used at (0-based) global step ``step``."""
        return step >= self.start_step


_DEFAULT_GAN = GANLossConfig()


def multilevel_sigmoid_loss(logits: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """``Σ_levels mean(BCEWithLogits(logit, target))`` over batch and spatial positions, in float32."""
    if len(logits) == 0:
        raise ValueError("multilevel_sigmoid_loss needs at least one level of logits")
    total = torch.zeros((), device=logits[0].device)
    for level in logits:
        level = level.float()
        total = total + F.binary_cross_entropy_with_logits(level, torch.full_like(level, target))
    return total


def generator_loss(
    disc: VisionAidedDiscriminator,
    fake: torch.Tensor,
    config: GANLossConfig = _DEFAULT_GAN,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generator term ``weight · multilevel_sigmoid(D(fake), real_target)`` (docs/method.md#stage-1).

    Gradients reach ``fake`` through the frozen backbone. The heads also accumulate ``.grad`` from this
    backward: the trainer must clear the discriminator's gradients (``zero_grad(set_to_none=True)``)
    before its discriminator backward, and never step the discriminator on this term.
    """
    return config.weight * multilevel_sigmoid_loss(disc(fake, generator), config.real_target)


def discriminator_loss(
    disc: VisionAidedDiscriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    config: GANLossConfig = _DEFAULT_GAN,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Discriminator objective ``weight · (D(real) + D(fake.detach()))`` (docs/method.md#stage-1).

    Returns ``{"loss": real + fake, "real": weight·BCE(D(real), 0.8), "fake": weight·BCE(D(fake), 0)}``.
    Both images are detached, so only the heads get gradients. Real and fake get independent
    DiffAugment draws (two discriminator calls, as in the reference).
    """
    real_term = config.weight * multilevel_sigmoid_loss(disc(real.detach(), generator), config.real_target)
    fake_term = config.weight * multilevel_sigmoid_loss(disc(fake.detach(), generator), config.fake_target)
    return {"loss": real_term + fake_term, "real": real_term, "fake": fake_term}

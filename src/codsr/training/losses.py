"""Stage-1 reconstruction loss: ``1·MSE(x̂, x_HQ) + 2·LPIPS-VGG(x̂, x_HQ)`` (paper §3.4, docs/method.md#stage-1).

LPIPS is the ``lpips`` package's VGG variant (``lpips.LPIPS(net="vgg")``, inputs in [-1, 1]). The
package ships only its linear calibration layers; the VGG16 backbone comes from torchvision's file.
:class:`LPIPSLoss` builds LPIPS with a random trunk (no download inside ``lpips``) and then loads the
torchvision VGG16 ImageNet weights (:func:`resolve_vgg16_weights`):

1. the path passed as ``vgg_weights`` (must exist);
2. else the places :func:`codsr.weights.find_weight` knows for ``"lpips-vgg"`` (``$CODSR_LPIPS_VGG``,
   the codsr cache, ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``) and ``torch.hub.get_dir()``;
3. else, on first use, download :data:`VGG16_URL` into torchvision's cache
   (``torch.hub.get_dir()/checkpoints``) with a progress bar and torchvision's SHA-256 prefix check;
4. when that fails (offline): :class:`codsr.weights.WeightNotFoundError` (a ``FileNotFoundError``)
   naming the file, the places looked at and the command that gets it.

A random-trunk LPIPS (for tests only) must be asked for explicitly with
``LPIPSLoss(pretrained_backbone=False)``.

The GAN terms (from step 3000) live in :mod:`codsr.training.discriminator`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "VGG16_FILENAME",
    "VGG16_HASH_PREFIX",
    "VGG16_URL",
    "LPIPSLoss",
    "ReconstructionLoss",
    "load_vgg16_features",
    "resolve_vgg16_weights",
]

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_HASH_PREFIX = "397923af"  # torchvision names its files after the SHA-256 prefix (check_hash)

# lpips splits torchvision's ``vgg16().features`` into five slices at these layer indices; the
# slice modules keep the torchvision index as their child name (``slice2.5`` = ``features.5``).
_LPIPS_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def resolve_vgg16_weights(vgg_weights: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Return the local path of the torchvision VGG16 ImageNet weights (module doc for the order),
    downloading them on first use (``download=True``), or raise a clear error.

    An explicit ``vgg_weights`` must exist (it is never replaced by another copy).
    """
    from codsr.weights import WeightNotFoundError, find_weight, not_found_message

    hint = (
        f"LPIPS-VGG needs the torchvision VGG16 ImageNet weights '{VGG16_FILENAME}' ({VGG16_URL}). "
        f"Download it on a machine with network access and either pass its path (vgg_weights=...) or "
        f"place it in $TORCH_HOME/hub/checkpoints/."
    )
    if vgg_weights is not None:
        path = Path(vgg_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"vgg_weights file not found: {path}. {hint}")
        return path
    status = find_weight("lpips-vgg")
    if status.found:
        return Path(status.path)  # type: ignore[arg-type]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    if cached.is_file():
        return cached
    if not any(s.startswith(f"{cached} ") for s in status.looked_at):
        status.looked_at.append(f"{cached} (torch.hub.get_dir())")
    if download and not os.environ.get(status.spec.env):
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # torchvision's own download: temp file + rename, progress bar, SHA-256 prefix checked
            torch.hub.download_url_to_file(
                VGG16_URL, str(cached), hash_prefix=VGG16_HASH_PREFIX, progress=True
            )
            return cached
        except Exception as exc:  # offline, proxy, HTTP error, wrong hash: all mean "unavailable"
            detail = (str(exc).splitlines() or [""])[0]
            status.looked_at.append(f"download from {VGG16_URL} failed: {type(exc).__name__}: {detail}")
    raise WeightNotFoundError(f"{not_found_message(status, 'for the LPIPS-VGG loss')} {hint}")


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
    return state


def load_vgg16_features(lpips_net: nn.Module, path: str | os.PathLike[str]) -> None:
    """Copy the ``features.*`` tensors of a torchvision VGG16 state dict into an ``lpips.LPIPS`` trunk.

    Every conv of the 30 ``features`` layers LPIPS uses must be present (a truncated or wrong file
    raises); the classifier tensors of the full torchvision file are ignored.
    """
    path = Path(path)
    state = _load_state_dict_file(path)
    mapped: dict[str, torch.Tensor] = {}
    for slice_no, (start, stop) in enumerate(_LPIPS_VGG_SLICES, start=1):
        for idx in range(start, stop):
            for kind in ("weight", "bias"):
                key = f"features.{idx}.{kind}"
                if key in state:
                    mapped[f"slice{slice_no}.{idx}.{kind}"] = state[key]
    trunk = lpips_net.net
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a torchvision VGG16 state dict: missing {sorted(missing)[:4]}... "
            f"(expected keys 'features.<i>.weight/bias'; get {VGG16_FILENAME} from {VGG16_URL})"
        )


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance between images in [-1, 1] (Zhang et al. 2018, ``lpips`` package).

    Args:
        pretrained_backbone: load the VGG16 ImageNet trunk (True, required for real training). False
            keeps a randomly initialised trunk: only for tests, never chosen silently.
        vgg_weights: local ``vgg16-397923af.pth``; default ``$TORCH_HOME/hub/checkpoints/``.
        lpips_weights: the linear-layer calibration file; default the one shipped in ``lpips``.

    The network always stays in eval mode (its linear layers contain dropout) and none of its
    parameters require grad; gradients flow only into the inputs. It runs in float32 even inside a
    bf16/fp16 autocast region: its feature normalisation divides by ``sqrt(sum f²) + 1e-10``, whose
    epsilon underflows in fp16 and whose sum of squares can overflow it.
    """

    def __init__(
        self,
        *,
        pretrained_backbone: bool = True,
        vgg_weights: str | os.PathLike[str] | None = None,
        lpips_weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        import lpips

        weights_path = resolve_vgg16_weights(vgg_weights) if pretrained_backbone else None
        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated ``vgg16(pretrained=False)``; harmless.
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(
                net="vgg",
                pretrained=True,  # the linear calibration layers, shipped with the package
                pnet_rand=True,  # never let lpips/torchvision download the trunk
                model_path=None if lpips_weights is None else str(lpips_weights),
                verbose=False,
            )
        if weights_path is not None:
            load_vgg16_features(self.net, weights_path)
        self.pretrained_backbone = pretrained_backbone
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        # A parent's .train() must not switch on the dropout inside the LPIPS linear layers.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """LPIPS(pred, target) per sample (``reduction="none"``, shape (B,)) or its batch mean."""
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) images of equal shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        dtype = next(self.net.parameters()).dtype
        with torch.autocast(device_type=pred.device.type, enabled=False):
            dist = self.net(pred.to(dtype), target.to(dtype)).flatten()
        dist = dist.float()
        if reduction == "none":
            return dist
        if reduction == "mean":
            return dist.mean()
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class ReconstructionLoss(nn.Module):
    """``mse_weight·MSE(x̂, x_HQ) + lpips_weight·LPIPS(x̂, x_HQ)`` (docs/method.md#stage-1: weights 1 and 2).

    ``forward`` returns ``{"loss": weighted total, "mse": unweighted MSE, "lpips": unweighted batch
    mean LPIPS}``; all are float32 tensors attached to the graph (call ``.item()`` to log them).
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        lpips_weight: float = 2.0,
        lpips_loss: LPIPSLoss | None = None,
        *,
        pretrained_backbone: bool = True,
        vgg_weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.mse_weight = float(mse_weight)
        self.lpips_weight = float(lpips_weight)
        if lpips_loss is None and self.lpips_weight != 0.0:
            lpips_loss = LPIPSLoss(pretrained_backbone=pretrained_backbone, vgg_weights=vgg_weights)
        self.lpips = lpips_loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.detach()
        mse = F.mse_loss(pred.float(), target.float())
        if self.lpips is not None:
            lp = self.lpips(pred, target)
        else:
            lp = torch.zeros((), device=pred.device)
        total = self.mse_weight * mse + self.lpips_weight * lp
        return {"loss": total, "mse": mse, "lpips": lp}

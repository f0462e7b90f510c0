"""Autoencoder pre-training of a *random* VAE, for the tiny CPU recipe only (``stage: vae``).

CODSR's stage 1 keeps the VAE decoder frozen (docs/method.md#base-model, #stage-1), so with a randomly initialised tiny
model every output would be decoder noise and no restoration metric could move. The tiny recipe
therefore first trains the tiny VAE as an autoencoder on HQ crops:

    loss = mse_weight·MSE(D(z), x) + lpips_weight·LPIPS(D(z), x) + kl_weight·KL(q(z|x) ‖ N(0, I)),
    z ~ q(z|x) drawn from the trainer's seeded ``noise`` generator.

At export the VAE is written to ``<output_dir>/vae/`` and, when the base model is a local folder,
a complete diffusers model folder ``<output_dir>/model/`` (the base model's other components + the
trained VAE) is assembled for stage 1. With ``vae.calibrate_scaling_factor`` the VAE's
``scaling_factor`` becomes 1/std of the scaled-by-1 latents of a few training batches (the way SD
chose 0.18215), so the stage-1 noise levels mean what they mean for SD.

Never use this on the real SD 2.1 VAE: CODSR relies on the pretrained one.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from codsr.training.config import ConfigError, TrainConfig
from codsr.training.trainer import BaseTrainer

__all__ = ["AutoencoderNetwork", "VAEPretrainTrainer"]

log = logging.getLogger("codsr.training")

_LOGVAR_RANGE = (-30.0, 20.0)


class AutoencoderNetwork(nn.Module):
    """VAE forward for training: (reconstruction in [-1, 1]-ish, KL per sample mean)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from codsr.model.codsr import randn

        moments = self.vae.quant_conv(self.vae.encoder(x))
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(*_LOGVAR_RANGE)
        z = mean + torch.exp(0.5 * logvar) * randn(tuple(mean.shape), generator, x.device)
        recon = self.vae.decoder(self.vae.post_quant_conv(z.to(x.dtype)))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return recon, kl


class VAEPretrainTrainer(BaseTrainer):
    """``stage: vae`` — see the module docstring."""

    stage = "vae"
    run_name = "codsr-vae"
    rng_streams = ("noise",)

    def __init__(self, config: TrainConfig, accelerator: Any = None) -> None:
        super().__init__(config, accelerator)
        self.vae: nn.Module | None = None
        self.lpips: nn.Module | None = None
        self._validation: list[torch.Tensor] | None = None

    def build_models(self) -> None:
        from codsr.model.base import load_base_components

        cfg = self.config
        comps = load_base_components(cfg.model.base_model, revision=cfg.model.revision, components=("vae",))
        self.vae = comps.vae.train().requires_grad_(True)
        if cfg.train.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.model = AutoencoderNetwork(self.vae)
        if cfg.loss.lpips_weight > 0:
            from codsr.training.losses import LPIPSLoss

            self.lpips = LPIPSLoss(
                pretrained_backbone=cfg.loss.lpips_pretrained, vgg_weights=cfg.loss.vgg_weights
            )
            self.lpips.to(self.device)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.unwrap().named_parameters() if p.requires_grad}

    def build_dataset(self) -> torch.utils.data.Dataset:
        from codsr.data.datasets import HQImageDataset

        d = self.config.data
        if not d.train_hq:
            raise ConfigError(
                "config key 'data.train_hq' is not set: pass HQ image folders (--set data.train_hq=/path)"
            )
        return HQImageDataset(d.train_hq, crop_size=d.crop_size, flip=d.flip, degrade_in="none",
                              seed=self.config.seed, small_images=d.small_images)  # fmt: skip

    def collate_fn(self) -> Callable:
        from codsr.data.datasets import collate

        return collate

    def train_micro_step(self, batch: Any, accumulation: int) -> dict[str, float]:
        cfg = self.config
        x = batch["hq"].to(self.device, non_blocking=True)
        with self.accelerator.autocast():
            recon, kl = self.model(x, generator=self.rng["noise"])
            mse = F.mse_loss(recon.float(), x.float())
            loss = cfg.loss.mse_weight * mse + cfg.vae.kl_weight * kl
            logs = {"mse": float(mse.detach()), "kl": float(kl.detach())}
            if self.lpips is not None:
                lp = self.lpips(recon.float().clamp(-1, 1), x)
                loss = loss + cfg.loss.lpips_weight * lp
                logs["lpips"] = float(lp.detach())
        self.accelerator.backward(loss / accumulation)
        logs["loss"] = float(loss.detach())
        return logs

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def latent_std(self, batches: int = 4) -> float:
        """Std of the unscaled posterior samples of the first training batches (fixed seed)."""
        from codsr.data.datasets import collate
        from codsr.model.codsr import randn

        ds = self.data.dataset
        g = torch.Generator().manual_seed(self.config.seed)
        bs = self.config.train.batch_size
        values = []
        for b in range(batches):
            idx = [(b * bs + i) % len(ds) for i in range(bs)]
            x = collate([ds[i] for i in idx])["hq"].to(self.device)
            moments = self.vae.quant_conv(self.vae.encoder(x))
            mean, logvar = moments.float().chunk(2, dim=1)
            values.append(
                mean + torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE)) * randn(tuple(mean.shape), g, x.device)
            )
        return float(torch.cat(values).std())

    def export(self, step: int, final: bool) -> list[Path]:
        vae = self.vae
        was_training = vae.training
        vae.eval()
        if final and self.config.vae.calibrate_scaling_factor:
            std = self.latent_std()
            vae.register_to_config(scaling_factor=1.0 / std)
            log.info("VAE latent std %.4f: scaling_factor set to %.5f", std, 1.0 / std)
        out = self.output_dir / "vae"
        vae.save_pretrained(out)
        written = [out]
        if final:
            model_dir = self.assemble_model_folder(out)
            if model_dir is not None:
                written.append(model_dir)
        vae.train(was_training)
        return written

    def assemble_model_folder(self, vae_dir: Path) -> Path | None:
        """``<output_dir>/model``: the base model folder with the trained VAE (local bases only)."""
        base = Path(self.config.model.base_model).expanduser()
        if not (base / "model_index.json").is_file():
            log.warning("model.base_model is not a local folder: only %s was written", vae_dir)
            return None
        dest = self.output_dir / "model"
        tmp = dest.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in base.iterdir():
            if item.name == "vae":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        shutil.copytree(vae_dir, tmp / "vae")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return dest

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        from codsr.training.stage1 import psnr_y_batch

        v = self.config.validation
        if self._validation is None:
            from codsr.data.datasets import HQImageDataset

            sources = v.hq or ([v.hq_dir] if v.hq_dir else None)
            if not sources:
                self._validation = []
            else:
                ds = HQImageDataset(
                    sources, crop_size=v.crop_size, flip=False, degrade_in="none", seed=v.seed
                )
                self._validation = [ds[i]["hq"][None] for i in range(min(v.num_images, len(ds)))]
        if not self._validation:
            return {}
        self.model.eval()
        x = torch.cat(self._validation).to(self.device)
        moments = self.vae.quant_conv(self.vae.encoder(x))
        mean = moments.float().chunk(2, dim=1)[0]
        recon = self.vae.decoder(self.vae.post_quant_conv(mean)).clamp(-1, 1)
        scores = psnr_y_batch(recon, x)
        return {"psnr_y_recon": sum(scores) / len(scores)}

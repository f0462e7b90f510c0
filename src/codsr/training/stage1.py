"""CODSR stage-1 training: RGPA + LQFM with LoRA on SD 2.1-base (paper §3.4, docs/method.md#stage-1).

Per optimizer step (global batch = ``train.batch_size`` × accumulation × processes):

1. HQ crops and their Real-ESRGAN LQ (resized back to the crop size), prompts (RAM tags of the HQ
   crop, a prompt file, or empty) with optional null-text dropout;
2. ``t ~ U{timestep_min..timestep_max}`` per sample (50..250) from a seeded generator; the
   generator forward (docs/method.md#generator-forward) with posterior and RGPA noise from another seeded generator;
   ``x̂ = VAE_dec(ẑ_H)``;
3. generator loss ``1·MSE(x̂, x_HQ) + 2·LPIPS(x̂, x_HQ)``, plus ``0.2·GAN_G(x̂)`` from
   ``gan.start_step`` (3000) on; AdamW (lr 5e-5, wd 1e-2), grad-clip 1.0;
4. with the GAN active, a discriminator step on ``0.2·(D(x_HQ) → 0.8, D(x̂.detach()) → 0)``.

Trainable: the VAE-encoder LoRA (r 4), the UNet LoRA (r 16, three adapters) and the SFT;
everything else (VAE decoder, time embeddings, norms, text encoder) is frozen
(:func:`configure_stage1_trainable`).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from codsr.atomic import atomic_write
from codsr.model.codsr import CODSRModel
from codsr.model.lora import UNET_GROUPS, VAE_ADAPTER, unet_adapter_name
from codsr.training.config import ConfigError, TrainConfig
from codsr.training.prompts import FilePrompts, RAMCropPrompts, apply_null_text, read_prompt_file
from codsr.training.provenance import check_base_model, write_provenance
from codsr.training.trainer import BaseTrainer
from codsr.training.trainer_utils import stream_seed

__all__ = [
    "STAGE1_ADAPTERS",
    "Stage1Network",
    "Stage1Trainer",
    "configure_stage1_trainable",
    "encode_prompts",
    "psnr_y_batch",
]

log = logging.getLogger("codsr.training")

STAGE1_ADAPTERS = (VAE_ADAPTER, *(unet_adapter_name(g) for g in UNET_GROUPS))


def configure_stage1_trainable(gen: CODSRModel) -> dict[str, nn.Parameter]:
    """Freeze everything, then train only the stage-1 LoRA tensors and the SFT (docs/method.md#stage-1).

    Returns the trainable parameters by name. Raises if a LoRA tensor sits anywhere but the VAE
    encoder / ``quant_conv`` and the UNet, so a change in peft's naming cannot silently train the
    decoder.
    """
    gen.requires_grad_(False)
    trainable: dict[str, nn.Parameter] = {}
    for name, p in gen.named_parameters():
        if name.startswith("sft."):
            trainable[name] = p
        elif ".lora_A." in name or ".lora_B." in name:
            adapter = name.rsplit(".", 2)[-2]
            if adapter not in STAGE1_ADAPTERS:
                continue
            if not name.startswith(("vae.encoder.", "vae.quant_conv.", "unet.")):
                raise RuntimeError(f"unexpected LoRA parameter {name!r} outside the VAE encoder and the UNet")
            trainable[name] = p
    for p in trainable.values():
        p.requires_grad_(True)
    if not any(".lora_" in n for n in trainable):
        raise RuntimeError("the generator has no stage-1 LoRA adapters: call add_stage1_lora() first")
    return trainable


class Stage1Network(nn.Module):
    """The module DDP wraps: generator forward (docs/method.md#generator-forward) + VAE decode → (x̂ in [-1, 1], ẑ_H)."""

    def __init__(self, generator: CODSRModel) -> None:
        super().__init__()
        self.generator = generator

    def forward(
        self,
        x_l: torch.Tensor,
        prompt_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.generator(x_l, prompt_embeds, timesteps, generator=generator)
        return self.generator.decode(out.z_h), out.z_h


@torch.no_grad()
def encode_prompts(
    text_encoder: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """CLIP last hidden state of the 77-token, "!"-padded prompts (as the pipeline encodes them)."""
    ids = tokenizer(
        prompts,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def psnr_y_batch(pred_m11: torch.Tensor, target_m11: torch.Tensor) -> list[float]:
    """Y-channel PSNR (BT.601, uint8, whole image; docs/method.md#evaluation) of each pair of [-1, 1] images."""
    from codsr.evaluation.full_reference import psnr_y

    def to_u8(x: torch.Tensor):
        return (
            ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        )

    return [float(psnr_y(p, t)) for p, t in zip(to_u8(pred_m11), to_u8(target_m11), strict=True)]


class Stage1Trainer(BaseTrainer):
    """Stage-1 trainer; see the module docstring. ``trainer.train()`` runs it."""

    stage = "1"
    run_name = "codsr"

    def __init__(self, config: TrainConfig, accelerator: Any = None) -> None:
        super().__init__(config, accelerator)
        self.generator: CODSRModel | None = None
        self.text_encoder: nn.Module | None = None
        self.tokenizer: Any = None
        self.loss_fn: nn.Module | None = None
        self.disc: nn.Module | None = None
        self.d_optimizer: torch.optim.Optimizer | None = None
        self.d_scaler: Any = None
        self.degrader: Any = None
        self.prompt_source: Callable | None = None
        self._empty_embeds: torch.Tensor | None = None
        self._d_pending = False
        self._validation_set: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ================================================================== models
    def build_models(self) -> None:
        from codsr.model.base import load_base_components
        from codsr.model.checkpoint import load_checkpoint

        cfg = self.config
        comps = load_base_components(cfg.model.base_model, revision=cfg.model.revision)
        gen = CODSRModel(comps.vae, comps.unet, comps.scheduler)
        with warnings.catch_warnings():
            # peft warns on every adapter after the first; several adapters are the design (docs/method.md#lora-layout).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if cfg.model.init_checkpoint:
                ckpt = load_checkpoint(cfg.model.init_checkpoint)
                check_base_model(
                    cfg.model.init_checkpoint, cfg.model.base_model, cfg.model.revision, ckpt.metadata
                )
                if ckpt.has_alignment:
                    raise ConfigError(
                        f"config key 'model.init_checkpoint': {cfg.model.init_checkpoint} is a stage-2 checkpoint; "
                        "stage 1 starts from a stage-1 checkpoint or from scratch"
                    )
                gen.load_checkpoint(ckpt, merge_unet=False)
            else:
                gen.add_stage1_lora(rank_vae=cfg.model.rank_vae, rank_unet=cfg.model.rank_unet)
        configure_stage1_trainable(gen)
        if cfg.train.gradient_checkpointing:
            gen.unet.enable_gradient_checkpointing()
            gen.vae.enable_gradient_checkpointing()
        self._attach_generator(gen, comps)
        if cfg.gan.enabled:
            self._build_discriminator()
        if cfg.data.degrade_in == "batch":
            from codsr.data.degradation import BatchDegrader, DegradationConfig

            self.degrader = BatchDegrader(
                DegradationConfig.from_dict(cfg.data.degradation),
                seed=stream_seed(cfg.seed, self.rank, "degrade"),
            )
        self._build_prompt_source()

    def _build_discriminator(self) -> None:
        from codsr.training.discriminator import (
            DiscriminatorConfig,
            VisionAidedDiscriminator,
            build_dino_backbone,
        )

        g = self.config.gan
        backbone = build_dino_backbone(
            g.backbone_weights if g.pretrained_backbone else None,
            pretrained=g.pretrained_backbone,
            **g.backbone_arch,
        )
        dcfg = DiscriminatorConfig(
            feature_blocks=tuple(g.feature_blocks),
            blur_taps=g.blur_taps,
            diffaug_policy=g.diffaug_policy,
            # one DiffAugment stream per process
            augment_seed=stream_seed(self.config.seed, self.rank, "diffaugment"),
            backbone_weights=g.backbone_weights,
            pretrained_backbone=g.pretrained_backbone,
        )
        self.disc = VisionAidedDiscriminator(backbone, dcfg).to(self.device)
        self.d_optimizer = torch.optim.AdamW(
            list(self.disc.head_parameters()), lr=g.lr, betas=tuple(g.betas), weight_decay=g.weight_decay
        )
        # Own scaler: the generator's scale may change between the D backward and the D step.
        use_scaler = self.accelerator.mixed_precision == "fp16" and self.device.type == "cuda"
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _build_prompt_source(self) -> None:
        p = self.config.prompts
        if p.mode == "ram":
            cache = p.cache_dir or str(self.output_dir / "tag_cache")
            self.prompt_source = RAMCropPrompts(p.ram_weights, cache, self.device)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.unwrap().named_parameters() if p.requires_grad}

    # ================================================================== data
    def build_dataset(self) -> torch.utils.data.Dataset:
        from codsr.data.datasets import HQImageDataset, PairedImageDataset
        from codsr.data.degradation import DegradationConfig

        cfg, d = self.config, self.config.data
        prompt_fn = None
        if cfg.prompts.mode == "file":
            prompt_fn = FilePrompts(read_prompt_file(cfg.prompts.file), str(cfg.prompts.file))
        degradation = DegradationConfig.from_dict(d.degradation)
        if d.train_hq:
            ds = HQImageDataset(
                d.train_hq, crop_size=d.crop_size, flip=d.flip, degradation=degradation,
                degrade_in=d.degrade_in, seed=cfg.seed, small_images=d.small_images, prompt_fn=prompt_fn,
                lq_resize=d.lq_resize,
            )  # fmt: skip
            paths = ds.paths
        elif d.train_lq_dir:
            if d.degrade_in == "batch":
                raise ConfigError(
                    "config key 'data.degrade_in': 'batch' needs data.train_hq (pairs are already degraded)"
                )
            ds = PairedImageDataset(
                d.train_lq_dir, d.train_hq_dir, crop_size=d.crop_size, flip=d.flip, seed=cfg.seed,
                small_images=d.small_images, prompt_fn=prompt_fn, resize_back_modes=degradation.resize_back_modes,
                lq_resize=d.lq_resize,
            )  # fmt: skip
            paths = [hq for _, hq in ds.pairs]
        else:
            raise ConfigError(
                "config key 'data.train_hq' is not set: pass HQ image folders (--set data.train_hq=/path/to/hq) "
                "or pre-degraded pairs (data.train_lq_dir + data.train_hq_dir)"
            )
        if isinstance(prompt_fn, FilePrompts):
            prompt_fn.check(paths)
        return ds

    def collate_fn(self) -> Callable:
        from codsr.data.datasets import collate

        return collate

    # ================================================================== the step
    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """Per-sample t ~ U{timestep_min..timestep_max} (inclusive) from the ``timesteps`` generator."""
        t = self.config.train
        return torch.randint(
            t.timestep_min, t.timestep_max + 1, (batch_size,), generator=self.rng["timesteps"]
        )

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are used at the (0-based) optimizer step ``step``."""
        return self.disc is not None and step >= self.config.gan.start_step

    def prompts_for(self, batch: Mapping[str, Any], hq: torch.Tensor) -> list[str]:
        mode = self.config.prompts.mode
        b = hq.shape[0]
        if mode == "none":
            prompts = [""] * b
        elif mode == "file":
            prompts = list(batch["prompt"])
        else:
            prompts = list(self.prompt_source(hq, batch))
        return apply_null_text(prompts, self.config.prompts.null_text_prob, self.rng["prompts"])

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if all(p == "" for p in prompts):
            if self._empty_embeds is None:
                self._empty_embeds = encode_prompts(self.text_encoder, self.tokenizer, [""], self.device)
            return self._empty_embeds.expand(len(prompts), -1, -1)
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device)

    def get_lq(self, batch: Mapping[str, Any], hq: torch.Tensor) -> torch.Tensor:
        if self.degrader is not None:
            how = self.config.data.lq_resize
            if how == "torch":
                return self.degrader(hq, kernels=batch)["lq"].to(self.device)
            from codsr.data.datasets import resize_lq_back

            # PIL resizes run on the CPU, with the degrader's generator (its state is checkpointed).
            small = (self.degrader(hq, kernels=batch, resize_to_hq=False)["lq_small"] + 1) / 2
            lq, _ = resize_lq_back(
                small,
                tuple(hq.shape[-2:]),
                self.degrader.generator,
                how,
                self.degrader.config.resize_back_modes,
            )
            return (lq * 2 - 1).to(self.device)
        return batch["lq"].to(self.device, non_blocking=True)

    def train_micro_step(self, batch: Any, accumulation: int) -> dict[str, float]:
        from codsr.training.discriminator import GANLossConfig, generator_loss

        acc = self.accelerator
        hq = batch["hq"].to(self.device, non_blocking=True)
        lq = self.get_lq(batch, hq)
        embeds = self.encode(self.prompts_for(batch, hq))
        timesteps = self.sample_timesteps(hq.shape[0]).to(self.device)
        gan_on = self.gan_active(self.step)
        logs: dict[str, float] = {}
        with acc.autocast():
            x_hat, _ = self.model(lq, embeds, timesteps, generator=self.rng["noise"])
            rec = self.loss_fn(x_hat, hq)
            loss = rec["loss"]
            if gan_on:
                g = self.config.gan
                heads = self.disc.heads
                # Frozen heads: the adversarial gradient reaches x̂ but never the D parameters.
                heads.requires_grad_(False)
                try:
                    gan_g = generator_loss(
                        self.disc, x_hat, GANLossConfig(weight=g.weight, start_step=g.start_step)
                    )
                finally:
                    heads.requires_grad_(True)
                loss = loss + gan_g
                logs["gan_g"] = float(gan_g.detach())
        acc.backward(loss / accumulation)
        logs.update(
            loss=float(loss.detach()), mse=float(rec["mse"].detach()), lpips=float(rec["lpips"].detach())
        )
        if gan_on:
            logs.update(self._discriminator_backward(hq, x_hat.detach(), accumulation))
        return logs

    def _discriminator_backward(
        self, hq: torch.Tensor, fake: torch.Tensor, accumulation: int
    ) -> dict[str, float]:
        from codsr.training.discriminator import GANLossConfig, discriminator_loss

        g = self.config.gan
        with self.accelerator.autocast():
            d = discriminator_loss(
                self.disc, hq, fake, GANLossConfig(weight=g.weight, start_step=g.start_step)
            )
        self.d_scaler.scale(d["loss"] / accumulation).backward()
        self._d_pending = True
        return {
            "d_loss": float(d["loss"].detach()),
            "d_real": float(d["real"].detach()),
            "d_fake": float(d["fake"].detach()),
        }

    def after_optimizer_step(self) -> dict[str, float]:
        if not self._d_pending:
            return {}
        self._d_pending = False
        heads = list(self.disc.head_parameters())
        if self.world > 1:
            import torch.distributed as dist

            for p in heads:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
        self.d_scaler.unscale_(self.d_optimizer)
        d_norm = torch.nn.utils.clip_grad_norm_(heads, self.config.gan.max_grad_norm)
        self.d_scaler.step(self.d_optimizer)
        self.d_scaler.update()
        self.d_optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            import torch.distributed as dist

            # spectral-norm power-iteration vectors: keep every rank's copy identical
            for buf in self.disc.heads.buffers():
                dist.broadcast(buf, src=0)
        return {"d_grad_norm": float(d_norm)}

    # ================================================================== state
    def extra_state_dict(self) -> dict[str, Any]:
        if self.disc is None:
            return {}
        return {
            "disc_heads": self.disc.heads.state_dict(),
            "disc_optimizer": self.d_optimizer.state_dict(),
            "disc_scaler": self.d_scaler.state_dict(),
        }

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.disc is None:
            return
        if "disc_heads" not in state:
            log.warning("the training state has no discriminator: it starts fresh")
            return
        self.disc.heads.load_state_dict(state["disc_heads"])
        self.d_optimizer.load_state_dict(state["disc_optimizer"])
        self.d_scaler.load_state_dict(state["disc_scaler"])

    def rank_state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.disc is not None:
            out["disc_augment"] = self.disc.augment_generator.get_state()
        if self.degrader is not None:
            out["degrader"] = self.degrader.state_dict()
        return out

    def load_rank_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.disc is not None and "disc_augment" in state:
            self.disc.augment_generator.set_state(state["disc_augment"])
        if self.degrader is not None and "degrader" in state:
            self.degrader.load_state_dict(state["degrader"])

    # ================================================================== export / validation
    def checkpoint_metadata(self, step: int) -> dict[str, Any]:
        cfg = self.config
        return {
            "base_model": cfg.model.base_model,
            "base_model_revision": cfg.model.revision,
            "default_timestep": 100,
            "training_stage": 1,
            "training_step": step,
        }

    def _attach_generator(self, gen: CODSRModel, comps) -> None:
        """Shared by both stages: the generator, its DDP-wrapped network, the frozen text
        encoder and the reconstruction loss (1·MSE + 2·LPIPS)."""
        from codsr.training.losses import ReconstructionLoss

        cfg = self.config
        self.generator = gen
        self.model = Stage1Network(gen)
        self.text_encoder = comps.text_encoder.requires_grad_(False).eval().to(self.device)
        self.tokenizer = comps.tokenizer
        lo = cfg.loss
        self.loss_fn = ReconstructionLoss(
            lo.mse_weight,
            lo.lpips_weight,
            pretrained_backbone=lo.lpips_pretrained,
            vgg_weights=lo.vgg_weights,
        ).to(self.device)

    # File-name stem of exported checkpoints (Stage2Trainer: "codsr_stage2").
    checkpoint_stem = "codsr_stage1"

    def export(self, step: int, final: bool) -> list[Path]:
        """CODSR checkpoints of ``step`` under ``<output_dir>/checkpoints/`` (release ``.pkl``
        and/or ``.safetensors``; ``_ema`` copies with EMA); the final one is also copied to
        ``<output_dir>/<checkpoint_stem>.<ext>``."""
        fmt = self.config.checkpoint.format
        exts = {"pkl": [".pkl"], "safetensors": [".safetensors"], "both": [".pkl", ".safetensors"]}[fmt]
        variants = [("", False)] + ([("_ema", True)] if self.ema is not None else [])
        written: list[Path] = []
        for suffix, use_ema in variants:
            if use_ema:
                self.ema.swap()
            try:
                meta = {**self.checkpoint_metadata(step), "ema": use_ema}
                ckpt = self.generator.export_checkpoint(meta)
            finally:
                if use_ema:
                    self.ema.swap()
            for ext in exts:
                path = ckpt.save(
                    self.output_dir / "checkpoints" / f"{self.checkpoint_stem}_step{step:06d}{suffix}{ext}"
                )
                write_provenance(path, meta)  # the base model it belongs to (.pkl has no header)
                written.append(path)
                if final:
                    final_path = self.output_dir / f"{self.checkpoint_stem}{suffix}{ext}"
                    shutil.copyfile(path, final_path)
                    write_provenance(final_path, meta)
                    written.append(final_path)
        return written

    def validation_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed (LQ, HQ) crops in [-1, 1] for validation; empty when none are configured."""
        if self._validation_set is not None:
            return self._validation_set
        from codsr.data.datasets import HQImageDataset, PairedImageDataset
        from codsr.data.degradation import DegradationConfig

        v = self.config.validation
        if v.lq_dir:
            # validation LQ is upsampled exactly as inference does (PIL bicubic, float)
            ds = PairedImageDataset(v.lq_dir, v.hq_dir, crop_size=v.crop_size, flip=False, seed=v.seed,
                                    resize_back_modes=("bicubic",), lq_resize="inference")  # fmt: skip
        elif v.hq:
            ds = HQImageDataset(v.hq, crop_size=v.crop_size, flip=False, seed=v.seed, lq_resize="inference",
                                degradation=DegradationConfig.from_dict(self.config.data.degradation))  # fmt: skip
        else:
            log.warning("validation.every is set but no validation images are configured (validation.hq or "
                        "validation.lq_dir/hq_dir): validation is skipped")  # fmt: skip
            self._validation_set = []
            return self._validation_set
        n = min(v.num_images, len(ds))
        self._validation_set = [(ds[i]["lq"][None], ds[i]["hq"][None]) for i in range(n)]
        return self._validation_set

    @torch.no_grad()
    def restore(self, lq_m11: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        """One-step restoration with the current weights (empty prompt), in [-1, 1].

        Noise comes from a CPU generator seeded ``seed`` (posterior first, RGPA second, docs/method.md#generator-forward),
        so the result equals ``CODSRPipeline.restore`` on an exported checkpoint.
        """
        was_training = self.model.training
        self.model.eval()
        g = torch.Generator().manual_seed(seed)
        lq = lq_m11.to(self.device)
        t = torch.full((lq.shape[0],), int(timestep), dtype=torch.long, device=self.device)
        with self.accelerator.autocast():
            out = self.generator(lq, self.encode([""] * lq.shape[0]), t, generator=g)
            x = self.generator.decode(out.z_h)
        self.model.train(was_training)
        return x.float()

    def validate(self, step: int) -> dict[str, float]:
        pairs = self.validation_pairs()
        if not pairs:
            return {}
        from PIL import Image

        v = self.config.validation
        rows, scores, base = [], [], []
        for i, (lq, hq) in enumerate(pairs):
            out = self.restore(lq, v.timestep, v.seed + i).cpu()
            scores += psnr_y_batch(out, hq)
            base += psnr_y_batch(lq, hq)
            rows.append(torch.cat([lq[0], out[0], hq[0]], dim=-1))
        grid = ((torch.cat(rows, dim=-2).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        out_dir = self.output_dir / "validation"
        out_dir.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(grid)
        atomic_write(out_dir / f"step{step:06d}.png", lambda f: img.save(f, format="PNG"))
        if self.logger is not None:
            self.logger.log_images(
                step, "val/lq_out_hq", torch.from_numpy(grid).permute(2, 0, 1)[None].float() / 255
            )
        return {"psnr_y": sum(scores) / len(scores), "psnr_y_lq": sum(base) / len(base)}

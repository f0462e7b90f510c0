"""CODSR stage-2 training: text-matching guidance (TMG) + VSD on the frozen stage-1 model
(paper §3.3–3.4 and Eq. 5, docs/method.md#stage-2).

Set-up (docs/stage2.md §6): the stage-1 checkpoint is loaded unmerged, the ``*_alignment``
adapters are added (same rank and modules as stage 1) and only their ``attn2`` tensors train
(:func:`configure_stage2_trainable`: 16 cross-attention layers × q/k/v/out in SD 2.1); a
:class:`~codsr.stage2.attention.CrossAttentionCapture` records the cross-attention of the
generator's UNet call; VSD runs on a second, plain SD UNet with its own fake-score LoRA and AdamW.

Per micro-batch (global batch = ``train.batch_size`` × accumulation × processes):

1. HQ crop, LQ, caption (RAM tags of the HQ crop), nouns and their masks — precomputed by
   ``codsr masks`` (``masks.mode: offline``) or computed here with Grounded-SAM2 (``online``);
   null-text dropout (``prompts.null_text_prob``, release 0.2) empties the caption and drops the
   masks with it;
2. ``t ~ U{50..250}`` per sample and the generator forward (docs/method.md#generator-forward) from seeded generators;
3. ``loss = 1·MSE + 2·LPIPS + 2·L_VSD + 0.5·L_area + 0.025·L_bce`` (release; the paper: TMG over
   all attn2 layers with ``1·L_area``), backward;
4. the fake-score loss (ε-MSE on the detached ẑ_H) is backpropagated into the fake-score LoRA.

After the generator's optimizer step, the fake-score gradients (accumulated over the
micro-batches, averaged over processes) are clipped to 1.0 and applied by its AdamW, so every
process keeps the same fake score. The generator's gradients are synchronised by DDP (the
release's stage 2 never synchronises them); its loss always contains the reconstruction term,
so every trainable tensor gets a gradient in every backward and DDP needs no
``find_unused_parameters``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from codsr.model.codsr import CODSRModel
from codsr.precision import PRECISIONS, resolve_dtype
from codsr.training.config import ConfigError, TrainConfig
from codsr.training.provenance import check_base_model
from codsr.training.stage1 import Stage1Trainer
from codsr.training.trainer import TrainingStateError

__all__ = [
    "Stage2Trainer",
    "alignment_attn2_parameter",
    "configure_stage2_trainable",
    "mask_status_summary",
]

log = logging.getLogger("codsr.training")


def alignment_attn2_parameter(name: str) -> bool:
    """Whether a parameter name is a LoRA tensor of an ``*_alignment`` adapter on a cross-attention
    (``attn2``) layer — the only tensors stage 2 trains (docs/method.md#lora-layout, #stage-2)."""
    return "alignment" in name and ".attn2." in name and (".lora_A." in name or ".lora_B." in name)


def configure_stage2_trainable(gen: CODSRModel) -> dict[str, nn.Parameter]:
    """Freeze everything, then train only the attn2 tensors of the alignment LoRA (docs/method.md#stage-2).

    Returns the trainable parameters by name; raises when there are none (the alignment
    adapters were not added) or when one lies outside the UNet.
    """
    gen.requires_grad_(False)
    trainable = {n: p for n, p in gen.named_parameters() if alignment_attn2_parameter(n)}
    if not trainable:
        raise RuntimeError("the generator has no attn2 alignment LoRA: call add_alignment_lora() first")
    outside = [n for n in trainable if not n.startswith("unet.")]
    if outside:
        raise RuntimeError(f"unexpected alignment LoRA parameter {outside[0]!r} outside the UNet")
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def mask_status_summary(metas: Sequence[Mapping[str, Any]]) -> Counter:
    """Counts of the per-noun statuses (``ok``, ``no_box``, ``empty_mask``, ...) in mask sidecars."""
    counts: Counter = Counter()
    for meta in metas:
        for entry in meta.get("masks", []):
            counts[str(entry.get("status"))] += 1
    return counts


def _to_pil(hq_m11: torch.Tensor):
    """A 3×H×W image in [-1, 1] back to the uint8 PIL image it came from (exact for dataset crops)."""
    from PIL import Image

    arr = ((hq_m11.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


class Stage2Trainer(Stage1Trainer):
    """Stage-2 trainer; see the module docstring. ``trainer.train()`` runs it.

    Reuses the stage-1 trainer's prompts (online mode), text encoding, timestep sampling,
    validation and restoration; replaces the models, the data, the step and the export.
    """

    stage = "2"
    run_name = "codsr"
    # "vsd": VSD and fake-score timesteps and noise, apart from the generator's noise.
    rng_streams = ("timesteps", "noise", "prompts", "vsd")

    def __init__(self, config: TrainConfig, accelerator: Any = None) -> None:
        super().__init__(config, accelerator)
        self.capture: Any = None
        self.tmg: Any = None
        self.vsd: Any = None
        self.vsd_optimizer: torch.optim.Optimizer | None = None
        self.vsd_scaler: Any = None
        self.segmenter: Any = None
        self.noun_backend: str | None = None
        self._nouns: dict[str, list[str]] = {}
        self._warned_errors: set[tuple[str, str]] = set()

    @property
    def online(self) -> bool:
        return self.config.masks.mode == "online"

    # ================================================================== models
    def _check_config(self) -> None:
        cfg = self.config
        if not cfg.model.init_checkpoint:
            raise ConfigError(
                "config key 'model.init_checkpoint' is not set: stage 2 starts from a stage-1 checkpoint "
                "(--set model.init_checkpoint=runs/stage1/codsr_stage1.pkl)"
            )
        if not Path(cfg.model.init_checkpoint).expanduser().is_file():
            raise ConfigError(
                f"config key 'model.init_checkpoint': {cfg.model.init_checkpoint} does not exist; train stage 1 "
                "first (codsr train --config stage1) or download the release's checkpoint"
            )
        # gan.enabled=false and data.degrade_in=worker are rules of TrainConfig (checked on load).

    def build_models(self) -> None:
        from codsr.model.base import load_base_components
        from codsr.model.checkpoint import load_checkpoint
        from codsr.stage2.attention import CrossAttentionCapture
        from codsr.stage2.tmg import TMGLoss

        self._check_config()
        cfg = self.config
        comps = load_base_components(cfg.model.base_model, revision=cfg.model.revision)
        gen = CODSRModel(comps.vae, comps.unet, comps.scheduler)
        ckpt = load_checkpoint(Path(cfg.model.init_checkpoint).expanduser())
        # stage 2 must run on the base its stage-1 checkpoint was trained on
        check_base_model(Path(cfg.model.init_checkpoint).expanduser(), cfg.model.base_model, cfg.model.revision,
                         ckpt.metadata)  # fmt: skip
        with warnings.catch_warnings():
            # peft warns on every adapter after the first; several adapters are the design (docs/method.md#lora-layout).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            gen.load_checkpoint(ckpt, merge_unet=False)
            if not ckpt.has_alignment:  # a stage-2 checkpoint continues with its own alignment LoRA
                gen.add_alignment_lora()
        configure_stage2_trainable(gen)
        if cfg.train.gradient_checkpointing:
            # the TMG maps keep their graph: diffusers' checkpointing is non-reentrant (tested)
            gen.unet.enable_gradient_checkpointing()
            gen.vae.enable_gradient_checkpointing()
        t = cfg.tmg
        if t.area_weight > 0 or t.bce_weight > 0:
            # before accelerator.prepare: it patches the UNet's processors in place
            self.capture = CrossAttentionCapture(gen.unet, layers=t.layers)
            self.tmg = TMGLoss(comps.tokenizer, t.area_weight, t.bce_weight, t.min_mask_pixels)
        self._attach_generator(gen, comps)
        if cfg.vsd.weight > 0:
            unet = load_base_components(
                cfg.model.base_model, revision=cfg.model.revision, components=("unet",)
            ).unet
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self._build_vsd(unet, comps.scheduler)
        if self.online:
            self._build_online_masks()

    def vsd_base_dtype(self) -> torch.dtype:
        """dtype of the VSD's frozen SD UNet (``vsd.base_dtype``; "auto": the mixed-precision dtype on a GPU)."""
        name = self.config.vsd.base_dtype
        if name != "auto":
            return resolve_dtype(name)
        mp = self.config.train.mixed_precision
        return resolve_dtype(mp) if mp in PRECISIONS and self.device.type == "cuda" else torch.float32

    def _build_vsd(self, unet: nn.Module, scheduler: Any) -> None:
        from codsr.stage2.vsd import NEGATIVE_PROMPT, VSDLoss

        v = self.config.vsd
        dtype = self.vsd_base_dtype()
        negative = self.encode([v.negative_prompt if v.negative_prompt is not None else NEGATIVE_PROMPT])
        self.vsd = VSDLoss(unet, scheduler, negative, rank=v.rank, guidance_scale=v.guidance_scale,
                           timestep_range=(v.timestep_min, v.timestep_max),
                           base_dtype=None if dtype == torch.float32 else dtype).to(self.device)  # fmt: skip
        if self.world > 1:
            import torch.distributed as dist

            # The fake score is not wrapped by DDP: start every process from rank 0's LoRA.
            for p in self.vsd.fake_score_parameters():
                dist.broadcast(p.data, src=0)
        self.vsd_optimizer = self.vsd.make_optimizer(
            lr=v.lr, betas=tuple(v.betas), weight_decay=v.weight_decay
        )
        use_scaler = self.accelerator.mixed_precision == "fp16" and self.device.type == "cuda"
        # Own scaler: the generator's loss scale must not scale (nor skip) the fake-score update.
        self.vsd_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _build_online_masks(self) -> None:
        from codsr.stage2.grounding import GroundedSAM2, GroundingModelNotFoundError
        from codsr.stage2.nouns import NounBackendError, available_backend

        m = self.config.masks
        try:
            self.noun_backend = available_backend(m.noun_backend)
        except NounBackendError as err:
            raise ConfigError(f"config key 'masks.noun_backend': {err}") from err
        try:
            self.segmenter = GroundedSAM2.from_pretrained(
                m.grounding_dino, m.sam2, device=self.device,
                box_threshold=m.box_threshold, text_threshold=m.text_threshold, max_boxes=m.max_boxes,
            )  # fmt: skip
        except GroundingModelNotFoundError as err:
            raise ConfigError(f"config keys 'masks.grounding_dino' / 'masks.sam2': {err}") from err
        self._build_prompt_source()

    # ================================================================== data
    def build_dataset(self) -> torch.utils.data.Dataset:
        if self.online:
            return super().build_dataset()  # HQ crops (or pairs) + prompts; masks come in the loop
        from codsr.data.datasets import SyntheticLQ
        from codsr.data.degradation import DegradationConfig
        from codsr.stage2.dataset import Stage2Dataset

        cfg, d, m = self.config, self.config.data, self.config.masks
        if not m.dir:
            raise ConfigError(
                "config key 'masks.dir' is not set: give the --out folder of `codsr masks` "
                "(or masks.mode=online to segment in the training loop)"
            )
        if not d.train_hq or len(d.train_hq) != 1:
            raise ConfigError(
                f"config key 'data.train_hq' must be the one folder/list given to `codsr masks --data` "
                f"(mask keys are paths relative to it), got {d.train_hq}"
            )
        ds = Stage2Dataset(
            d.train_hq[0], m.dir, degrade=SyntheticLQ(DegradationConfig.from_dict(d.degradation), d.lq_resize),
            flip=d.flip, text_drop_rate=cfg.prompts.null_text_prob, min_mask_pixels=cfg.tmg.min_mask_pixels,
            missing=m.missing, seed=cfg.seed,
        )  # fmt: skip
        sizes = {int(meta["crop"]["size"]) for _, _, meta in ds.items}
        if sizes != {d.crop_size}:
            raise ConfigError(
                f"config key 'data.crop_size' is {d.crop_size} but the masks in {m.dir} were made for crops of "
                f"{sorted(sizes)}; set data.crop_size to match or re-run `codsr masks --crop {d.crop_size}`"
            )
        if self.is_main:
            counts = mask_status_summary([meta for _, _, meta in ds.items])
            failed = sum(v for k, v in counts.items() if k != "ok")
            log.info("stage-2 masks in %s: %d images, noun statuses %s%s", m.dir, len(ds), dict(sorted(counts.items())),
                     f" ({failed} nouns without a mask are excluded from TMG)" if failed else "")  # fmt: skip
            if ds.num_missing:
                log.warning(
                    "%d image(s) of %s have no mask sidecar and are skipped", ds.num_missing, d.train_hq[0]
                )
        return ds

    def collate_fn(self) -> Callable:
        if self.online:
            return super().collate_fn()
        from codsr.stage2.dataset import stage2_collate

        return stage2_collate

    # ================================================================== masks in the loop
    def nouns_of(self, caption: str) -> list[str]:
        """Nouns of a caption (adjectives dropped, docs/method.md#stage-2), cached per caption."""
        if caption not in self._nouns:
            from codsr.stage2.nouns import extract_nouns

            self._nouns[caption] = extract_nouns(caption, self.noun_backend)
        return self._nouns[caption]

    def online_masks(
        self, hq: torch.Tensor, prompts: Sequence[str]
    ) -> tuple[list[list[str]], torch.Tensor, torch.Tensor, Counter]:
        """Grounded-SAM2 masks of each sample's nouns on its HQ crop (``masks.mode: online``).

        Returns (nouns per sample, B×N×H×W masks, B×N validity, status counts). A sample whose
        prompt was dropped gets no nouns. Failed nouns are invalid, counted and — for detector
        or SAM exceptions — logged with their message; never an empty mask silently used.
        """
        b, _, h, w = hq.shape
        min_pixels = self.config.tmg.min_mask_pixels
        nouns = [self.nouns_of(p) if p else [] for p in prompts]
        n_max = max((len(n) for n in nouns), default=0)
        masks = torch.zeros((b, n_max, h, w))
        valid = torch.zeros((b, n_max), dtype=torch.bool)
        counts: Counter = Counter()
        for i, sample_nouns in enumerate(nouns):
            if not sample_nouns:
                continue
            for j, res in enumerate(self.segmenter.segment(_to_pil(hq[i]), sample_nouns)):
                counts[res.status] += 1
                if res.status == "ok":
                    masks[i, j] = torch.from_numpy(np.asarray(res.mask, dtype=np.float32))
                    valid[i, j] = res.pixels >= min_pixels
                elif res.error and (res.noun, res.status) not in self._warned_errors:
                    self._warned_errors.add((res.noun, res.status))
                    log.warning("online mask of %r failed (%s): %s; the noun is left out of TMG",
                                res.noun, res.status, res.error)  # fmt: skip
        return nouns, masks, valid, counts

    # ================================================================== the step
    def batch_conditioning(
        self, batch: Mapping[str, Any], hq: torch.Tensor
    ) -> tuple[list[str], list[list[str]], torch.Tensor, torch.Tensor, dict[str, float]]:
        """(prompts, nouns, masks, mask validity, mask logs) of a batch, after null-text dropout."""
        if not self.online:
            # Stage2Dataset applied the dropout: an empty caption comes with no valid mask.
            return list(batch["prompt"]), list(batch["nouns"]), batch["masks"], batch["mask_valid"], {}
        prompts = self.prompts_for(batch, hq)  # file / RAM tags, then null-text dropout
        nouns, masks, valid, counts = self.online_masks(hq, prompts)
        total = sum(counts.values())
        logs = {"masks_ok": float(counts.get("ok", 0)), "masks_failed": float(total - counts.get("ok", 0))}
        return prompts, nouns, masks, valid, logs

    def train_micro_step(self, batch: Any, accumulation: int) -> dict[str, float]:
        acc = self.accelerator
        hq = batch["hq"].to(self.device, non_blocking=True)
        lq = batch["lq"].to(self.device, non_blocking=True)
        prompts, nouns, masks, valid, logs = self.batch_conditioning(batch, hq)
        embeds = self.encode(prompts)
        timesteps = self.sample_timesteps(hq.shape[0]).to(self.device)
        with acc.autocast():
            # the capture records this UNet call's cross-attention (with its graph)
            x_hat, z_h = self.model(lq, embeds, timesteps, generator=self.rng["noise"])
            rec = self.loss_fn(x_hat, hq)
            loss = rec["loss"]
            if self.tmg is not None:
                t_out = self.tmg(self.capture, prompts, nouns, masks, valid)
                loss = loss + t_out.loss
                logs.update(area=float(t_out.area.detach()), bce=float(t_out.bce.detach()),
                            tmg_masks=float(t_out.num_valid), tmg_skipped=float(t_out.num_skipped))  # fmt: skip
            if self.vsd is not None:
                l_vsd = self.vsd(z_h, embeds, self.rng["vsd"])
                loss = loss + self.config.vsd.weight * l_vsd
                logs["vsd"] = float(l_vsd.detach())
        acc.backward(loss / accumulation)
        if self.capture is not None:
            self.capture.clear()  # drop the maps and their graph
        if self.vsd is not None:
            with acc.autocast():
                l_fake = self.vsd.fake_score_loss(z_h.detach(), embeds, self.rng["vsd"])
            # accumulated over the micro-batches; applied in after_optimizer_step
            self.vsd_scaler.scale(l_fake / accumulation).backward()
            logs["fake_score"] = float(l_fake.detach())
        logs.update(
            loss=float(loss.detach()), mse=float(rec["mse"].detach()), lpips=float(rec["lpips"].detach())
        )
        return logs

    def after_optimizer_step(self) -> dict[str, float]:
        """The fake-score LoRA step (after the generator's), gradients averaged over processes."""
        if self.vsd is None:
            return {}
        params = self.vsd.fake_score_parameters()
        for p in params:
            if p.grad is None:  # every process must all-reduce the same tensors
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            import torch.distributed as dist

            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        self.vsd_scaler.unscale_(self.vsd_optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.vsd.max_grad_norm)
        self.vsd_scaler.step(self.vsd_optimizer)
        self.vsd_scaler.update()
        self.vsd_optimizer.zero_grad(set_to_none=True)
        return {"fake_score_grad_norm": float(norm)}

    # ================================================================== state
    def fake_score_state(self) -> dict[str, torch.Tensor]:
        """The fake-score LoRA tensors by name (empty without VSD)."""
        if self.vsd is None:
            return {}
        return {n: p.detach().cpu().clone() for n, p in self.vsd.unet.named_parameters() if "lora" in n}

    def extra_state_dict(self) -> dict[str, Any]:
        if self.vsd is None:
            return {}
        return {
            "fake_score": self.fake_score_state(),
            "fake_score_optimizer": self.vsd_optimizer.state_dict(),
            "fake_score_scaler": self.vsd_scaler.state_dict(),
        }

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.vsd is None:
            return
        if "fake_score" not in state:
            log.warning("the training state has no VSD fake score: it starts fresh")
            return
        own = dict(self.vsd.unet.named_parameters())
        if set(state["fake_score"]) != {n for n in own if "lora" in n}:
            raise TrainingStateError(
                "the training state's fake-score LoRA does not match vsd.rank / the base UNet"
            )
        with torch.no_grad():
            for n, v in state["fake_score"].items():
                own[n].copy_(v.to(own[n].device, own[n].dtype))
        self.vsd_optimizer.load_state_dict(state["fake_score_optimizer"])
        self.vsd_scaler.load_state_dict(state["fake_score_scaler"])

    # ================================================================== export / validation
    def checkpoint_metadata(self, step: int) -> dict[str, Any]:
        cfg = self.config
        return {
            **super().checkpoint_metadata(step),
            "training_stage": 2,
            "tmg_layers": cfg.tmg.layers,
            "init_checkpoint": str(cfg.model.init_checkpoint),
        }

    # Exported like stage 1 (Stage1Trainer.export); the checkpoints carry the ``*_alignment``
    # adapters and the ``_default``/``_sam`` module lists of the release's stage-2 format.
    checkpoint_stem = "codsr_stage2"

    @torch.no_grad()
    def restore(self, lq_m11: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        """One-step restoration with the current weights (empty prompt); no attention is recorded."""
        if self.capture is None:
            return super().restore(lq_m11, timestep, seed)
        self.capture.enabled = False
        try:
            return super().restore(lq_m11, timestep, seed)
        finally:
            self.capture.enabled = True

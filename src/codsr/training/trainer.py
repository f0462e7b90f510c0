"""Training infrastructure shared by the CODSR trainers (accelerate set-up, loop, checkpoints, resume).

:class:`BaseTrainer` owns everything that is not specific to a stage:

* the :class:`accelerate.Accelerator` (devices, DDP, mixed precision) and the gradient
  accumulation (``train.batch_size`` × accumulation × processes = global batch);
* the AdamW optimizer over :meth:`trainable_parameters` with a constant (optionally warm-up) LR,
  gradient clipping, optional EMA;
* the loop: ``for step``: accumulate :meth:`train_micro_step` over micro-batches → clip → step →
  :meth:`after_optimizer_step` (e.g. the discriminator) → log / save state / export / validate;
* the training state for exact resumption (``<output_dir>/state/step-XXXXXXXX/``: trainable
  weights, optimizer, scheduler, grad scaler, EMA, :meth:`extra_state_dict`, and per rank the
  global RNGs, the named generators of :class:`TrainingRNG`, the data position and
  :meth:`rank_state_dict`); ``resume: latest`` or a state folder restores all of it;
* logging to ``<output_dir>/logs/metrics.jsonl`` and TensorBoard, and a tqdm progress bar.

A stage subclasses it and implements :meth:`build_models`, :meth:`trainable_parameters`,
:meth:`build_dataset`, :meth:`train_micro_step` and :meth:`export`, optionally
:meth:`after_optimizer_step`, :meth:`validate` and the state hooks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from codsr.atomic import atomic_write_json, atomic_write_text
from codsr.training.config import TrainConfig
from codsr.training.trainer_utils import (
    EMA,
    STATE_COMPLETE,
    DataStream,
    MetricsLogger,
    TrainingRNG,
    capture_global_rng,
    find_latest_state,
    prune_states,
    restore_global_rng,
    state_dir_name,
)

__all__ = ["BaseTrainer", "ConstantWithWarmup", "TrainingStateError"]

log = logging.getLogger("codsr.training")


class TrainingStateError(RuntimeError):
    """A training state that cannot be resumed (missing folder, other model, other stage)."""


class ConstantWithWarmup:
    """LR factor: linear warm-up over ``warmup_steps``, then 1 (``constant``: no warm-up)."""

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        return float(step + 1) / float(self.warmup_steps)


class BaseTrainer:
    """Stage-independent training loop; see the module docstring for the hooks."""

    stage = "base"
    run_name = "codsr"
    rng_streams: tuple[str, ...] = ("timesteps", "noise", "prompts")

    def __init__(self, config: TrainConfig, accelerator: Any = None) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.train.mixed_precision)
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.accum = config.accumulation_steps(self.world)
        self.output_dir = Path(config.output_dir)
        self.state_root = self.output_dir / "state"
        self.step = 0  # optimizer steps completed
        self.rng = TrainingRNG(config.seed, self.rank, self.rng_streams)
        self.ema: EMA | None = None
        self.logger: MetricsLogger | None = None
        self.callbacks: list[Callable[[BaseTrainer, dict[str, float]], None]] = []
        self.model: nn.Module | None = None
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.data: DataStream | None = None
        self.resumed_from: Path | None = None
        self.exported: list[Path] = []
        self._params: dict[str, nn.Parameter] = {}
        self._is_setup = False
        if config.train.mixed_precision == "fp16" and self.device.type == "cpu":
            log.warning("train.mixed_precision=fp16 has no effect on the CPU: training runs in float32")
        if config.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ================================================================== hooks (override)
    def build_models(self) -> None:
        """Create the networks; set ``self.model`` (the module DDP wraps) and freeze what is frozen."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name → parameter of everything the optimizer updates (stable order)."""
        raise NotImplementedError

    def build_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate_fn(self) -> Callable | None:
        return None

    def train_micro_step(self, batch: Any, accumulation: int) -> dict[str, float]:
        """Forward and backward of one micro-batch; backpropagate ``loss / accumulation``
        (``self.accelerator.backward``) and return scalars to log (averaged over micro-batches)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> dict[str, float]:
        """Called after each generator optimizer step (e.g. a discriminator step)."""
        return {}

    def export(self, step: int, final: bool) -> list[Path]:
        """Write inference checkpoints for ``step`` (main process only); return their paths."""
        return []

    def validate(self, step: int) -> dict[str, float]:
        """Validation at ``step`` (main process only); returns scalars to log."""
        return {}

    def extra_state_dict(self) -> dict[str, Any]:
        """Stage-specific state shared by all ranks (e.g. the discriminator)."""
        return {}

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def rank_state_dict(self) -> dict[str, Any]:
        """Stage-specific per-rank state (e.g. generators seeded by rank)."""
        return {}

    def load_rank_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # ================================================================== set-up
    def unwrap(self, module: nn.Module | None = None) -> nn.Module:
        return self.accelerator.unwrap_model(module if module is not None else self.model)

    def setup(self) -> None:
        """Build models, optimizer, data, EMA, logger; resume when asked. Idempotent."""
        if self._is_setup:
            return
        cfg = self.config
        # Same seed on every rank: identical LoRA initialisation everywhere.
        torch.manual_seed(cfg.seed)
        self.build_models()
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.build_models() must set self.model")
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("no trainable parameters")
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            list(params.values()), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
        )
        warmup = o.warmup_steps if o.lr_scheduler == "constant_with_warmup" else 0
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        # Not prepared: accelerate would step it once per process.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, ConstantWithWarmup(warmup)
        )
        self._params = self.trainable_parameters()  # same objects, now on the device
        # Different processes see different data and draw different noise.
        torch.manual_seed(cfg.seed + self.rank)
        self.data = DataStream(
            self.build_dataset(),
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            num_workers=cfg.data.num_workers,
            collate_fn=self.collate_fn(),
            pin_memory=self.device.type == "cuda",
        )
        if cfg.ema.enabled:
            self.ema = EMA(self._params, cfg.ema.decay)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", cfg.to_yaml())
            self.logger = MetricsLogger(self.output_dir / "logs", cfg.logging.tensorboard)
            if self.logger.tensorboard_error:
                log.warning(self.logger.tensorboard_error)
        self._resume()
        self._is_setup = True

    # ================================================================== loop
    def train(self) -> dict[str, Any]:
        """Run until ``max_steps``; returns ``{"step", "logs", "exported", "resumed_from"}``."""
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.config
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{self.run_name} {self.stage}",
                   disable=not (self.is_main and cfg.logging.progress_bar), dynamic_ncols=True)  # fmt: skip
        logs: dict[str, float] = {}
        window: dict[str, list[float]] = defaultdict(list)
        self.model.train()
        while self.step < cfg.max_steps:
            logs = self.optimizer_step()
            self.step += 1
            for k, v in logs.items():
                window[k].append(v)
            bar.update(1)
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.max_steps:
                mean = {k: float(np.mean(v)) for k, v in window.items()}
                window.clear()
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in mean.items() if k in ("loss", "mse", "lpips", "gan_g")}
                )
                if self.logger is not None:
                    self.logger.log(self.step, {f"train/{k}": v for k, v in mean.items()})
            self._after_step(logs)
            for callback in self.callbacks:
                callback(self, logs)
        bar.close()
        if self.logger is not None:
            self.logger.close()
        self.accelerator.wait_for_everyone()
        return {
            "step": self.step,
            "logs": logs,
            "exported": list(self.exported),
            "resumed_from": self.resumed_from,
        }

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step: ``accum`` micro-batches, clip, step, then :meth:`after_optimizer_step`."""
        acc = self.accelerator
        totals: dict[str, float] = defaultdict(float)
        for micro in range(self.accum):
            batch = self.data.next()
            last = micro == self.accum - 1
            ctx = acc.no_sync(self.model) if (not last and self.world > 1) else nullcontext()
            with ctx:
                out = self.train_micro_step(batch, self.accum)
            for k, v in out.items():
                totals[k] += float(v) / self.accum
        grad_norm = acc.clip_grad_norm_(list(self._params.values()), self.config.train.max_grad_norm)
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        totals.update(self.after_optimizer_step())
        if grad_norm is not None:
            totals["grad_norm"] = float(grad_norm)
        totals["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return dict(totals)

    def _after_step(self, logs: Mapping[str, float]) -> None:
        cfg = self.config
        final = self.step == cfg.max_steps
        if self.step % cfg.state_every == 0 or final:
            self.save_state()
        if self.step % cfg.checkpoint.every == 0 or final:
            if self.is_main:
                self.exported.extend(self.export(self.step, final))
            self.accelerator.wait_for_everyone()
        v = cfg.validation
        if v.every and (self.step % v.every == 0 or final):
            if self.is_main:
                with self._ema_weights():
                    scores = self.validate(self.step)
                if scores and self.logger is not None:
                    self.logger.log(self.step, {f"val/{k}": s for k, s in scores.items()})
                self.model.train()
            self.accelerator.wait_for_everyone()

    def _ema_weights(self):
        """Context: EMA weights in the model while validating (no-op without EMA)."""
        trainer = self

        class _Swap:
            def __enter__(self) -> None:
                if trainer.ema is not None:
                    trainer.ema.swap()

            def __exit__(self, *exc: object) -> None:
                if trainer.ema is not None:
                    trainer.ema.swap()

        return _Swap()

    # ================================================================== state / resume
    def save_state(self) -> Path:
        """Write the full training state of the current step (all ranks must call it)."""
        acc = self.accelerator
        final = self.state_root / state_dir_name(self.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.is_main:
            from safetensors.torch import save_file

            save_file(
                {k: p.detach().cpu().contiguous() for k, p in self._params.items()},
                str(tmp / "trainable.safetensors"),
            )
            shared = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "extra": self.extra_state_dict(),
            }
            torch.save(shared, tmp / "trainer.pt")
        rank_state = {
            "global_rng": capture_global_rng(),
            "streams": self.rng.state_dict(),
            "data": self.data.state_dict(),
            "extra": self.rank_state_dict(),
        }
        torch.save(rank_state, tmp / f"rank{self.rank:03d}.pt")
        acc.wait_for_everyone()
        if self.is_main:
            meta = {
                "step": self.step,
                "stage": self.stage,
                "world_size": self.world,
                "accumulation": self.accum,
                "seed": self.config.seed,
                "config": self.config.to_dict(),
            }
            atomic_write_json(tmp / STATE_COMPLETE, meta)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_states(self.state_root, self.config.checkpoint.keep_states)
        acc.wait_for_everyone()
        return final

    def resolve_resume(self) -> Path | None:
        """The state folder named by ``config.resume`` (``latest``: newest complete one, or None)."""
        r = self.config.resume
        if r is None or r == "" or str(r).lower() in ("none", "false", "no"):
            return None
        if str(r).lower() == "latest":
            return find_latest_state(self.state_root)
        path = Path(r).expanduser()
        if (path / STATE_COMPLETE).is_file():
            return path
        if path.is_dir() and find_latest_state(path / "state") is not None:
            return find_latest_state(path / "state")  # an output_dir was given
        raise TrainingStateError(
            f"resume={r!r}: not a complete training state folder (expected {STATE_COMPLETE} inside, e.g. "
            f"{self.state_root / state_dir_name(1000)}); use resume=latest to pick the newest state of output_dir"
        )

    def _resume(self) -> None:
        path = self.resolve_resume()
        if path is None:
            if self.config.resume is not None and self.is_main:
                log.info(
                    "resume=%s: no training state under %s, starting from step 0",
                    self.config.resume,
                    self.state_root,
                )
            return
        meta = json.loads((path / STATE_COMPLETE).read_text(encoding="utf-8"))
        if meta.get("stage") != self.stage:
            raise TrainingStateError(
                f"{path} is a stage-{meta.get('stage')} state; this trainer is stage {self.stage}"
            )
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
        missing = sorted(set(self._params) - set(weights))
        unexpected = sorted(set(weights) - set(self._params))
        if missing or unexpected:
            raise TrainingStateError(
                f"{path}/trainable.safetensors does not match the model: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]} (was it written with other LoRA ranks or another base model?)"
            )
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        shared = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(shared["optimizer"])
        self.lr_scheduler.load_state_dict(shared["lr_scheduler"])
        if shared["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(shared["scaler"])
        if self.ema is not None:
            if shared["ema"] is None:
                raise TrainingStateError(f"{path} has no EMA weights but ema.enabled is true")
            self.ema.load_state_dict(shared["ema"])
        self.load_extra_state_dict(shared["extra"])
        rank_file = path / f"rank{self.rank:03d}.pt"
        if meta.get("world_size") != self.world or not rank_file.is_file():
            log.warning(
                "resuming %s written by %s process(es) with %s: data order and noise will differ from an "
                "uninterrupted run", path, meta.get("world_size"), self.world,
            )  # fmt: skip
            self.data.load_state_dict({"epoch": 0, "batch": 0})
        else:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            restore_global_rng(rank_state["global_rng"])
            self.rng.load_state_dict(rank_state["streams"])
            self.data.load_state_dict(rank_state["data"])
            self.load_rank_state_dict(rank_state["extra"])
        self.step = int(meta["step"])
        self.resumed_from = path
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

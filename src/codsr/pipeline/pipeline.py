"""CODSRPipeline: one-step CODSR super-resolution of images (docs/method.md#inference).

``restore`` is the model's forward (:meth:`codsr.model.codsr.CODSRModel.forward`) on a prepared LQ
tensor, with its stages tiled by a :class:`~codsr.pipeline.tiling.TilePlan` (reproducible from one
seeded CPU generator); ``__call__`` adds the release's image handling: resizing, tagging, prompt
assembly, colour correction and output conversion.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from codsr.model.base import load_base_components
from codsr.model.checkpoint import DEFAULT_TIMESTEP, CODSRCheckpoint
from codsr.model.codsr import CODSRModel
from codsr.model.pretrained import plan_load, push_pipeline_folder, save_pipeline_folder
from codsr.pipeline.color_fix import color_fix as apply_color_fix
from codsr.pipeline.image_processing import release_input_size, resize_image, to_tensor01
from codsr.pipeline.tiled_stages import tiled_stages
from codsr.pipeline.tiling import TilePlan, plan

MAX_TIMESTEP = 999

Tagger = Callable[[torch.Tensor], Sequence[str]]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def assemble_prompt(tags: str, user_prompt: str | None) -> str:
    """The release's prompt format ``f"{tags}, {user_prompt},"`` (docs/method.md#inference)."""
    return f"{tags}, {user_prompt or ''},"


class CODSRPipeline:
    """One-step CODSR super-resolution on Stable Diffusion 2.1-base."""

    def __init__(
        self,
        generator: CODSRModel,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        *,
        tagger: Tagger | None = None,
        default_timestep: int = DEFAULT_TIMESTEP,
    ) -> None:
        self.generator = generator
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.tagger = tagger
        self.default_timestep = int(default_timestep)
        self.pretrained = None  # the LoadPlan from from_pretrained: what save_pretrained writes

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | CODSRCheckpoint | None = None,
        *,
        base_model: str | os.PathLike | None = None,
        revision: str | None = None,
        base_model_revision: str | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype = torch.float32,
        tagger: str | Tagger | None = None,
        ram_path: str | os.PathLike | None = None,
        dape_path: str | os.PathLike | None = None,
        alignment_scale: float = 1.0,
        merge_lora: bool = True,
        merge_vae_lora: bool = False,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> CODSRPipeline:
        """Build the pipeline from a CODSR model folder or Hub repo id (``codsr_config.json`` +
        ``codsr.safetensors``; ``revision`` pins the repo, the base model comes from the config unless
        ``base_model=`` is given), or, as before, from an SD 2.1-base model (Hub id or diffusers
        folder) plus ``checkpoint=`` (the release's ``codsr.pkl``, a stage-1 ``.pkl`` or a codsr
        ``.safetensors``). A ``.pkl``/``.safetensors`` path as first argument is a checkpoint.
        See docs/hub.md; the dispatch rules are :func:`codsr.model.pretrained.plan_load`.

        Args:
            alignment_scale: λ_sem, the weight of the stage-2 (semantic) alignment LoRA; 1.0 is the method.
            merge_lora: merge the UNet LoRA into the weights (faster; unmerged keeps peft adapters).
            merge_vae_lora: also merge the VAE-encoder LoRA (same maths; moves z_L by ~1e-4 vs the release).
            tagger: ``"dape"``, ``"ram"``, ``"config"`` (the folder's tagger), ``None`` (tags come
                from the caller) or a callable mapping a B×3×H×W [0,1] tensor to tag strings.
        """
        plan = plan_load(
            pretrained_model_name_or_path, checkpoint, base_model=base_model, revision=revision,
            base_model_revision=base_model_revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token,
        )  # fmt: skip
        comps = load_base_components(
            plan.base_model, revision=plan.base_model_revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        gen = CODSRModel(comps.vae, comps.unet, comps.scheduler, rgpa=plan.rgpa)
        if plan.checkpoint is None:
            warnings.warn(
                "CODSRPipeline built without a checkpoint: the SFT is the identity and there is no LoRA, so "
                "results are those of the bare SD 2.1 model. Pass checkpoint='codsr.pkl'.",
                stacklevel=2,
            )
        else:
            gen.load_checkpoint(
                plan.checkpoint, merge_unet=merge_lora, merge_vae=merge_vae_lora, alignment_scale=alignment_scale
            )
        device = torch.device(device) if device is not None else default_device()
        pipe = cls(gen, comps.text_encoder, comps.tokenizer, default_timestep=plan.default_timestep)
        pipe.pretrained = plan  # what save_pretrained / push_to_hub write
        pipe.to(device, torch_dtype)
        tagger = plan.tagger_name(tagger)
        if tagger is not None:
            pipe.tagger = _build_tagger(tagger, *plan.tagger_paths(ram_path, dape_path), device, torch_dtype)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the CODSR folder (``codsr_config.json`` + ``codsr.safetensors``) this pipeline was loaded from."""
        save_pipeline_folder(self.pretrained, save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the CODSR folder with a generated model card to the Hub (docs/hub.md)."""
        return push_pipeline_folder(
            self.pretrained, repo_id, private=private, revision=revision, token=token,
            commit_message=commit_message, create_pr=create_pr,
        )  # fmt: skip

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CODSRPipeline:
        for m in (self.generator, self.text_encoder):
            m.to(device=device, dtype=dtype)
            m.eval()
            m.requires_grad_(False)
        if self.tagger is not None and hasattr(self.tagger, "to"):
            self.tagger.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.dtype

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """CLIP last hidden state (after the final layer norm) of the 77-token padded prompt(s)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(
            prompts,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    # ------------------------------------------------------------------ tiling
    def plan_tiles(
        self,
        image: Any,
        upscale: float = 4,
        *,
        max_memory: float | str | None = None,
        tile_plan: TilePlan | None = None,
        release_compat: bool = False,
    ) -> TilePlan:
        """The :class:`TilePlan` that ``pipe(image, upscale, max_memory=..., tile_plan=...)`` would use.

        ``image``: anything ``__call__`` accepts, or the input's ``(height, width)``. The plan is
        for the processing size (the release's resize rules) and the memory in use now.
        """
        if isinstance(image, tuple) and len(image) == 2 and all(isinstance(v, int) for v in image):
            b, (h0, w0) = 1, image
        else:
            b, _, h0, w0 = to_tensor01(image).shape
        width, height = processing_size(w0, h0, upscale)
        return plan(
            height, width, device=self.device, dtype=self.dtype, max_memory=max_memory, tile_plan=tile_plan,
            batch=b, release_compat=release_compat,
        )  # fmt: skip

    # ------------------------------------------------------------------ the model
    @torch.no_grad()
    def restore(
        self,
        lq: torch.Tensor,
        prompt: str | Sequence[str] = "",
        timestep: int | None = None,
        generator: torch.Generator | None = None,
        tile_plan: TilePlan | None = None,
        max_memory: float | str | None = None,
        release_compat: bool = False,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Restore LQ images already at the output size: B×3×H×W in [-1, 1] → same shape in [-1, 1].

        Runs :meth:`CODSRModel.forward <codsr.model.codsr.CODSRModel.forward>` with ``decode=True``.
        Noise: with a CPU ``generator`` seeded s, the posterior noise is drawn first and the RGPA
        noise second, both float32 with the latent's shape, whatever the device/dtype
        (docs/method.md#generator-forward).

        Tiling (:class:`TilePlan`, docs/inference.md#tiling): ``tile_plan`` given → used as is;
        else ``max_memory`` (GB, or ``"auto"`` = from free memory) → the planner picks the largest
        tiles whose predicted peak fits (docs/memory.md; falls back to UNet tiles one by one);
        else the automatic plan. With both, the plan is used as is and a warning says when its
        predicted peak exceeds the budget. By default UNet tiles run as one batch with GroupNorm
        statistics pooled across tiles and exact blending; ``release_compat=True`` runs them one
        by one as the release does (per-tile statistics, asymmetric Gaussian, 1e-6 clamp) and
        uses the release's approximate tiled VAE (its own trigger: max side > tile + 2·pad).
        """
        x = _validate_lq(lq)
        b, _, height, width = x.shape
        tile_plan = plan(
            height, width, device=self.device, dtype=self.dtype, max_memory=max_memory, tile_plan=tile_plan,
            batch=b, release_compat=release_compat,
        )  # fmt: skip
        x = x.to(self.device, self.dtype)
        t = int(self.default_timestep if timestep is None else timestep)
        if not 0 <= t <= MAX_TIMESTEP:
            raise ValueError(f"timestep must be in [0, {MAX_TIMESTEP}], got {t}")
        if prompt_embeds is None:
            prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
            if len(prompts) != b:
                raise ValueError(f"got {len(prompts)} prompts for a batch of {b} images")
            prompt_embeds = self.encode_prompt(prompts)
        prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        stages = tiled_stages(self.generator, tile_plan, release_compat=release_compat)
        out = self.generator(x, prompt_embeds, t, generator=generator, stages=stages, decode=True)
        return out.x_h.float()

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        upscale: float = 4,
        prompt: str | Sequence[str] | None = None,
        timestep: int | None = None,
        color_fix: str | None = "adain",
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        tags: str | Sequence[str] | None = None,
        tile_plan: TilePlan | None = None,
        max_memory: float | str | None = None,
        release_compat: bool = False,
    ) -> Any:
        """Super-resolve ``image`` by ``upscale``.

        ``image``: PIL image (or list), numpy H×W×C / B×H×W×C (uint8, uint16 or float [0,1]) or a
        torch C×H×W / B×C×H×W tensor in [0,1]. Returns the same kind of container with
        ``output_type`` "pil", "np" (float32 [0,1], H×W×3 or B×H×W×3) or "pt" (B×3×H×W [0,1]).
        The output is exactly ``round(upscale·W) × round(upscale·H)``: the release's resize rules
        are applied for processing, then small inputs are resized back (the release forgets to).
        ``tile_plan``, ``max_memory`` and ``release_compat`` as in :meth:`restore`;
        :meth:`plan_tiles` tells which plan a call will use.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not (0 < float(upscale) <= 16):
            raise ValueError(f"upscale must be in (0, 16], got {upscale}")
        single = isinstance(image, Image.Image) or (
            (isinstance(image, np.ndarray) or torch.is_tensor(image)) and image.ndim in (2, 3)
        )
        x01 = to_tensor01(image)
        b, _, h0, w0 = x01.shape
        target = (max(1, round(w0 * upscale)), max(1, round(h0 * upscale)))
        lq01 = x01
        for size, resample in release_input_size(w0, h0, upscale):
            lq01 = resize_image(lq01, size, resample)
        if min(lq01.shape[-2:]) < 8:
            raise ValueError(f"image of {w0}×{h0} px is too small to process at ×{upscale}")

        prompts = self._prompts(lq01, prompt, tags, b)
        out = self.restore(
            lq01 * 2 - 1, prompt=prompts, timestep=timestep, generator=generator, tile_plan=tile_plan,
            max_memory=max_memory, release_compat=release_compat,
        )  # fmt: skip
        out01 = apply_color_fix((out.cpu() + 1) / 2, lq01, color_fix)
        if tuple(out01.shape[-1:-3:-1]) != target:
            out01 = resize_image(out01, target, Image.LANCZOS)
        return _to_output(out01, output_type, single)

    def _prompts(
        self, lq01: torch.Tensor, prompt: str | Sequence[str] | None, tags: str | Sequence[str] | None, b: int
    ) -> list[str]:
        def per_image(v: str | Sequence[str] | None, what: str) -> list[str | None]:
            if v is None or isinstance(v, str):
                return [v] * b
            if len(v) != b:
                raise ValueError(f"got {len(v)} {what} for {b} images")
            return list(v)

        tag_list = per_image(tags, "tag strings")
        if tags is None and self.tagger is not None:
            tag_list = list(self.tagger(lq01.to(self.device)))
        return [assemble_prompt(t or "", p) for t, p in zip(tag_list, per_image(prompt, "prompts"), strict=True)]


def processing_size(width: int, height: int, upscale: float) -> tuple[int, int]:
    """(W, H) that ``__call__`` restores at for an input of ``width × height`` (the release's resize chain)."""
    steps = release_input_size(width, height, upscale)
    return steps[-1][0] if steps else (width, height)


def _validate_lq(lq: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(lq):
        raise TypeError(f"restore() expects a B×3×H×W tensor in [-1, 1], got {type(lq).__name__}")
    if lq.ndim != 4 or lq.shape[1] != 3:
        raise ValueError(f"restore() expects B×3×H×W, got shape {tuple(lq.shape)}")
    if lq.shape[-1] % 8 or lq.shape[-2] % 8 or lq.shape[-1] == 0 or lq.shape[-2] == 0:
        raise ValueError(
            f"restore() needs H and W to be positive multiples of 8, got {tuple(lq.shape[-2:])}; "
            "the image pipeline (pipe(image, ...)) resizes for you"
        )
    if not lq.is_floating_point():
        raise TypeError(f"restore() expects a float tensor in [-1, 1], got {lq.dtype}")
    if not torch.isfinite(lq).all():
        raise ValueError("restore() input contains NaN or Inf")
    lo, hi = float(lq.min()), float(lq.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"restore() expects values in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
    return lq.clamp(-1, 1)


def _to_output(x01: torch.Tensor, output_type: str, single: bool) -> Any:
    if output_type == "pt":
        return x01
    arr = x01.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr[0] if single else arr
    images = [Image.fromarray(np.round(a * 255).clip(0, 255).astype(np.uint8)) for a in arr]
    return images[0] if single else images


def _build_tagger(
    tagger: str | Tagger,
    ram_path: str | os.PathLike | None,
    dape_path: str | os.PathLike | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tagger:
    if callable(tagger):
        return tagger
    if tagger not in ("dape", "ram"):
        raise ValueError(f"tagger must be 'dape', 'ram', None or a callable, got {tagger!r}")
    from codsr.tagging import DEFAULT_RAM, RAMTagger

    if tagger == "dape" and dape_path is None:
        raise ValueError(
            "tagger='dape' needs dape_path= (DAPE.pth from SeeSR/OSEDiff, e.g. "
            "https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth); tagger='ram' runs plain RAM"
        )
    return RAMTagger.from_pretrained(
        ram_path if ram_path is not None else DEFAULT_RAM,
        dape_path if tagger == "dape" else None,
        device=device,
        torch_dtype=dtype,
    )

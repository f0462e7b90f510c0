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

from codsr.model.attention import VAEAttnProcessor
from codsr.model.base import load_base_components
from codsr.model.checkpoint import DEFAULT_TIMESTEP, CODSRCheckpoint
from codsr.model.codsr import CODSRModel
from codsr.model.pretrained import plan_load, push_pipeline_folder, save_pipeline_folder
from codsr.pipeline.color_fix import color_fix as apply_color_fix
from codsr.pipeline.control_map import check_noise_scale, control_map_to_latent
from codsr.pipeline.image_processing import release_input_size, resize_image, to_tensor01
from codsr.pipeline.tiled_stages import tiled_stages
from codsr.pipeline.tiling import TilePlan, plan

MAX_TIMESTEP = 999
# The preview decoder's weights: TAESD for SD 1.x/2.x latents (AutoencoderTiny, diffusers).
DEFAULT_TINY_DECODER = "madebyollin/taesd"
DECODERS = ("vae", "tiny")

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
        self.tiny_decoder: torch.nn.Module | None = None  # AutoencoderTiny for decoder="tiny"
        # VAE weights in channels-last layout: None = auto (see vae_channels_last)
        self.channels_last: bool | None = None
        self._apply_vae_layout()
        # the VAE's mid-block attention as chunked bmm on the CPU in bf16/fp16 (AttnProcessor2_0 otherwise)
        generator.vae.set_attn_processor(VAEAttnProcessor())

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
        tagger: str | Tagger | None = "auto",
        ram_path: str | os.PathLike | None = None,
        dape_path: str | os.PathLike | None = None,
        alignment_scale: float = 1.0,
        merge_lora: bool = True,
        merge_vae_lora: bool = True,
        channels_last: bool | None = None,
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
            merge_vae_lora: also merge the VAE-encoder LoRA (default; the same maths, one weight per
                layer instead of three convolutions: the encoder is ~25 % faster in fp32 and ~30 % in
                bf16, and the output moves by ≤ 4e-5 from the release's on its parity fixture, within
                the 1e-4 parity tolerance). ``False`` keeps peft adapters, as the release computes.
            channels_last: the VAE's weights (hence its activations) in channels-last layout, which
                oneDNN's convolutions run much faster on the CPU (docs/benchmarks.md#cpu-speed).
                None (default) = on for bf16/fp16 on the CPU; opt-in for fp32, where it moves the
                output by ~5e-4 from the release's (summation order), beyond the parity tolerance.
            tagger: ``"auto"`` (default: the tagger the model expects, i.e. the folder's
                ``codsr_config.json`` tagger, else DAPE as the release; when its weights are not
                found it runs prompt-free with ONE :class:`MethodDivergenceWarning` naming the
                missing file: see :func:`resolve_tagger`), ``"dape"``, ``"ram"``, ``"config"`` (the
                folder's tagger; errors when its weights are missing), ``None`` (prompt-free, or tags
                from the caller; silent) or a callable mapping a B×3×H×W [0,1] tensor to tag strings.
            ram_path / dape_path: the tagger's weights; else ``$CODSR_RAM`` / ``$CODSR_DAPE``, else
                the cache dir (``$CODSR_HOME``, ``~/.cache/codsr``), else (RAM) the Hub copy
                (docs/inference.md#prompts, :mod:`codsr.weights`).
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
        pipe.to(device, torch_dtype, channels_last=channels_last)
        choice, ram_ref, dape_ref = resolve_tagger(plan, tagger, ram_path, dape_path)
        if choice is not None:
            try:
                pipe.tagger = _build_tagger(choice, ram_ref, dape_ref, device, torch_dtype)
            except FileNotFoundError as e:  # an hf:// reference of the model folder that cannot be fetched
                if tagger != "auto" or ram_path is not None or dape_path is not None:
                    raise
                _warn_prompt_free(str(choice), str(e), stacklevel=3)
        return pipe

    def load_tiny_decoder(
        self,
        pretrained_model_name_or_path: str | os.PathLike = DEFAULT_TINY_DECODER,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> torch.nn.Module:
        """Load an ``AutoencoderTiny`` (TAESD; default ``madebyollin/taesd``, folder or Hub id) as the
        preview decoder for ``decoder="tiny"``, on the pipeline's device and dtype; returns it.

        It decodes the same ẑ_H about 10× cheaper than the VAE decoder but is lossy (a distilled
        approximation of it): for previews, not final results (docs/benchmarks.md#tiny-preview-decoder).
        """
        from diffusers import AutoencoderTiny

        kw = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                    token=token).items() if v is not None}  # fmt: skip
        try:
            tiny = AutoencoderTiny.from_pretrained(pretrained_model_name_or_path, **kw)
        except (OSError, ValueError) as e:
            raise OSError(
                f"cannot load the tiny decoder {str(pretrained_model_name_or_path)!r} (an AutoencoderTiny folder "
                f"or Hub id, e.g. {DEFAULT_TINY_DECODER!r}): {e}"
            ) from e
        self.tiny_decoder = tiny.to(self.device, self.dtype).eval().requires_grad_(False)
        return self.tiny_decoder

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

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool | None = None,
    ) -> CODSRPipeline:
        """Move to ``device``/``dtype``; ``channels_last`` True/False fixes the VAE's layout, None
        keeps the current choice (auto unless set: :attr:`vae_channels_last`)."""
        if channels_last is not None:
            self.channels_last = bool(channels_last)
        for m in (self.generator, self.text_encoder):
            m.to(device=device, dtype=dtype)
            m.eval()
            m.requires_grad_(False)
        self._apply_vae_layout()
        if self.tagger is not None and hasattr(self.tagger, "to"):
            self.tagger.to(device)
        if self.tiny_decoder is not None:
            self.tiny_decoder.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def vae_channels_last(self) -> bool:
        """Whether the VAE runs channels-last: :attr:`channels_last` if set, else True for bf16/fp16
        on the CPU (faster, and below their rounding) and False otherwise (fp32 keeps the release's
        summation order; CUDA/MPS keep the default layout)."""
        if self.channels_last is not None:
            return self.channels_last
        return self.device.type == "cpu" and self.dtype != torch.float32

    def _apply_vae_layout(self) -> None:
        """Put the VAE's 4-D weights in the layout :attr:`vae_channels_last` asks for (a no-op when
        they already are; the check is one 3×3 conv weight's strides)."""
        fmt = torch.channels_last if self.vae_channels_last else torch.contiguous_format
        vae = self.generator.vae
        conv = next((p for p in vae.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1), None)
        if conv is not None and not conv.is_contiguous(memory_format=fmt):
            vae.to(memory_format=fmt)

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
        control_map: Any = None,
        noise_scale: float = 1.0,
        fidelity_timestep: int | None = None,
        decoder: str = "vae",
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

        Region control (docs/region-control.md): ``control_map`` (H×W in [0, 1], 0 = most faithful,
        1 = the method; array, tensor, PIL image, grayscale file or one per image; at the input's
        size, the latent grid, or an integer multiple / divisor of either) scales the RGPA noise per
        latent cell after area averaging; ``noise_scale`` (default 1.0) scales it everywhere;
        ``fidelity_timestep`` (off by default; one more UNet pass) also blends each cell toward the
        one-step result at that lower timestep by the map. Bad maps raise before any model work.

        ``decoder="tiny"`` decodes ẑ_H with the preview decoder (``AutoencoderTiny``; loaded from
        ``madebyollin/taesd`` on first use unless :meth:`load_tiny_decoder` was called): ~10×
        cheaper, lossy. A float16 VAE decode that overflows is redone with the decoder in float32.
        """
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be 'vae' or 'tiny' (the lossy AutoencoderTiny preview), got {decoder!r}")
        self._apply_vae_layout()  # the VAE may have been moved since (pipe.generator.to(...))
        x = _validate_lq(lq)
        b, _, height, width = x.shape
        t = int(self.default_timestep if timestep is None else timestep)
        noise_scale = _check_region_args(t, noise_scale, fidelity_timestep)
        if control_map is not None:
            f = self.latent_factor
            control_map = control_map_to_latent(
                control_map, (height // f, width // f), {"input": (height, width)}, batch=b, device=self.device
            )
        tile_plan = plan(
            height, width, device=self.device, dtype=self.dtype, max_memory=max_memory, tile_plan=tile_plan,
            batch=b, release_compat=release_compat,
        )  # fmt: skip
        x = x.to(self.device, self.dtype)
        if prompt_embeds is None:
            prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
            if len(prompts) != b:
                raise ValueError(f"got {len(prompts)} prompts for a batch of {b} images")
            prompt_embeds = self.encode_prompt(prompts)
        prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        if decoder == "tiny" and self.tiny_decoder is None:
            self.load_tiny_decoder()
        tiny = self.tiny_decoder if decoder == "tiny" else None
        stages = tiled_stages(self.generator, tile_plan, release_compat=release_compat, tiny_decoder=tiny)
        out = self.generator(
            x, prompt_embeds, t, generator=generator, stages=stages, decode=True, control_map=control_map,
            noise_scale=noise_scale, fidelity_timestep=fidelity_timestep,
        )  # fmt: skip
        return out.x_h.float()

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent cell along each axis (8 for SD 2.1's VAE)."""
        return 2 ** (len(self.generator.vae.config.block_out_channels) - 1)

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
        control_map: Any = None,
        noise_scale: float = 1.0,
        fidelity_timestep: int | None = None,
        decoder: str = "vae",
    ) -> Any:
        """Super-resolve ``image`` by ``upscale``.

        ``image``: PIL image (or list), numpy H×W×C / B×H×W×C (uint8, uint16 or float [0,1]) or a
        torch C×H×W / B×C×H×W tensor in [0,1]. Returns the same kind of container with
        ``output_type`` "pil", "np" (float32 [0,1], H×W×3 or B×H×W×3) or "pt" (B×3×H×W [0,1]).
        The output is exactly ``round(upscale·W) × round(upscale·H)``: the release's resize rules
        are applied for processing, then small inputs are resized back (the release forgets to).
        ``tile_plan``, ``max_memory``, ``release_compat`` and ``decoder`` as in :meth:`restore`;
        :meth:`plan_tiles` tells which plan a call will use.
        ``control_map``, ``noise_scale``, ``fidelity_timestep``: region control as in :meth:`restore`;
        here the map may be at the input size, the output size (or an integer multiple / divisor
        of either), and is checked before tagging or any model work (docs/region-control.md).

        A list of images of different sizes is processed image by image (one ``generator`` drawn
        from in list order; per-image ``prompt``/``tags``/``control_map`` lists are split) and a
        list is returned (``"pt"``: a list of 1×3×H×W tensors).

        Output rounding (docs/inference.md#output-rounding): by default the float output is
        colour-corrected in float and rounded once (PIL) or not at all ("np"/"pt");
        ``release_compat=True`` also reproduces the release's 8-bit steps (uint8 resizes of an 8-bit
        LQ, ``x·0.5+0.5`` truncated to uint8 before and after the colour fix: see
        :func:`release_postprocess`), so saved PNGs equal the release's byte for byte.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if isinstance(image, (list, tuple)) and len(image) > 1:
            sizes = [tuple(to_tensor01(im).shape[-2:]) for im in image]
            if len(set(sizes)) > 1:
                n = len(image)

                def part(v: Any, i: int, what: str) -> Any:
                    if not isinstance(v, (list, tuple)):
                        return v
                    if len(v) != n:
                        raise ValueError(f"got {len(v)} {what} for {n} images")
                    return v[i]

                return [
                    self(
                        im, upscale, prompt=part(prompt, i, "prompts"), timestep=timestep, color_fix=color_fix,
                        generator=generator, output_type=output_type, tags=part(tags, i, "tag strings"),
                        tile_plan=tile_plan, max_memory=max_memory, release_compat=release_compat,
                        control_map=part(control_map, i, "control maps"), noise_scale=noise_scale,
                        fidelity_timestep=fidelity_timestep, decoder=decoder,
                    )
                    for i, im in enumerate(image)
                ]  # fmt: skip
        if not (0 < float(upscale) <= 16):
            raise ValueError(f"upscale must be in (0, 16], got {upscale}")
        single = isinstance(image, Image.Image) or (
            (isinstance(image, np.ndarray) or torch.is_tensor(image)) and image.ndim in (2, 3)
        )
        x01 = to_tensor01(image)
        b, _, h0, w0 = x01.shape
        target = (max(1, round(w0 * upscale)), max(1, round(h0 * upscale)))
        lq01 = x01
        eight_bit = release_compat and _is_8bit(x01)
        for size, resample in release_input_size(w0, h0, upscale):
            lq01 = _resize_uint8(lq01, size, resample) if eight_bit else resize_image(lq01, size, resample)
        if min(lq01.shape[-2:]) < 8:
            raise ValueError(f"image of {w0}×{h0} px is too small to process at ×{upscale}")
        _check_region_args(
            int(self.default_timestep if timestep is None else timestep), noise_scale, fidelity_timestep
        )
        if control_map is not None:
            height, width = lq01.shape[-2:]
            f = self.latent_factor
            control_map = control_map_to_latent(
                control_map, (height // f, width // f),
                {"input": (h0, w0), "output": (target[1], target[0]), "processing": (height, width)},
                batch=b, device=self.device,
            )  # fmt: skip

        prompts = self._prompts(lq01, prompt, tags, b)
        out = self.restore(
            lq01 * 2 - 1, prompt=prompts, timestep=timestep, generator=generator, tile_plan=tile_plan,
            max_memory=max_memory, release_compat=release_compat, control_map=control_map,
            noise_scale=noise_scale, fidelity_timestep=fidelity_timestep, decoder=decoder,
        )  # fmt: skip
        if release_compat:
            out01 = release_postprocess(out.cpu(), lq01, color_fix)
        else:
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


def _quantise(x01: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ToPILImage`` on a float tensor (``x.mul(255).byte()``: truncation), back to [0, 1]."""
    return x01.mul(255).to(torch.uint8).float().div(255)


def release_postprocess(out_m11: torch.Tensor, lq01: torch.Tensor, color_fix: str | None) -> torch.Tensor:
    """The release's output conversion of B×3×H×W model outputs in [-1, 1] → [0, 1] on the 8-bit grid.

    The release's ``test_codsr.py``: ``ToPILImage()(out·0.5 + 0.5)`` (``mul(255).byte()``, i.e.
    truncation), then the colour fix on ``ToTensor`` of that 8-bit image and of the 8-bit LQ,
    ``clamp(0, 1)``, and ``ToPILImage`` again (truncation). ``lq01``: the LQ the model saw.
    """
    first = _quantise(out_m11.float().clamp(-1, 1) * 0.5 + 0.5)
    if color_fix in (None, "none"):
        return first
    return _quantise(apply_color_fix(first, lq01, color_fix))


def _is_8bit(x01: torch.Tensor) -> bool:
    return bool(torch.equal((x01 * 255).round() / 255, x01))


def _resize_uint8(x01: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """PIL resize of an 8-bit RGB image (as the release resizes its PIL input), back to [0, 1]."""
    if tuple(x01.shape[-1:-3:-1]) == tuple(size):
        return x01
    out = []
    for im in x01:
        arr = np.ascontiguousarray((im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        res = np.asarray(Image.fromarray(arr, "RGB").resize(size, resample))
        out.append(torch.from_numpy(res.copy()).permute(2, 0, 1).float().div(255))
    return torch.stack(out)


def processing_size(width: int, height: int, upscale: float) -> tuple[int, int]:
    """(W, H) that ``__call__`` restores at for an input of ``width × height`` (the release's resize chain)."""
    steps = release_input_size(width, height, upscale)
    return steps[-1][0] if steps else (width, height)


def _check_region_args(timestep: int, noise_scale: float, fidelity_timestep: int | None) -> float:
    """Check the timestep and the region-control scalars (before any model work); returns noise_scale."""
    if not 0 <= timestep <= MAX_TIMESTEP:
        raise ValueError(f"timestep must be in [0, {MAX_TIMESTEP}], got {timestep}")
    if fidelity_timestep is not None and not (
        isinstance(fidelity_timestep, (int, np.integer)) and 0 <= fidelity_timestep < timestep
    ):
        raise ValueError(
            f"fidelity_timestep must be an integer in [0, timestep={timestep}), got {fidelity_timestep!r}; "
            "it is the lower timestep the map blends toward (docs/region-control.md)"
        )
    return check_noise_scale(noise_scale)


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


class MethodDivergenceWarning(UserWarning):
    """The run goes on, but its output is not the method's (e.g. prompt-free because DAPE is missing)."""


TAGGER_CHOICES = ("auto", "dape", "ram", "config")


def resolve_tagger(
    plan: Any,
    tagger: str | Tagger | None,
    ram_path: str | os.PathLike | None = None,
    dape_path: str | os.PathLike | None = None,
) -> tuple[str | Tagger | None, Any, Any]:
    """(tagger, ram, dape) to build for ``from_pretrained(..., tagger=...)`` (docs/inference.md#prompts).

    ``"auto"``: the tagger the model expects (``plan.config``'s, else DAPE as the release), its
    weights looked for by :func:`codsr.weights.find_weight` (argument → ``$CODSR_DAPE`` /
    ``$CODSR_RAM`` → cache dir; RAM then from its Hub copy). When a weight that was not named by the
    caller cannot be had, the run is prompt-free and ONE :class:`MethodDivergenceWarning` names the
    missing file, where it was looked for and how to get it. ``"dape"``/``"ram"``/``"config"`` raise
    :class:`codsr.weights.WeightNotFoundError` instead; ``None`` and callables pass through silently.
    """
    if tagger is None or callable(tagger):
        return tagger, ram_path, dape_path
    if tagger not in TAGGER_CHOICES:
        raise ValueError(f"tagger must be one of {', '.join(TAGGER_CHOICES)}, None or a callable, got {tagger!r}")
    from codsr.weights import WeightNotFoundError

    auto = tagger == "auto"
    name = plan.tagger_name("config") if tagger in ("auto", "config") else tagger
    if auto and getattr(plan, "config", None) is None:
        name = "dape"  # the release's tagger
    if name is None:  # the model was trained prompt-free
        return None, None, None
    ram_ref, dape_ref = plan.tagger_paths(ram_path, dape_path)
    try:
        dape = _weight_ref("dape", dape_ref) if name == "dape" else None
        ram = _weight_ref("ram", ram_ref)
    except WeightNotFoundError as e:
        named = (dape_path is not None and name == "dape") or ram_path is not None
        if not auto or named:
            raise
        _warn_prompt_free(name, str(e))
        return None, None, None
    return name, ram, dape


def _warn_prompt_free(name: str, detail: str, stacklevel: int = 4) -> None:
    warnings.warn(
        f"tagger='auto' (--tagger auto): this run is PROMPT-FREE (empty tags), so its output differs from "
        f"the method's, which prompts with {name.upper()} tags. {detail} Use tagger=None (--tagger none) to run "
        "prompt-free without this warning.",
        MethodDivergenceWarning,
        stacklevel=stacklevel,
    )


def _weight_ref(key: str, ref: Any) -> Any:
    """A local path for weight ``key`` (``ref``, env, cache dir; RAM: then its Hub copy), or an hf:// ref as is."""
    from codsr.weights import WeightNotFoundError, find_weight, not_found_message, resolve_weight

    if ref is not None and os.fspath(ref).startswith("hf://"):
        return ref
    status = find_weight(key, ref)
    if status.found:
        return status.path
    if ref is not None:
        raise WeightNotFoundError(not_found_message(status))
    return resolve_weight(key, download=True)


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
        from codsr.weights import find_weight, not_found_message

        raise ValueError("tagger='dape' needs dape_path=: " + not_found_message(find_weight("dape")))
    return RAMTagger.from_pretrained(
        ram_path if ram_path is not None else DEFAULT_RAM,
        dape_path if tagger == "dape" else None,
        device=device,
        torch_dtype=dtype,
    )

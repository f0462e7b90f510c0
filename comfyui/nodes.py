"""ComfyUI nodes for CODSR: "Load CODSR model" and "CODSR Upscale" (docs/comfyui.md).

ComfyUI's modules (``comfy.utils``, ``comfy.model_management``) are imported lazily and only
when present, so this pack imports (and is tested) without ComfyUI. IMAGE tensors are ComfyUI's
B×H×W×C float32 in [0, 1]; each image of a batch is restored on its own (seed + index), with
ComfyUI's progress bar and its interrupt button checked between images.
"""

from __future__ import annotations

import importlib
from typing import Any

MODEL_TYPE = "CODSR_MODEL"
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "fp16", "bf16", "fp32")
COLOR_FIXES = ("adain", "wavelet", "none")
MASK_MODES = ("protect masked", "control map")
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def _comfy(module: str) -> Any | None:
    """``comfy.<module>`` when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(f"comfy.{module}")
    except ImportError:
        return None


def pipeline_kwargs(tile_size: int, max_memory_gb: float) -> dict[str, Any]:
    """The node's tile size (output px; 0 = automatic) and memory budget (GB; 0 = none) as
    keyword arguments of ``CODSRPipeline.__call__``. The one place the node maps these."""
    from codsr.pipeline import TilePlan

    kwargs: dict[str, Any] = {}
    if tile_size > 0:
        kwargs["tile_plan"] = TilePlan.from_tile(int(tile_size))
    if max_memory_gb > 0:
        kwargs["max_memory"] = float(max_memory_gb)
    return kwargs


def _resolve_device(device: str):
    import torch

    if device != "auto":
        return torch.device(device)
    mm = _comfy("model_management")
    if mm is not None:
        return mm.get_torch_device()
    from codsr.pipeline.pipeline import default_device

    return default_device()


class CODSRModelHandle:
    """What flows along a CODSR_MODEL edge: the load settings and the pipeline built from them.

    λ_sem (the semantic LoRA's weight) is merged into the UNet at load time, so a stage-2 pipeline
    is rebuilt when the Upscale node asks for another λ_sem (the previous one is dropped first).
    """

    def __init__(self, source: str, *, base_model: str | None = None, revision: str | None = None,
                 device: str = "auto", dtype: str = "auto", tagger: str | None = None) -> None:  # fmt: skip
        self.source = source
        self.base_model = base_model or None
        self.revision = revision or None
        self.device = _resolve_device(device)
        from codsr.precision import resolve_dtype

        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.tagger = tagger
        self._pipe = None
        self._scale: float | None = None

    def pipeline(self, alignment_scale: float = 1.0):
        """The pipeline with λ_sem = ``alignment_scale`` (built on first use or when λ_sem changes)."""
        from codsr import CODSRPipeline

        scale = float(alignment_scale)
        if self._pipe is not None and (scale == self._scale or not _has_alignment(self._pipe)):
            return self._pipe
        self._pipe = None  # free the old weights before loading the new ones
        self._pipe = CODSRPipeline.from_pretrained(
            self.source, base_model=self.base_model, revision=self.revision, device=self.device,
            torch_dtype=self.torch_dtype, tagger=self.tagger, alignment_scale=scale,
        )  # fmt: skip
        self._scale = scale
        return self._pipe


def _has_alignment(pipe) -> bool:
    ckpt = pipe.pretrained.checkpoint if pipe.pretrained is not None else None
    return ckpt is not None and ckpt.has_alignment


def check_image(image: Any) -> None:
    """A ComfyUI IMAGE: a torch tensor B×H×W×C with C = 3; name what is wrong otherwise."""
    import torch

    if not torch.is_tensor(image):
        raise TypeError(f"CODSR Upscale: image must be a ComfyUI IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4:
        raise ValueError(
            f"CODSR Upscale: image must be B×H×W×C (ComfyUI IMAGE), got {image.ndim} dimensions "
            f"{tuple(image.shape)}; add a batch dimension (image[None])"
        )
    if image.shape[-1] != 3:
        hint = "; drop the alpha channel first (e.g. a 'Split Image with Alpha' node)" if image.shape[-1] == 4 else ""
        raise ValueError(
            f"CODSR Upscale: image must have 3 (RGB) channels last, got shape {tuple(image.shape)}{hint}"
        )
    if image.shape[0] == 0 or min(image.shape[1:3]) == 0:
        raise ValueError(f"CODSR Upscale: empty image batch {tuple(image.shape)}")


def control_maps_from_mask(mask: Any, mode: str, batch: int) -> Any:
    """A ComfyUI MASK (B×H×W or H×W, float in [0, 1], 1 = masked) as control maps B'×H×W (B' = 1 or
    ``batch``), 0 = faithful, 1 = the method (docs/region-control.md); None without a mask."""
    import torch

    if mask is None:
        return None
    if mode not in MASK_MODES:
        raise ValueError(f"CODSR Upscale: mask_mode must be one of {MASK_MODES}, got {mode!r}")
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"CODSR Upscale: mask must be a ComfyUI MASK (B×H×W or H×W), got {shape}")
    m = (mask[None] if mask.ndim == 2 else mask).detach().to("cpu", torch.float32)
    if m.shape[0] not in (1, batch):
        raise ValueError(f"CODSR Upscale: {m.shape[0]} masks for {batch} images; give one mask or one per image")
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError("CODSR Upscale: mask values must be finite and in [0, 1]")
    if mode == "protect masked":
        return 1 - m
    return m  # "control map": the mask's value is the map


class LoadCODSRModel:
    """"Load CODSR model": a folder, a Hub repo id (owner/name) or a .pkl / .safetensors checkpoint."""

    CATEGORY = "image/upscaling"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("codsr_model",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a CODSR model: a codsr folder, a Hub repo id or a codsr.pkl (with its SD 2.1 base)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("STRING", {"default": "", "tooltip": "codsr folder, Hub repo id owner/name, or codsr.pkl"}),
                "device": (list(DEVICES), {"default": "auto"}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: fp16 on GPUs, fp32 on CPU"}),
            },
            "optional": {
                "base_model": ("STRING", {"default": "", "tooltip": "SD 2.1-base repo id or folder; empty: "
                                                                    "the model's config (or the default mirror)"}),
                "revision": ("STRING", {"default": "", "tooltip": "Hub revision of the CODSR repo (or of the "
                                                                  "base model when loading a .pkl)"}),
                "tagger": (["none", "config"], {"default": "none", "tooltip": "config: the tagger the model names "
                                                                              "(downloads RAM, 5.6 GB)"}),
            },
        }  # fmt: skip

    def load(self, model: str, device: str = "auto", dtype: str = "auto", base_model: str = "", revision: str = "",
             tagger: str = "none") -> tuple[CODSRModelHandle]:  # fmt: skip
        if not model.strip():
            raise ValueError("Load CODSR model: 'model' is empty; give a codsr folder, a Hub repo id or a codsr.pkl")
        handle = CODSRModelHandle(model.strip(), base_model=base_model.strip(), revision=revision.strip(),
                                  device=device, dtype=dtype, tagger=None if tagger == "none" else tagger)
        handle.pipeline()
        return (handle,)


class CODSRUpscale:
    """"CODSR Upscale": IMAGE → IMAGE, one-step CODSR super-resolution of every image of the batch."""

    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    DESCRIPTION = "Super-resolves images with CODSR (one diffusion step). Higher timestep = more generated detail."

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "codsr_model": (MODEL_TYPE,),
                "image": ("IMAGE",),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 16.0, "step": 0.5}),
                "timestep": ("INT", {"default": -1, "min": -1, "max": 999,
                                     "tooltip": "fidelity ↔ realism; -1: the model's default (100)"}),
                "lambda_sem": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                         "tooltip": "weight of the semantic alignment LoRA (stage-2 models)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
                "color_fix": (list(COLOR_FIXES), {"default": "adain"}),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                                      "tooltip": "tile size in output pixels; 0: automatic"}),
                "max_memory_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                            "tooltip": "memory budget for picking tile sizes; 0: none"}),
            },
            "optional": {
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "appended to the tags"}),
                # Region control (docs/region-control.md)
                "mask": ("MASK", {"tooltip": "region control: a mask at the input or output size (one, or one "
                                             "per image)"}),
                "mask_mode": (list(MASK_MODES), {"default": MASK_MODES[0], "tooltip":
                              "protect masked: the masked area stays faithful (no generative noise), the rest "
                              "as usual; control map: the mask's value is the map (0 = faithful, 1 = the "
                              "method), i.e. generated detail only where masked"}),
                "noise_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                          "tooltip": "multiplies the RGPA noise everywhere; 1 = the method"}),
                "fidelity_timestep": ("INT", {"default": -1, "min": -1, "max": 998, "tooltip":
                                      "with a mask: also blend toward the result at this lower timestep where "
                                      "the map is below 1 (one more UNet pass); -1: off"}),
            },
        }  # fmt: skip

    def upscale(self, codsr_model: CODSRModelHandle, image: Any, scale: float = 4.0, timestep: int = -1,
                lambda_sem: float = 1.0, seed: int = 0, color_fix: str = "adain", tile_size: int = 0,
                max_memory_gb: float = 0.0, prompt: str = "", mask: Any = None,
                mask_mode: str = "protect masked", noise_scale: float = 1.0,
                fidelity_timestep: int = -1) -> tuple[Any]:  # fmt: skip
        import torch

        check_image(image)
        maps = control_maps_from_mask(mask, mask_mode, image.shape[0])
        if not isinstance(codsr_model, CODSRModelHandle):
            raise TypeError(f"CODSR Upscale: codsr_model must come from 'Load CODSR model', got {type(codsr_model).__name__}")
        pipe = codsr_model.pipeline(lambda_sem)
        kwargs = pipeline_kwargs(tile_size, max_memory_gb)
        interrupt = _comfy("model_management")
        utils = _comfy("utils")
        bar = utils.ProgressBar(image.shape[0]) if utils is not None else None
        outs = []
        for i in range(image.shape[0]):
            if interrupt is not None:
                interrupt.throw_exception_if_processing_interrupted()
            chw = image[i].detach().to("cpu", torch.float32).clamp(0, 1).permute(2, 0, 1)
            out = pipe(
                chw, upscale=float(scale), prompt=prompt or None, timestep=None if timestep < 0 else int(timestep),
                color_fix=None if color_fix == "none" else color_fix, output_type="pt",
                generator=torch.Generator().manual_seed((int(seed) + i) % (MAX_SEED + 1)), **kwargs,
                control_map=None if maps is None else maps[min(i, maps.shape[0] - 1)], noise_scale=float(noise_scale),
                fidelity_timestep=None if fidelity_timestep < 0 or maps is None else int(fidelity_timestep),
            )  # fmt: skip
            outs.append(out[0].permute(1, 2, 0))
            if bar is not None:
                bar.update(1)
        return (torch.stack(outs).float().cpu(),)


NODE_CLASS_MAPPINGS = {"CODSRLoadModel": LoadCODSRModel, "CODSRUpscale": CODSRUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"CODSRLoadModel": "Load CODSR model", "CODSRUpscale": "CODSR Upscale"}

"""Keep one pipeline loaded and reload it when a job asks for another λ_sem or precision.

λ_sem (the weight of the stage-2 alignment LoRA) is merged into the UNet weights at load time and
the precision is the weights' dtype, so changing either means loading the pipeline again (seconds
for SD 2.1-base); the result is then exactly what ``codsr upscale --alignment-scale ... --fp16``
computes. Only one pipeline is held at a time.
"""

from __future__ import annotations

from typing import Any

from codsr.app.settings import AppConfig
from codsr.precision import precision_name
from codsr.precision import resolve_dtype as precision_dtype  # None = the device's default, as the CLI


class PipelineLoader:
    """``loader.get(alignment_scale, precision)`` → a ``CODSRPipeline`` built from ``config``."""

    def __init__(self, config: AppConfig, pipe: Any = None) -> None:
        self.config = config
        self._pipe = pipe
        self._key: tuple[float, str] | None = None
        if pipe is not None:
            self._key = (float(config.alignment_scale), precision_name(pipe.dtype))

    def get(self, alignment_scale: float | None = None, precision: str | None = None) -> Any:
        import torch

        from codsr.model.base import BASE_MODEL_MIRROR
        from codsr.pipeline.pipeline import CODSRPipeline, default_device

        device = torch.device(self.config.device) if self.config.device else default_device()
        scale = float(self.config.alignment_scale if alignment_scale is None else alignment_scale)
        dtype = precision_dtype(precision or self.config.precision, device)
        key = (scale, precision_name(dtype))
        if self._pipe is not None and key == self._key:
            return self._pipe
        self._pipe = None  # free the old weights before loading the new ones
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self._pipe = CODSRPipeline.from_pretrained(
            self.config.base_model or BASE_MODEL_MIRROR,
            self.config.checkpoint,
            revision=self.config.revision,
            device=device,
            torch_dtype=dtype,
            tagger=None if self.config.tagger == "none" else self.config.tagger,
            ram_path=self.config.ram,
            dape_path=self.config.dape,
            alignment_scale=scale,
        )
        self._key = key
        return self._pipe

"""Follow a restore's real work — encoder tiles, UNet tiles, decoder tiles — without touching the pipeline.

Stock PyTorch forward hooks on the pipeline's own modules: the VAE encoder's ``conv_in`` runs once
per encoder tile (tiled or not), the UNet's forward once per UNet tile (or once for the batched
tiles), the VAE decoder's ``conv_out`` once per decoder tile. Each call reports
``on_event(stage, count)`` with ``stage`` one of :data:`STAGES` and the running count of calls
in that stage. The hooks are removed when the ``with`` block ends, even on an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STAGES = ("encode", "unet", "decode")

# Fractions of the progress bar at which each stage starts (tags before, colour fix after).
STAGE_START = {"tags": 0.0, "encode": 0.05, "unet": 0.35, "decode": 0.65, "finish": 0.95}
STAGE_LABEL = {
    "tags": "tagging",
    "encode": "VAE encoder tile",
    "unet": "UNet tile",
    "decode": "VAE decoder tile",
    "finish": "colour fix and writing",
}


class StageTracker:
    """Context manager: ``with StageTracker(pipe, on_event): pipe(...)``."""

    def __init__(self, pipe: Any, on_event: Callable[[str, int], None]) -> None:
        gen = pipe.generator
        self._modules = {
            "encode": gen.vae.encoder.conv_in,
            "unet": gen.unet,
            "decode": gen.vae.decoder.conv_out,
        }
        self._on_event = on_event
        self._handles: list[Any] = []
        self.counts = dict.fromkeys(STAGES, 0)

    def _hook(self, stage: str) -> Callable[..., None]:
        def hook(_module: Any, _args: Any) -> None:
            self.counts[stage] += 1
            self._on_event(stage, self.counts[stage])

        return hook

    def __enter__(self) -> StageTracker:
        for stage, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(stage)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def progress_fraction(stage: str, count: int) -> float:
    """Where the bar stands at the ``count``-th call of ``stage``: the stage's start plus a part
    of its span that grows with the count (the number of tiles is not known in advance)."""
    order = list(STAGE_START)
    start = STAGE_START[stage]
    following = order.index(stage) + 1
    end = STAGE_START[order[following]] if following < len(order) else 1.0
    return start + (end - start) * (1 - 0.5 ** max(0, count))

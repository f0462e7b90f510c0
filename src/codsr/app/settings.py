"""What one job of the web app asks for, and the plain rules around it (no Gradio here).

* :class:`JobSettings`: the method's knobs as the page shows them (scale, timestep, λ_sem, seed,
  colour fix, precision, prompt, tiling / memory budget);
* :func:`tile_plan` / :func:`plan_kwargs` / :func:`describe_plan`: the one place where the page's
  tile and memory settings become the pipeline's tiling arguments (docs/memory.md);
* :func:`default_max_output_pixels` / :func:`check_output_size`: the output-size limit, sized to
  the device, refused with a message instead of running out of memory;
* :func:`upscale_command`: the ``codsr upscale ...`` command line that reproduces a result.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from typing import Any

from codsr.precision import PRECISIONS

COLOR_FIXES = ("adain", "wavelet", "none")
TAGGERS = ("auto", "none", "dape", "ram")
MAX_SCALE = 16.0
# Host bytes held per output pixel by one job: the float32 LQ at output size, the restored image,
# the colour fix's intermediates, the numpy copy and the PNG encoder's rows (measured ≈ 90 on the
# CPU at 4 MP; rounded up). The device holds the LQ and the output at full size too (B×3×H×W),
# plus tiles whose size the memory plan bounds.
HOST_BYTES_PER_OUTPUT_PIXEL = 128
DEVICE_BYTES_PER_OUTPUT_PIXEL = 48
# Never more than this, whatever the memory (the browser cannot show it either).
HARD_MAX_OUTPUT_PIXELS = 32768 * 32768


@dataclass(frozen=True)
class AppConfig:
    """How the app's pipeline was loaded: reproduced in the command line of each result."""

    base_model: str | None = None
    checkpoint: str | None = None
    device: str | None = None
    precision: str | None = None
    alignment_scale: float = 1.0
    tagger: str = "auto"
    ram: str | None = None
    dape: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tagger not in TAGGERS:
            raise ValueError(f"tagger must be one of {', '.join(TAGGERS)}, got {self.tagger!r}")


@dataclass(frozen=True)
class JobSettings:
    """One run's settings. ``seed`` is the base seed: each image's generator is seeded with
    :func:`codsr.batch.image_seed` of it and the file name, exactly as ``codsr upscale`` does.
    ``tags``: the prompt tags (None: the pipeline's tagger, or none); ``prompt``: the user's text
    appended to them. ``tile`` (output px, 0 = automatic), ``tile_overlap`` (output px) and
    ``max_memory`` (GB, "auto" or None) are ``codsr upscale``'s ``--tile``/``--tile-overlap``/
    ``--max-memory``."""

    scale: float = 4.0
    timestep: int | None = None
    seed: int = 42
    color_fix: str = "adain"
    alignment_scale: float = 1.0
    precision: str | None = None
    tags: str | None = None
    prompt: str = ""
    tile: int = 0
    tile_overlap: int = 400
    max_memory: str | None = None

    def __post_init__(self) -> None:
        if not (0 < float(self.scale) <= MAX_SCALE):
            raise ValueError(f"scale must be in (0, {MAX_SCALE:g}], got {self.scale}")
        if self.timestep is not None and not 0 <= int(self.timestep) <= 999:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"colour fix must be one of {', '.join(COLOR_FIXES)}, got {self.color_fix!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if int(self.tile) < 0 or int(self.tile_overlap) < 0:
            raise ValueError("tile size and tile overlap must be ≥ 0 (0 = automatic tiles)")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if 0 < int(self.tile) < 64:
            raise ValueError(f"tile size must be 0 (automatic) or at least 64 px, got {self.tile}")

    @property
    def effective_tile_overlap(self) -> int:
        """The UNet tile overlap used with an explicit tile size: at most a third of the tile
        (rounded down to 8 px). A larger overlap, e.g. the default 400 px with 256 px tiles,
        makes the tiles advance by a pixel or two, and their number — and the memory of the
        batched UNet — explode."""
        return min(int(self.tile_overlap), int(self.tile) // 3 // 8 * 8)


# ----------------------------------------------------------------------------------- sizes


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(W, H) of the result: the pipeline returns exactly round(scale·W) × round(scale·H)."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def processing_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(W, H) the pipeline restores at (the release's resize chain; small inputs are enlarged)."""
    from codsr.pipeline.image_processing import release_input_size

    steps = release_input_size(width, height, scale)
    return steps[-1][0] if steps else (width, height)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_max_output_pixels(device: Any = "cpu") -> int:
    """Largest output (in pixels) a job may ask for on ``device``: what host memory, and for a
    CUDA device its memory, can hold at :data:`HOST_BYTES_PER_OUTPUT_PIXEL` /
    :data:`DEVICE_BYTES_PER_OUTPUT_PIXEL` bytes a pixel, using half of each (the weights, the
    tiles and other programs need the rest), rounded down to whole megapixels."""
    import torch

    device = torch.device(device)
    limits = [HARD_MAX_OUTPUT_PIXELS]
    host = _host_available()
    if host:
        limits.append(host // 2 // HOST_BYTES_PER_OUTPUT_PIXEL)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        limits.append(total // 2 // DEVICE_BYTES_PER_OUTPUT_PIXEL)
    pixels = min(limits)
    return max(1_000_000, pixels // 1_000_000 * 1_000_000)


class OutputTooLargeError(ValueError):
    """The requested output exceeds the app's limit; the message says by how much and what to do."""


def check_output_size(width: int, height: int, scale: float, max_pixels: int) -> tuple[int, int]:
    """The output size of a W×H input at ``scale``, or :class:`OutputTooLargeError` when it (or
    the size the pipeline processes at) has more than ``max_pixels`` pixels."""
    out_w, out_h = output_size(width, height, scale)
    proc_w, proc_h = processing_size(width, height, scale)
    pixels = max(out_w * out_h, proc_w * proc_h)
    if pixels > max_pixels:
        largest = math.sqrt(max_pixels / max(1, width * height))
        raise OutputTooLargeError(
            f"Output too large: {width}×{height} px at ×{scale:g} gives {out_w}×{out_h} px "
            f"({pixels / 1e6:.1f} MP), over this app's limit of {max_pixels / 1e6:.1f} MP. "
            f"Use a scale of at most ×{math.floor(largest * 100) / 100:g} or a smaller image, or restart "
            "the app with a larger --max-output-mp if the device has the memory."
        )
    return out_w, out_h


# ----------------------------------------------------------------------------------- tiling


def tile_plan(settings: JobSettings, pipe: Any, width: int, height: int):
    """The first tile plan for an input image of ``width × height`` px, from the library's one planner
    (``CODSRPipeline.plan_tiles``): the tile size, the memory budget or the automatic tiling, exactly as
    ``codsr upscale`` with the same flags (its out-of-memory retry shrinks it from there)."""
    from codsr.pipeline import TilePlan

    explicit = TilePlan.from_tile(int(settings.tile), settings.effective_tile_overlap) if settings.tile > 0 else None
    max_memory = None if settings.max_memory in (None, "") else settings.max_memory
    return pipe.plan_tiles((int(height), int(width)), settings.scale, max_memory=max_memory, tile_plan=explicit)


def plan_kwargs(plan: Any) -> dict[str, Any]:
    """Keyword arguments of ``CODSRPipeline.__call__`` that apply ``plan``."""
    return {"tile_plan": plan}


def describe_plan(plan: Any) -> str:
    """One line for the page (:meth:`codsr.pipeline.TilePlan.describe`)."""
    return plan.describe()


# ----------------------------------------------------------------------------------- command line


def upscale_command(input_name: str, settings: JobSettings, config: AppConfig, *, tagger_tags: bool) -> str:
    """``codsr upscale ...`` reproducing the result for the file ``input_name``.

    ``tagger_tags``: the tags used are the tagger's own (unedited); when they were edited, the
    command cannot reproduce them and the caller should say so.
    """
    argv = ["codsr", "upscale", "-i", os.path.basename(input_name), "-o", "results", "-s", f"{settings.scale:g}"]
    if settings.timestep is not None:
        argv += ["--timestep", str(int(settings.timestep))]
    argv += ["--seed", str(int(settings.seed)), "--color-fix", settings.color_fix]
    if settings.alignment_scale != 1.0:
        argv += ["--alignment-scale", f"{settings.alignment_scale:g}"]
    precision = settings.precision or config.precision
    if precision:
        argv.append(f"--{precision}")
    if settings.prompt:
        argv += ["--prompt", settings.prompt]
    if settings.tile > 0:
        argv += ["--tile", str(int(settings.tile)), "--tile-overlap", str(settings.effective_tile_overlap)]
    elif settings.max_memory not in (None, ""):
        argv += ["--max-memory", str(settings.max_memory)]
    if config.tagger == "none":
        argv += ["--tagger", "none"]  # the CLI's default is auto
    elif tagger_tags:
        if config.tagger != "auto":
            argv += ["--tagger", config.tagger]
        if config.ram:
            argv += ["--ram", config.ram]
        if config.dape:
            argv += ["--dape", config.dape]
    if config.device:
        argv += ["--device", config.device]
    if config.base_model:
        argv += ["--base-model", config.base_model]
    if config.revision:
        argv += ["--revision", config.revision]
    if config.checkpoint:
        argv += ["--checkpoint", config.checkpoint]
    argv += ["--ext", "png"]
    return shlex.join(argv)

"""Memory budget for inference: peak-memory metering, a measured memory model, tile planning, OOM retry.

``CODSRPipeline.restore(..., max_memory=GB | "auto")`` asks :func:`plan_tiles` for the VAE
encoder/decoder tile sizes, the UNet tile size and whether idle VAE tiles must be parked off the
device (``offload``), such that the *predicted* peak stays under the budget. The prediction is
:class:`MemoryModel`: resident memory (what is allocated when the call starts: the weights) plus
the largest stage peak, each stage's peak being an affine function of the number of activation
elements it holds at once, with coefficients measured on the full-size SD 2.1-base architecture
(docs/memory.md gives the measurements, the formulas and what is and is not guaranteed).

:func:`restore_with_oom_retry` runs an image and, on an out-of-memory error, retries it with
smaller tiles and VAE offloading instead of failing (the ``codsr upscale`` CLI uses it).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import resource
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

GB = 1024**3
logger = logging.getLogger(__name__)

__all__ = [
    "GB",
    "MemoryBudgetError",
    "MemoryModel",
    "PeakMemoryMeter",
    "TilePlan",
    "automatic_budget",
    "is_out_of_memory",
    "limit_heap_fragmentation",
    "plan_tiles",
    "release_host_memory",
    "resident_bytes",
    "restore_with_oom_retry",
    "shrink_plan",
]


# ---------------------------------------------------------------------------------------------
# metering
# ---------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so RSS reflects live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# glibc's mallopt parameter number for M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 1 << 20


def limit_heap_fragmentation(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Serve allocations ≥ ``threshold`` bytes with their own mappings (glibc ``M_MMAP_THRESHOLD``).

    By default glibc raises this threshold up to 32 MB as large blocks are freed, so activation
    tensors end up in its heap, which fragments and keeps freed memory: on the tiled VAE this
    tripled peak RSS (docs/memory.md). A fixed threshold returns every freed activation to the OS
    at once; the cost is a page-fault per first touch, small next to the convolutions. Process-wide;
    a no-op (returns False) where glibc is not the allocator.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class PeakMemoryMeter:
    """Peak memory of one phase: CUDA ``max_memory_allocated`` or the process's peak RSS.

    CPU: :meth:`reset` writes ``5`` to ``/proc/self/clear_refs`` (resets VmHWM, Linux ≥ 4.0);
    where that is not allowed the peak is ``ru_maxrss`` of the whole process (``resettable`` is
    False). Values are bytes; ``current`` is the allocation (CUDA) or RSS (CPU) now.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return (
            "VmHWM (reset via /proc/self/clear_refs)" if self.resettable else "ru_maxrss (process lifetime)"
        )

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        kib = _proc_status_kib("VmRSS")
        return 0 if kib is None else kib * 1024

    def reset(self, trim: bool = True) -> int:
        """Start a new phase; returns the current usage (after trimming the heap)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self.current()
        if trim:
            release_host_memory()
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.resettable = False
        return self.current()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        kib = _proc_status_kib("VmHWM") if self.resettable else None
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib * 1024


def resident_bytes(device: torch.device | str = "cpu") -> int:
    """Memory in use now: allocated CUDA memory, or the process RSS (after a heap trim)."""
    device = torch.device(device)
    if device.type != "cuda":
        release_host_memory()
    return PeakMemoryMeter(device).current()


def automatic_budget(device: torch.device | str = "cpu", fraction: float = 0.85) -> int:
    """A budget from free memory: what is in use now plus ``fraction`` of what is free.

    CUDA: ``torch.cuda.mem_get_info`` (free device memory, other processes included). CPU:
    ``MemAvailable`` of /proc/meminfo (free + reclaimable page cache).
    """
    device = torch.device(device)
    used = resident_bytes(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # The caching allocator's reserved-but-free blocks are reusable too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _meminfo_available()
    return int(used + fraction * free)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError(
        "cannot read MemAvailable from /proc/meminfo for an automatic CPU memory budget; pass max_memory=<GB>"
    )


# ---------------------------------------------------------------------------------------------
# the memory model
# ---------------------------------------------------------------------------------------------


class MemoryBudgetError(MemoryError):
    """No tile configuration fits the memory budget."""


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of each stage above the resident memory, as ``coef × pixels × bytes/element``.

    Coefficients are peak-RSS increments measured on the full-size SD 2.1-base architecture
    (random weights, CPU, glibc heap with a fixed 1 MiB mmap threshold, bfloat16; float32 checked)
    with ``benchmarks/memory_components.py``; docs/memory.md lists the measurements. Pixels are
    output (image) pixels for the VAE, latent pixels (image/8 per side) for the UNet and the
    latent-resolution parts. ``safety`` multiplies every prediction (CUDA work spaces and allocator
    fragmentation are not in the CPU measurements).
    """

    # Untiled stock diffusers VAE, per image pixel (everything, mid-block included).
    enc_untiled: float = 660.0
    dec_untiled: float = 1080.0
    # Tiled with the tiles held on the device: per pixel of all windows (halos included).
    enc_tiled: float = 400.0
    dec_tiled: float = 600.0
    # Tiled with idle tiles offloaded: per pixel of ONE window (a single tile's working set) ...
    enc_tile: float = 520.0
    dec_tile: float = 800.0
    # ... plus the latent-resolution part that is never tiled (mid-block with global attention,
    # 512 channels), per latent pixel.
    vae_latent: float = 4300.0
    # UNet, per latent pixel processed at once (all tiles of a batch; the pooled-statistics
    # batch costs ~1.2× a single tile of the same area), plus a constant per call (work spaces
    # of the first call; measured inside restore at 1024² and 2048²).
    unet_per_latent_px: float = 12000.0
    unet_const: int = 400 * 1024**2
    # Full-image tensors alive across the call (input, float copies, output, colour fix), bytes
    # per image pixel whatever the model's dtype (they are float32).
    image_per_px: float = 80.0
    # Latent-resolution tensors alive across the call (SFT maps: 640 channels; latents, noise,
    # blending buffers), per latent pixel.
    latent_per_px: float = 800.0
    safety: float = 1.15

    def encode(self, height: int, width: int, bytes_per_el: int, tile: int | None, offload: bool) -> float:
        hw = height * width
        if tile is None or max(height, width) <= tile:
            return self.enc_untiled * hw * bytes_per_el
        if offload:
            act = self.enc_tile * _window(height, tile, 80, 8) * _window(width, tile, 80, 8)
        else:
            act = self.enc_tiled * _windows_area(height, width, tile, 80, 8)
        return (act + self.vae_latent * hw / 64) * bytes_per_el

    def decode(self, height: int, width: int, bytes_per_el: int, tile: int | None, offload: bool) -> float:
        hw = height * width
        if tile is None or max(height, width) <= tile:
            return self.dec_untiled * hw * bytes_per_el
        lt = max(1, tile // 8)
        h8, w8 = height // 8, width // 8
        if offload:
            act = self.dec_tile * 64 * _window(h8, lt, 13, 1) * _window(w8, lt, 13, 1)
        else:
            act = self.dec_tiled * 64 * _windows_area(h8, w8, lt, 13, 1)
        return (act + self.vae_latent * hw / 64) * bytes_per_el

    def unet(self, latent_px_at_once: int, bytes_per_el: int) -> float:
        return self.unet_per_latent_px * latent_px_at_once * bytes_per_el + self.unet_const

    def persistent(self, height: int, width: int, bytes_per_el: int) -> float:
        return self.image_per_px * height * width + self.latent_per_px * height * width / 64 * bytes_per_el

    def peak(
        self,
        plan: TilePlan,
        height: int,
        width: int,
        bytes_per_el: int,
        batched_unet: bool = True,
        batch: int = 1,
    ) -> float:
        """Predicted peak above resident memory for ``batch`` images of ``height × width`` output pixels."""
        enc = self.encode(height, width, bytes_per_el, plan.vae_encoder_tile, plan.offload is not None)
        dec = self.decode(height, width, bytes_per_el, plan.vae_decoder_tile, plan.offload is not None)
        unet = self.unet(_unet_latent_px(height // 8, width // 8, plan, batched_unet), bytes_per_el)
        return self.safety * batch * (self.persistent(height, width, bytes_per_el) + max(enc, dec, unet))


# The model plan_tiles uses unless given one.
DEFAULT_MODEL = MemoryModel()


def _window(length: int, tile: int, halo: int, align: int) -> int:
    from codsr.pipeline.vae_tiling import plan_axis

    tile = max(align, tile // align * align)
    length_al = max(align, length // align * align)
    return plan_axis(length_al, tile, halo, align)[0]


def _windows_area(height: int, width: int, tile: int, halo: int, align: int) -> int:
    from codsr.pipeline.vae_tiling import plan_axis

    tile = max(align, tile // align * align)
    wh, rows = plan_axis(max(align, height // align * align), tile, halo, align)
    ww, cols = plan_axis(max(align, width // align * align), tile, halo, align)
    return wh * ww * len(rows) * len(cols)


def _unet_latent_px(h: int, w: int, plan: TilePlan, batched: bool) -> int:
    from codsr.pipeline.latent_tiling import tile_grid

    tile = plan.latent_tile
    if h * w <= tile * tile:
        return h * w
    t, offsets = tile_grid(h, w, tile, min(plan.latent_overlap, max(0, min(tile, h, w) - 1)))
    return t * t * (len(offsets) if batched else 1)


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes for one ``restore`` call (VAE tiles in image px, UNet tiles in latent px)."""

    vae_encoder_tile: int | None
    vae_decoder_tile: int | None
    latent_tile: int
    latent_overlap: int
    offload: str | None = None
    predicted_peak: int = 0
    budget: int = 0

    def restore_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``CODSRPipeline.restore`` that apply this plan."""
        big = 1 << 30  # "never tile"
        return {
            "vae_encoder_tile_size": big if self.vae_encoder_tile is None else self.vae_encoder_tile,
            "vae_decoder_tile_size": big if self.vae_decoder_tile is None else self.vae_decoder_tile,
            "latent_tile_size": self.latent_tile,
            "latent_tile_overlap": self.latent_overlap,
            "vae_offload": self.offload,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Candidate tile sizes, largest first: bigger tiles waste less compute on halos.
_VAE_TILES = (None, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128)
_LATENT_TILES = (150, 128, 112, 96, 80, 64, 48, 32)
# Offload target when tiles must leave the compute device.
_OFFLOAD_FOR_DEVICE = {"cuda": "cpu"}


def _latent_overlap(tile: int) -> int:
    # The release's 50 for 150; a third of smaller tiles keeps the blend wide enough.
    return min(50, tile // 3)


def plan_tiles(
    height: int,
    width: int,
    budget: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    resident: int | None = None,
    batch: int = 1,
    batched_unet: bool = True,
    model: MemoryModel | None = None,
    allow_offload: bool = True,
) -> TilePlan:
    """The largest tiles whose predicted peak (resident + :meth:`MemoryModel.peak`) fits ``budget`` bytes.

    ``resident`` defaults to the memory in use now (weights loaded). The VAE encoder and decoder
    are planned independently: untiled if it fits, else tiled with idle tiles offloaded (host
    memory on CUDA, disk files on the CPU) with the largest tile that fits.
    ``batched_unet``: the UNet tiles run as one batch (the pipeline's default) rather than one by one.
    Raises :class:`MemoryBudgetError` when even the smallest configuration does not fit.
    """
    model = model or DEFAULT_MODEL
    device = torch.device(device)
    resident = resident_bytes(device) if resident is None else int(resident)
    b = torch.tensor([], dtype=dtype).element_size()
    free = budget - resident
    offload_target = _OFFLOAD_FOR_DEVICE.get(device.type, "disk")
    persistent = model.persistent(height, width, b)

    def fits(x: float) -> bool:
        return model.safety * batch * (persistent + x) <= free

    def vae_choice(cost: Callable[[int | None, bool], float]) -> tuple[int | None, bool] | None:
        # Untiled first; then offloaded tiles. Tiles held on the device are no option: the exact
        # tiled VAE then holds a whole layer of all tiles, as much as the untiled VAE (measured).
        candidates = [(None, False)] + [(t, allow_offload) for t in _VAE_TILES if t is not None]
        for tile, offload in candidates:
            if fits(cost(tile, offload)):
                return tile, offload
        return None

    enc = vae_choice(lambda t, o: model.encode(height, width, b, t, o))
    dec = vae_choice(lambda t, o: model.decode(height, width, b, t, o))
    latent = None
    for t in _LATENT_TILES:
        probe = TilePlan(None, None, t, _latent_overlap(t))
        if fits(model.unet(_unet_latent_px(height // 8, width // 8, probe, batched_unet), b)):
            latent = t
            break
    if enc is None or dec is None or latent is None:
        # The cheapest configuration: smallest VAE tiles, and the UNet tile with the fewest latent
        # pixels at once (with batched tiles that is not the smallest tile: overlaps add up).
        cheapest_unet = min(_LATENT_TILES, key=lambda t: _unet_latent_px(
            height // 8, width // 8, TilePlan(None, None, t, _latent_overlap(t)), batched_unet))  # fmt: skip
        smallest = TilePlan(_VAE_TILES[-1], _VAE_TILES[-1], cheapest_unet, _latent_overlap(cheapest_unet),
                            offload_target if allow_offload else None)  # fmt: skip
        need = resident + model.peak(smallest, height, width, b, batched_unet, batch)
        parts = [n for n, ok in (("VAE encoder", enc), ("VAE decoder", dec), ("UNet", latent)) if ok is None]
        raise MemoryBudgetError(
            f"a {width}×{height} output needs about {need / GB:.1f} GB with the smallest tiles "
            f"({', '.join(parts)} over budget) but the budget is {budget / GB:.1f} GB "
            f"({resident / GB:.1f} GB already in use). Raise max_memory, use a lower precision, or process "
            "a smaller image (docs/memory.md)."
        )
    offload = offload_target if (enc[1] or dec[1]) else None
    plan = TilePlan(enc[0], dec[0], latent, _latent_overlap(latent), offload)
    # Offload applies to both VAE halves; a half that fitted without it keeps its (larger) tile.
    peak = resident + model.peak(plan, height, width, b, batched_unet, batch)
    return replace(plan, predicted_peak=int(peak), budget=int(budget))


def resolve_budget(max_memory: float | str | None, device: torch.device | str) -> int | None:
    """``max_memory`` in GB (float), ``"auto"`` (from free memory) or ``None`` → bytes or None."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        if max_memory.strip().lower() == "auto":
            return automatic_budget(device)
        try:
            max_memory = float(max_memory)
        except ValueError:
            raise ValueError(f"max_memory must be a number of GB or 'auto', got {max_memory!r}") from None
    if not (max_memory > 0 and math.isfinite(max_memory)):
        raise ValueError(f"max_memory must be a positive number of GB, got {max_memory}")
    return int(max_memory * GB)


def budget_tile_kwargs(
    pipe: Any,
    shape: tuple[int, ...],
    max_memory: float | str,
    *,
    release_compat: bool = False,
    vae_encoder_tile_size: int | None = None,
    vae_decoder_tile_size: int | None = None,
    latent_tile_size: int | None = None,
    latent_tile_overlap: int | None = None,
    vae_offload: str | None = None,
) -> dict[str, Any]:
    """Tile keyword arguments of ``restore`` for a B×3×H×W input under ``max_memory``.

    Sizes the caller gave explicitly are kept; the others come from :func:`plan_tiles`.
    ``release_compat``: the UNet tiles run one by one (bounded), but the VAE is the release's
    approximate tiled VAE, which the memory model does not cover and which cannot offload: the
    budget then holds for the UNet only (a warning says so).
    """
    batched_unet = not release_compat
    b, _, height, width = shape
    device = torch.device(pipe.device)
    if device.type == "cpu":
        limit_heap_fragmentation()  # the memory model was measured this way
    budget = resolve_budget(max_memory, device)
    try:
        plan = plan_tiles(
            height, width, budget, dtype=pipe.dtype, device=device, batch=b, batched_unet=batched_unet
        )
        sequential_unet = not batched_unet
    except MemoryBudgetError:
        if not batched_unet:
            raise
        # The batched UNet (pooled GroupNorm) grows with the image: fall back to one tile at a
        # time, which is bounded, at the price of per-tile GroupNorm statistics.
        plan = plan_tiles(height, width, budget, dtype=pipe.dtype, device=device, batch=b, batched_unet=False)
        sequential_unet = True
        warnings.warn(
            f"max_memory={max_memory}: the UNet tiles run one by one to fit the budget, each with its own "
            "GroupNorm statistics (small tile-to-tile shifts are possible; docs/memory.md)",
            stacklevel=3,
        )
    logger.info("memory plan for %d×%d×%d: %s", b, height, width, plan)
    kw = plan.restore_kwargs()
    kw["sequential_unet"] = sequential_unet
    if release_compat:
        warnings.warn(
            "max_memory with release_compat=True: the release's tiled VAE is not covered by the memory model "
            "and cannot offload tiles, so only the UNet is kept within the budget (docs/memory.md)",
            stacklevel=3,
        )
        kw["vae_offload"] = None
    given = {
        "vae_encoder_tile_size": vae_encoder_tile_size,
        "vae_decoder_tile_size": vae_decoder_tile_size,
        "latent_tile_size": latent_tile_size,
        "latent_tile_overlap": latent_tile_overlap,
        "vae_offload": vae_offload,
    }
    kw.update({k: v for k, v in given.items() if v is not None})
    return kw


# ---------------------------------------------------------------------------------------------
# out-of-memory retry
# ---------------------------------------------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator's "can't allocate memory" / MemoryError."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return not isinstance(err, MemoryBudgetError)
    return isinstance(err, RuntimeError) and (
        "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower()
    )


def shrink_plan(plan: TilePlan, device: torch.device | str) -> TilePlan | None:
    """Half-size tiles (never below the smallest candidates) with VAE offloading; None when already minimal."""
    device = torch.device(device)
    offload = plan.offload or _OFFLOAD_FOR_DEVICE.get(device.type, "disk")
    smallest_vae, smallest_lat = _VAE_TILES[-1], _LATENT_TILES[-1]

    def half(t: int | None, full: int, smallest: int) -> int:
        return max(smallest, (full if t is None else t) // 2)

    # An untiled VAE stage of an image this size is as big as the image; halve from there.
    new = TilePlan(
        vae_encoder_tile=half(plan.vae_encoder_tile, 2048, smallest_vae),
        vae_decoder_tile=half(plan.vae_decoder_tile, 2048, smallest_vae),
        latent_tile=max(smallest_lat, plan.latent_tile // 2 // 8 * 8 or smallest_lat),
        latent_overlap=0,
        offload=offload,
    )
    new = replace(new, latent_overlap=_latent_overlap(new.latent_tile))
    if (new.vae_encoder_tile, new.vae_decoder_tile, new.latent_tile, new.offload) == (
        plan.vae_encoder_tile, plan.vae_decoder_tile, plan.latent_tile, plan.offload,
    ):  # fmt: skip
        return None
    return new


def _free_cached(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_host_memory()


def restore_with_oom_retry(
    run: Callable[[dict[str, Any]], Any],
    plan: TilePlan,
    device: torch.device | str,
    *,
    max_retries: int = 4,
    on_retry: Callable[[BaseException, TilePlan], None] | None = None,
) -> Any:
    """``run(plan.restore_kwargs())``; on an out-of-memory error retry with :func:`shrink_plan`.

    ``run`` receives the tile keyword arguments for ``CODSRPipeline.restore``/``__call__``. Other
    errors propagate at once; after ``max_retries`` retries (or when the tiles are already the
    smallest) the last out-of-memory error is raised.
    """
    device = torch.device(device)
    for attempt in range(max_retries + 1):
        try:
            return run(plan.restore_kwargs())
        except Exception as err:  # noqa: BLE001 - filtered just below
            if not is_out_of_memory(err):
                raise
            smaller = shrink_plan(plan, device) if attempt < max_retries else None
            if smaller is None:
                raise
            # Keep the error without its traceback: the failed call's frames hold its tensors.
            failure = err.with_traceback(None)
        _free_cached(device)
        if on_retry is not None:
            on_retry(failure, smaller)
        del failure
        plan = smaller
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises


def default_plan(height: int, width: int) -> TilePlan:
    """The pipeline's automatic tiling expressed as a plan (the OOM retry's starting point)."""
    from codsr.pipeline.pipeline import (
        DEFAULT_LATENT_OVERLAP,
        DEFAULT_LATENT_TILE,
        DEFAULT_VAE_DECODER_TILE,
        DEFAULT_VAE_ENCODER_TILE,
    )

    enc = DEFAULT_VAE_ENCODER_TILE if max(height, width) > DEFAULT_VAE_ENCODER_TILE else None
    dec = DEFAULT_VAE_DECODER_TILE if max(height, width) > DEFAULT_VAE_DECODER_TILE else None
    return TilePlan(enc, dec, DEFAULT_LATENT_TILE, DEFAULT_LATENT_OVERLAP)

"""Tile plans: the one description of how an image is tiled, and the memory-budget planner.

:class:`TilePlan` is the only way tile sizes travel (``CODSRPipeline.__call__``/``restore``, the
``codsr upscale`` CLI, the benchmarks, the OOM retry). Its defaults are defined here, once.

:func:`plan` is the one planner entry that the library and the CLI both call: without a budget it
returns the automatic plan (:meth:`TilePlan.automatic`); with ``max_memory`` (GB or ``"auto"``)
it asks :func:`plan_tiles` for the largest tiles whose *predicted* peak stays under the budget,
falling back to UNet tiles one at a time (same result, bounded memory) when the batched UNet
cannot fit. The prediction is
:class:`MemoryModel`: resident memory (what is allocated when the call starts: the weights) plus
the largest stage peak, each an affine function of the number of activation elements it holds at
once, with coefficients measured on the full-size SD 2.1-base architecture (docs/memory.md).

:func:`restore_with_oom_retry` runs an image and, on an out-of-memory error, retries it with
:func:`shrink_plan` (smaller tiles, VAE offloading, UNet tiles one by one) instead of failing.
"""

from __future__ import annotations

import gc
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from codsr.hostmem import GB, automatic_budget, release_host_memory, resident_bytes
from codsr.pipeline.latent_tiling import even_tile_grid
from codsr.pipeline.vae_tiling import DECODER_HALO, ENCODER_HALO, OFFLOAD_MODES, plan_axis

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LATENT_OVERLAP",
    "DEFAULT_LATENT_TILE",
    "DEFAULT_VAE_DECODER_TILE",
    "DEFAULT_VAE_ENCODER_TILE",
    "GB",
    "MemoryBudgetError",
    "MemoryModel",
    "TilePlan",
    "is_out_of_memory",
    "plan",
    "plan_tiles",
    "resolve_budget",
    "restore_with_oom_retry",
    "shrink_plan",
]

# The automatic tiling: the release's defaults (UNet tile 150 latent px with overlap 50; VAE
# encoder tile 1024 image px; decoder tile 224 latent px = 1792 image px). VAE tiling is exact
# here, so these only trade memory for a little halo overhead. Defined here only.
DEFAULT_LATENT_TILE = 150
DEFAULT_LATENT_OVERLAP = 50
DEFAULT_VAE_ENCODER_TILE = 1024
DEFAULT_VAE_DECODER_TILE = 224 * 8

# Candidate tile sizes of the budget planner, largest first: bigger tiles waste less compute on halos.
_VAE_TILES = (None, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128)
_LATENT_TILES = (150, 128, 112, 96, 80, 64, 48, 32)
# Offload target when VAE tiles must leave the compute device (disk elsewhere).
_OFFLOAD_FOR_DEVICE = {"cuda": "cpu"}


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TilePlan:
    """How one ``restore`` call tiles its stages. Immutable; build variants with ``dataclasses.replace``.

    Units and rules:

    * ``latent_tile`` / ``latent_overlap``: UNet tile side and overlap in **latent px** (output
      px / 8). The UNet tiles only when the latent's area h·w exceeds ``latent_tile²`` (the
      release's rule); tiles are blended with Gaussian weights (docs/inference.md).
    * ``vae_encoder_tile`` / ``vae_decoder_tile``: VAE tile side in **output image px**; a stage
      tiles only when the image's longer side exceeds its tile; ``None`` = never tiled.
    * ``offload``: where idle VAE tiles, and with ``sequential_unet`` idle UNet tiles, wait
      (``None`` = on the device, ``"cpu"`` = host memory, ``"disk"`` = temporary files); only the
      exact tiled VAE and the sequential UNet tiles can offload.
    * ``sequential_unet``: run the UNet tiles one by one with the same pooled GroupNorm statistics
      as the batch (``latent_tiling.sequential_pooled_noise_prediction``: equal to float rounding,
      about the same compute, memory of one tile) instead of one batch (the default; its memory grows
      with the image). ``release_compat=True`` runs them one by one with per-tile statistics.
    * ``predicted_peak`` / ``budget``: informational, in **bytes**; 0 = not planned under a budget.

    ``TilePlan()`` holds the defaults, which behave as the automatic plan for any image (the
    thresholds above decide); :meth:`automatic` spells out which stages actually tile.
    """

    latent_tile: int = DEFAULT_LATENT_TILE
    latent_overlap: int = DEFAULT_LATENT_OVERLAP
    vae_encoder_tile: int | None = DEFAULT_VAE_ENCODER_TILE
    vae_decoder_tile: int | None = DEFAULT_VAE_DECODER_TILE
    offload: str | None = None
    sequential_unet: bool = False
    predicted_peak: int = 0
    budget: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, unit: str) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TilePlan.{name} must be a positive integer ({unit}), got {v!r}")

        positive_int("latent_tile", self.latent_tile, "latent px = output px / 8")
        if isinstance(self.latent_overlap, bool) or not isinstance(self.latent_overlap, int):
            raise ValueError(f"TilePlan.latent_overlap must be an integer (latent px), got {self.latent_overlap!r}")
        if not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(
                f"TilePlan.latent_overlap must be in [0, latent_tile) = [0, {self.latent_tile}) latent px, "
                f"got {self.latent_overlap}"
            )
        for name in ("vae_encoder_tile", "vae_decoder_tile"):
            v = getattr(self, name)
            if v is not None:
                positive_int(name, v, "output image px, or None for untiled")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(f"TilePlan.offload must be None, 'cpu' or 'disk', got {self.offload!r}")

    @classmethod
    def automatic(cls, height: int, width: int) -> TilePlan:
        """The automatic plan for an image restored at ``height × width`` output px: default UNet
        tiles (used when the latent area exceeds 150²), and VAE tiles of 1024 / 1792 px only for a
        stage whose image side exceeds them (``None`` otherwise)."""
        side = max(int(height), int(width))
        return cls(
            vae_encoder_tile=DEFAULT_VAE_ENCODER_TILE if side > DEFAULT_VAE_ENCODER_TILE else None,
            vae_decoder_tile=DEFAULT_VAE_DECODER_TILE if side > DEFAULT_VAE_DECODER_TILE else None,
        )

    @classmethod
    def from_tile(cls, tile_px: int, overlap_px: int | None = None) -> TilePlan:
        """One tile size in output px for the VAE and the UNet (the CLI's ``--tile``/``--tile-overlap``).

        UNet tile = ``max(8, tile_px // 8)`` latent px; overlap = ``overlap_px // 8`` capped at
        tile − 1, or by default a third of the tile, at most the default 50 latent px (as the
        budget planner chooses it; a fixed 50 would make small tiles overlap almost entirely).
        """
        if isinstance(tile_px, bool) or int(tile_px) != tile_px or tile_px < 8:
            raise ValueError(f"tile size must be an integer ≥ 8 output px, got {tile_px!r}")
        latent = max(8, int(tile_px) // 8)
        return cls(
            latent_tile=latent,
            latent_overlap=_overlap_from_px(overlap_px, latent),
            vae_encoder_tile=int(tile_px),
            vae_decoder_tile=int(tile_px),
        )

    def with_overlap_px(self, overlap_px: int) -> TilePlan:
        """This plan with the UNet overlap set from output px (``overlap_px // 8``, capped at tile − 1)."""
        return replace(self, latent_overlap=_overlap_from_px(overlap_px, self.latent_tile))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def vae_tiled(self) -> bool:
        """True when the VAE encoder or decoder runs in tiles, or tiles are offloaded / the UNet
        runs tile by tile: the large-image plans, where host memory is what matters."""
        return (self.vae_encoder_tile is not None or self.vae_decoder_tile is not None or self.sequential_unet
                or self.offload is not None)  # fmt: skip

    def describe(self) -> str:
        """One line for people: tile sizes with units, offload, UNet mode, prediction."""

        def vae(t: int | None) -> str:
            return "untiled" if t is None else f"{t} px"

        s = (
            f"UNet tiles {self.latent_tile} latent px (overlap {self.latent_overlap}, "
            f"{'one by one' if self.sequential_unet else 'batched'}), VAE encoder {vae(self.vae_encoder_tile)}, "
            f"decoder {vae(self.vae_decoder_tile)}"
        )
        if self.offload:
            s += f", idle VAE tiles on {self.offload}"
        if self.budget:
            s += f", predicted peak {self.predicted_peak / GB:.2f} of {self.budget / GB:.2f} GiB"
        return s


def _overlap_from_px(overlap_px: int | None, latent_tile: int) -> int:
    if overlap_px is None:
        return _latent_overlap(latent_tile)
    if isinstance(overlap_px, bool) or int(overlap_px) != overlap_px or overlap_px < 0:
        raise ValueError(f"tile overlap must be a non-negative integer of output px, got {overlap_px!r}")
    return min(int(overlap_px) // 8, latent_tile - 1)


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
    # UNet tiles one by one with idle tiles kept on the device (no offload): the stored current
    # activation and skip connections of all tiles, per latent px of all windows. Estimated from
    # the SD 2.1 layer widths (skips ≈ 1620 elements per latent px, plus current/next), not measured.
    unet_stored_per_window_px: float = 2600.0
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
            act = self.enc_tile * _window(height, tile, ENCODER_HALO, 8) * _window(width, tile, ENCODER_HALO, 8)
        else:
            act = self.enc_tiled * _windows_area(height, width, tile, ENCODER_HALO, 8)
        return (act + self.vae_latent * hw / 64) * bytes_per_el

    def decode(self, height: int, width: int, bytes_per_el: int, tile: int | None, offload: bool) -> float:
        hw = height * width
        if tile is None or max(height, width) <= tile:
            return self.dec_untiled * hw * bytes_per_el
        lt = max(1, tile // 8)
        h8, w8 = height // 8, width // 8
        if offload:
            act = self.dec_tile * 64 * _window(h8, lt, DECODER_HALO, 1) * _window(w8, lt, DECODER_HALO, 1)
        else:
            act = self.dec_tiled * 64 * _windows_area(h8, w8, lt, DECODER_HALO, 1)
        return (act + self.vae_latent * hw / 64) * bytes_per_el

    def unet(self, latent_px_at_once: int, bytes_per_el: int) -> float:
        return self.unet_per_latent_px * latent_px_at_once * bytes_per_el + self.unet_const

    def unet_stored(self, h: int, w: int, tile: int, overlap: int, bytes_per_el: int) -> float:
        """Idle-tile storage of the sequential UNet tiles kept on the device (latent ``h × w``)."""
        if h * w <= tile * tile:
            return 0.0
        t, offsets = even_tile_grid(h, w, tile, min(overlap, max(0, min(tile, h, w) - 1)))
        return self.unet_stored_per_window_px * t * t * len(offsets) * bytes_per_el

    def persistent(self, height: int, width: int, bytes_per_el: int) -> float:
        return self.image_per_px * height * width + self.latent_per_px * height * width / 64 * bytes_per_el

    def peak(self, plan: TilePlan, height: int, width: int, bytes_per_el: int, batch: int = 1) -> float:
        """Predicted peak above resident memory for ``batch`` images of ``height × width`` output px."""
        offload = plan.offload is not None
        enc = self.encode(height, width, bytes_per_el, plan.vae_encoder_tile, offload)
        dec = self.decode(height, width, bytes_per_el, plan.vae_decoder_tile, offload)
        at_once = _unet_latent_px(height // 8, width // 8, plan.latent_tile, plan.latent_overlap,
                                  batched=not plan.sequential_unet)  # fmt: skip
        unet = self.unet(at_once, bytes_per_el)
        if plan.sequential_unet and plan.offload is None:
            unet += self.unet_stored(height // 8, width // 8, plan.latent_tile, plan.latent_overlap, bytes_per_el)
        return self.safety * batch * (self.persistent(height, width, bytes_per_el) + max(enc, dec, unet))


# The model the planner uses unless given one.
DEFAULT_MODEL = MemoryModel()


def _window(length: int, tile: int, halo: int, align: int) -> int:
    tile = max(align, tile // align * align)
    return plan_axis(max(align, length // align * align), tile, halo, align)[0]


def _windows_area(height: int, width: int, tile: int, halo: int, align: int) -> int:
    tile = max(align, tile // align * align)
    wh, rows = plan_axis(max(align, height // align * align), tile, halo, align)
    ww, cols = plan_axis(max(align, width // align * align), tile, halo, align)
    return wh * ww * len(rows) * len(cols)


def _unet_latent_px(h: int, w: int, tile: int, overlap: int, batched: bool) -> int:
    """Latent px the UNet holds at once: the whole latent untiled, one tile or all tiles (batched)."""
    if h * w <= tile * tile:
        return h * w
    t, offsets = even_tile_grid(h, w, tile, min(overlap, max(0, min(tile, h, w) - 1)))
    return t * t * (len(offsets) if batched else 1)


def _latent_overlap(tile: int) -> int:
    # The release's 50 for 150; a third of smaller tiles keeps the blend wide enough.
    return min(DEFAULT_LATENT_OVERLAP, tile // 3)


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def resolve_budget(max_memory: float | str | None, device: torch.device | str) -> int | None:
    """``max_memory`` in GB (GiB, a number or numeric string), ``"auto"`` (from free memory) or
    ``None`` → bytes or None."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        if max_memory.strip().lower() == "auto":
            return automatic_budget(device)
        try:
            max_memory = float(max_memory)
        except ValueError:
            raise ValueError(f"max_memory must be a number of GB or 'auto', got {max_memory!r}") from None
    if isinstance(max_memory, bool) or not (max_memory > 0 and math.isfinite(max_memory)):
        raise ValueError(f"max_memory must be a positive number of GB or 'auto', got {max_memory}")
    return int(max_memory * GB)


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def plan_tiles(
    height: int,
    width: int,
    budget: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    resident: int | None = None,
    batch: int = 1,
    sequential_unet: bool = False,
    model: MemoryModel | None = None,
    allow_offload: bool = True,
) -> TilePlan:
    """The largest tiles whose predicted peak (resident + :meth:`MemoryModel.peak`) fits ``budget`` bytes.

    ``resident`` defaults to the memory in use now (weights loaded). The VAE encoder and decoder
    are planned independently: untiled if it fits, else tiled with idle tiles offloaded (host
    memory on CUDA, disk files elsewhere) with the largest tile that fits. ``sequential_unet``:
    plan for UNet tiles one by one rather than the pipeline's default single batch.
    Raises :class:`MemoryBudgetError` when even the smallest configuration does not fit.
    """
    model = model or DEFAULT_MODEL
    device = torch.device(device)
    resident = resident_bytes(device) if resident is None else int(resident)
    b = _element_size(dtype)
    free = budget - resident
    offload_target = _OFFLOAD_FOR_DEVICE.get(device.type, "disk")
    persistent = model.persistent(height, width, b)
    batched = not sequential_unet

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

    def unet_px(t: int) -> int:
        return _unet_latent_px(height // 8, width // 8, t, _latent_overlap(t), batched)

    def unet_cost(t: int, offload: bool) -> float:
        stored = 0.0 if batched or offload else model.unet_stored(height // 8, width // 8, t, _latent_overlap(t), b)
        return model.unet(unet_px(t), b) + stored

    enc = vae_choice(lambda t, o: model.encode(height, width, b, t, o))
    dec = vae_choice(lambda t, o: model.decode(height, width, b, t, o))
    # Sequential UNet tiles: idle tiles on the device first, else offloaded like the VAE's.
    unet_modes = (False,) if batched or not allow_offload else (False, True)
    choice = next(((t, o) for o in unet_modes for t in _LATENT_TILES if fits(unet_cost(t, o))), None)
    latent = None if choice is None else choice[0]
    if enc is None or dec is None or latent is None:
        # The cheapest configuration: smallest VAE tiles, and the UNet tile with the fewest latent
        # pixels at once (with batched tiles that is not the smallest tile: overlaps add up).
        cheapest = min(_LATENT_TILES, key=unet_px)
        smallest = TilePlan(
            latent_tile=cheapest, latent_overlap=_latent_overlap(cheapest), vae_encoder_tile=_VAE_TILES[-1],
            vae_decoder_tile=_VAE_TILES[-1], offload=offload_target if allow_offload else None,
            sequential_unet=sequential_unet,
        )  # fmt: skip
        need = resident + model.peak(smallest, height, width, b, batch)
        parts = [n for n, ok in (("VAE encoder", enc), ("VAE decoder", dec), ("UNet", latent)) if ok is None]
        raise MemoryBudgetError(
            f"a {width}×{height} output needs about {need / GB:.1f} GB with the smallest tiles "
            f"({', '.join(parts)} over budget) but the budget is {budget / GB:.1f} GB "
            f"({resident / GB:.1f} GB already in use). Raise max_memory, use a lower precision, or process "
            "a smaller image (docs/memory.md)."
        )
    # Offload applies to both VAE halves; a half that fitted without it keeps its (larger) tile.
    out = TilePlan(
        latent_tile=latent, latent_overlap=_latent_overlap(latent), vae_encoder_tile=enc[0],
        vae_decoder_tile=dec[0], offload=offload_target if (enc[1] or dec[1] or choice[1]) else None,
        sequential_unet=sequential_unet,
    )  # fmt: skip
    peak = resident + model.peak(out, height, width, b, batch)
    return replace(out, predicted_peak=int(peak), budget=int(budget))


def plan(
    height: int,
    width: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    max_memory: float | str | None = None,
    tile_plan: TilePlan | None = None,
    batch: int = 1,
    release_compat: bool = False,
    resident: int | None = None,
) -> TilePlan:
    """The plan for ``batch`` images restored at ``height × width`` output px: the one planner
    entry of ``CODSRPipeline`` and the ``codsr upscale`` CLI.

    * ``tile_plan`` given: used as is. With ``max_memory`` too, its ``predicted_peak``/``budget``
      are filled in and a warning says when the prediction exceeds the budget.
    * else ``max_memory`` given (GB or ``"auto"``): :func:`plan_tiles` with the UNet tiles in one
      batch; if that cannot fit, the UNet tiles one by one (bounded memory, the same pooled
      GroupNorm statistics, about the same compute; a warning says so). :class:`MemoryBudgetError` when
      nothing fits.
    * else: :meth:`TilePlan.automatic`.

    ``release_compat``: the UNet tiles run one by one (``sequential_unet=True`` in the returned
    plan) and the VAE is the release's approximate tiled VAE, which the memory model does not
    cover and which cannot offload: under a budget only the UNet is kept within it (a warning
    says so). ``resident``: bytes in use before the call (default: measured now).
    """
    device = torch.device(device)
    budget = resolve_budget(max_memory, device)
    if tile_plan is not None:
        if not isinstance(tile_plan, TilePlan):
            raise TypeError(f"tile_plan must be a codsr.TilePlan, got {type(tile_plan).__name__}")
        if budget is None:
            return tile_plan
        resident = resident_bytes(device) if resident is None else int(resident)
        peak = int(resident + DEFAULT_MODEL.peak(tile_plan, height, width, _element_size(dtype), batch))
        if peak > budget:
            warnings.warn(
                f"the given tile_plan is predicted to peak at {peak / GB:.2f} GB, over max_memory="
                f"{max_memory} ({budget / GB:.2f} GB); it is used as given (docs/memory.md)",
                stacklevel=2,
            )
        return replace(tile_plan, predicted_peak=peak, budget=budget)
    if budget is None:
        automatic = TilePlan.automatic(height, width)
        return replace(automatic, sequential_unet=True) if release_compat else automatic
    resident = resident_bytes(device) if resident is None else int(resident)
    kw: dict[str, Any] = dict(dtype=dtype, device=device, resident=resident, batch=batch)
    try:
        out = plan_tiles(height, width, budget, sequential_unet=release_compat, **kw)
    except MemoryBudgetError:
        if release_compat:
            raise
        # The batched UNet (pooled GroupNorm) grows with the image: fall back to one tile at a
        # time with the same pooled statistics (same result, bounded memory, about the same compute).
        out = plan_tiles(height, width, budget, sequential_unet=True, **kw)
        warnings.warn(
            f"max_memory={max_memory}: the UNet tiles run one by one to fit the budget (the same pooled "
            "GroupNorm statistics as the batch, so the same result; docs/memory.md)",
            stacklevel=2,
        )
    if release_compat:
        warnings.warn(
            "max_memory with release_compat=True: the release's tiled VAE is not covered by the memory model "
            "and cannot offload tiles, so only the UNet is kept within the budget (docs/memory.md)",
            stacklevel=2,
        )
        out = replace(out, offload=None)
    logger.info("memory plan for %d×%d×%d: %s", batch, height, width, out.describe())
    return out


# ---------------------------------------------------------------------------------------------
# out-of-memory retry
# ---------------------------------------------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator's "can't allocate memory" / MemoryError (not a budget error)."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return not isinstance(err, MemoryBudgetError)
    return isinstance(err, RuntimeError) and (
        "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower()
    )


def shrink_plan(plan: TilePlan, device: torch.device | str) -> TilePlan | None:
    """A cheaper plan after an out-of-memory error; None when already minimal.

    Half-size tiles (never below the planner's smallest candidates), VAE and UNet tiles offloaded,
    and the UNet tiles one by one (the only UNet setting whose memory does not grow with the image;
    same pooled statistics as the batch).
    """
    device = torch.device(device)
    offload = plan.offload or _OFFLOAD_FOR_DEVICE.get(device.type, "disk")
    smallest_vae, smallest_lat = _VAE_TILES[-1], _LATENT_TILES[-1]

    def half(t: int | None) -> int:
        # An untiled VAE stage of an image this size is as big as the image; halve from 2048.
        return max(smallest_vae, (2048 if t is None else t) // 2)

    latent = max(smallest_lat, plan.latent_tile // 2 // 8 * 8 or smallest_lat)
    new = TilePlan(
        latent_tile=latent, latent_overlap=_latent_overlap(latent), vae_encoder_tile=half(plan.vae_encoder_tile),
        vae_decoder_tile=half(plan.vae_decoder_tile), offload=offload, sequential_unet=True,
    )  # fmt: skip
    key = ("vae_encoder_tile", "vae_decoder_tile", "latent_tile", "offload", "sequential_unet")
    if all(getattr(new, k) == getattr(plan, k) for k in key):
        return None
    return new


def _free_cached(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_host_memory()


def restore_with_oom_retry(
    run: Callable[[TilePlan], Any],
    plan: TilePlan,
    device: torch.device | str,
    *,
    max_retries: int = 4,
    on_retry: Callable[[BaseException, TilePlan], None] | None = None,
) -> Any:
    """``run(plan)``; on an out-of-memory error retry with :func:`shrink_plan`.

    ``run`` gets the :class:`TilePlan` to pass as ``tile_plan=`` to ``CODSRPipeline.__call__`` /
    ``restore``. Other errors propagate at once; after ``max_retries`` retries (or when the plan is
    already minimal) the last out-of-memory error is raised.
    """
    device = torch.device(device)
    for attempt in range(max_retries + 1):
        try:
            return run(plan)
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

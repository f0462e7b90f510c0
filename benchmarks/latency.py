"""Latency and peak-memory benchmark of CODSR inference on the full-size SD 2.1-base architecture.

Weights are random (``codsr.testing.sd21``; nothing is downloaded), so the cost is that of the
real model: CLIP ViT-H text tower, VAE, 865 M-parameter UNet, SFT; LoRA merged as at inference.
Each measurement is ONE real ``CODSRPipeline.restore`` call whose stage functions are wrapped on
the instance with timers and memory meters:

=============== =====================================================================
text_encoding   ``pipe.encode_prompt``
vae_encode      ``generator.encode_moments`` or the tiled encoder (exact, or the release's)
rgpa_sft        ``generator.noisy_latent`` (RGPA, Eq. 1, 3) + ``generator.modulation`` (SFT)
unet            ``generator.predict_noise`` (every UNet call, tiles included)
vae_decode      ``generator.decode`` or the tiled decoder (exact, or the release's)
other           end-to-end time of the call minus the stages (input checks, noise, blending)
=============== =====================================================================

The stages are timed inside the same call that is timed end to end, so they add up to it up to
``other``. Latency is the median over ``--repeats`` calls after ``--warmup`` calls; FLOPs are
counted with ``torch.utils.flop_counter.FlopCounterMode`` during the first warm-up call (or an
extra untimed call when ``--warmup 0``), per stage, and give achieved GFLOP/s. Peak memory per
stage: CPU peak RSS (VmHWM, reset through /proc/self/clear_refs before each stage), CUDA
``max_memory_allocated`` (reset before each stage).

CUDA (``--device cuda``): stage times as above (synchronised), plus the end-to-end latency of
uninstrumented calls measured with CUDA events after the warm-up (``cuda_events``: the whole
``restore`` and the model forward with the prompt already encoded), ``max_memory_allocated`` as
the peak. ``--channels-last`` puts the UNet and VAE weights in channels-last layout (without it the
VAE still runs channels-last where the pipeline's default does: bf16/fp16 on the CPU); attention is
diffusers' default processor, ``F.scaled_dot_product_attention`` (recorded in the JSON).
``--compile`` compiles the UNet's down/mid/up blocks and the VAE encoder/decoder with
``torch.compile`` (hook-free modules; the LQFM hook on ``conv_in`` and the tiled stages' GroupNorm
pooling stay eager); the first calls that trigger compilation are timed apart as
``compile_s`` and never enter the medians. fp16 runs decode with the pipeline's overflow guard
(the VAE decoder is re-run in float32 when the fp16 decode is not finite; ``fp16_decode_upcasts``
counts it).

``--sizes 512,1024,2048`` (commas or spaces) is a sweep; ``--plot sweep.png`` draws time and peak
memory against output pixels (matplotlib, a benchmark-only dependency), also from saved JSON with
``--plot-only results.json [more.json ...]`` (several files: one plot of all their runs).

Usage::

    python benchmarks/latency.py --sizes 512 1024 --dtypes fp32 bf16 --device cpu \\
        --repeats 3 --warmup 1 --threads 2 --out results.json
    python benchmarks/latency.py --device cuda --dtypes fp16 bf16 --sizes 512,1024,2048 \\
        --channels-last --compile --no-flops --out cuda.json --plot cuda.png
"""

from __future__ import annotations

import os

# Before torch is imported: spinning OpenMP workers make small CPUs erratic (ENVIRONMENT.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from codsr.hostmem import PeakMemoryMeter  # noqa: E402
from codsr.pipeline.tiled_stages import DecodeUpcastWarning  # noqa: E402

SCHEMA_VERSION = 1
STAGES: tuple[str, ...] = ("text_encoding", "vae_encode", "rgpa_sft", "unet", "vae_decode")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_PROMPT = "a photo of a cat sitting on a wooden bench, grass, tree, sky, high quality,"
# The stage sums must match the end-to-end time within this fraction (checked and reported).
RESIDUAL_TOLERANCE = 0.10


class StageMissingError(RuntimeError):
    """A stage the benchmark times is not where it looks for it, or was never called."""


@dataclass
class StageRecord:
    """What one stage cost inside one ``restore`` call (summed over its calls, e.g. UNet tiles)."""

    seconds: float = 0.0
    calls: int = 0
    start_bytes: int | None = None  # memory in use when the stage first started
    peak_bytes: int = 0  # highest peak over its calls
    flops: int = 0


@dataclass
class CallRecord:
    total_seconds: float
    stages: dict[str, StageRecord] = field(default_factory=dict)
    peak_bytes: int = 0  # peak over the whole call

    @property
    def other_seconds(self) -> float:
        return self.total_seconds - sum(s.seconds for s in self.stages.values())


class StageTimer:
    """Times and meters stage functions; nested stage calls are charged to the outer stage."""

    def __init__(self, device: torch.device, flop_counter: Any | None = None, progress: bool = False) -> None:
        self.device = torch.device(device)
        self.meter = PeakMemoryMeter(self.device)
        self.flop_counter = flop_counter
        self.progress = progress
        self.records: dict[str, StageRecord] = {s: StageRecord() for s in STAGES}
        self.call_peak = 0
        self._depth = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _flops(self) -> int:
        return int(self.flop_counter.get_total_flops()) if self.flop_counter is not None else 0

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if stage not in self.records:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            rec = self.records[stage]
            # The peak so far belongs to the call (the meter is reset per stage).
            self.call_peak = max(self.call_peak, self.meter.peak())
            start = self.meter.reset()
            if rec.start_bytes is None:
                rec.start_bytes = start
            flops0 = self._flops()
            self._depth += 1
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                rec.seconds += time.perf_counter() - t0
                self._depth -= 1
                rec.calls += 1
                rec.flops += self._flops() - flops0
                peak = self.meter.peak()
                rec.peak_bytes = max(rec.peak_bytes, peak)
                self.call_peak = max(self.call_peak, peak)
                if self.progress:  # partial results survive a run that is stopped early
                    print(f"  [{stage}] call {rec.calls}: {rec.seconds:.2f} s so far, peak {peak / 1024**3:.3f} GB "
                          f"(start {start / 1024**3:.3f} GB)", file=sys.stderr, flush=True)  # fmt: skip

        return timed


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an attribute for the block (instance attribute or module global), then restore it."""
    had = name in vars(obj) if not isinstance(obj, type(os)) else hasattr(obj, name)
    old = getattr(obj, name) if had else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def instrument(pipe: Any, timer: StageTimer) -> Iterator[StageTimer]:
    """Wrap the stage functions of ``pipe`` (on the instance, and the tiled VAE functions that the
    pipeline's tiled stages look up in their module) with ``timer`` for the duration of the block.

    Raises :class:`StageMissingError` when one of them no longer exists: a benchmark that silently
    stopped timing a stage would report wrong shares.
    """
    import codsr.pipeline.tiled_stages as stages_module

    model = pipe.generator
    targets = [
        (pipe, "encode_prompt", "text_encoding"),
        (model, "encode_moments", "vae_encode"),
        (stages_module, "tiled_encode_moments", "vae_encode"),
        (model, "noisy_latent", "rgpa_sft"),
        (model, "modulation", "rgpa_sft"),
        (model, "predict_noise", "unet"),
        # plan.sequential_unet: the UNet tiles one by one, driven unit by unit (not via predict_noise)
        (stages_module, "sequential_pooled_noise_prediction", "unet"),
        (model, "decode", "vae_decode"),
        (stages_module, "tiled_decode", "vae_decode"),
        # release_compat=True runs the release's approximate tiled VAE instead
        (stages_module, "release_tiled_encoder_forward", "vae_encode"),
        (stages_module, "release_tiled_decoder_forward", "vae_decode"),
        # decoder="tiny": the preview decoder (AutoencoderTiny)
        (stages_module, "tiny_decode", "vae_decode"),
    ]
    missing = [f"{getattr(obj, '__name__', type(obj).__name__)}.{name}" for obj, name, _ in targets
               if not hasattr(obj, name)]  # fmt: skip
    if missing:
        raise StageMissingError(
            f"cannot instrument {', '.join(missing)}: the pipeline no longer has these stage functions; "
            "update benchmarks/latency.py (instrument) to the pipeline's stages"
        )
    with contextlib.ExitStack() as stack:
        for obj, name, stage in targets:
            stack.enter_context(_patched(obj, name, timer.wrap(stage, getattr(obj, name))))
        yield timer


def flop_counter() -> Any:
    """A ``FlopCounterMode`` that also counts the CPU flash-attention kernel.

    torch's counter has formulas for the CUDA SDPA kernels only; on the CPU
    ``F.scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``,
    which would otherwise count as zero (the UNet's and the VAE mid-block's attention).
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = cpu_sdpa
    return FlopCounterMode(display=False, custom_mapping=mapping)


def timed_restore(
    pipe: Any,
    lq: torch.Tensor,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    count_flops: bool = False,
    progress: bool = False,
    **restore_kwargs: Any,
) -> CallRecord:
    """One instrumented ``pipe.restore`` call: per-stage and end-to-end time, memory and FLOPs."""
    device = torch.device(pipe.device)
    counter = flop_counter() if count_flops else None
    timer = StageTimer(device, counter, progress)
    with contextlib.ExitStack() as stack:
        if counter is not None:
            stack.enter_context(counter)
        stack.enter_context(instrument(pipe, timer))
        generator = torch.Generator().manual_seed(seed)
        timer.meter.reset()
        timer._sync()
        t0 = time.perf_counter()
        out = pipe.restore(lq, prompt=prompt, generator=generator, **restore_kwargs)
        timer._sync()
        total = time.perf_counter() - t0
    if not torch.isfinite(out).all():
        raise RuntimeError("the benchmarked restore produced NaN/Inf: the random weights are not sane")
    never = [s for s, r in timer.records.items() if r.calls == 0]
    if never:
        raise StageMissingError(
            f"stage(s) {', '.join(never)} were never called during restore(): the instrumented functions no "
            "longer are the ones restore runs; update benchmarks/latency.py (instrument)"
        )
    peak = max(timer.call_peak, timer.meter.peak())
    return CallRecord(total, timer.records, peak)


def synthetic_lq(size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth random B×3×size×size image in [-1, 1] (some edges, so RGPA is not constant)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, size // 32), max(2, size // 32), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(batch, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(calls: Sequence[CallRecord], flops: dict[str, int] | None) -> dict[str, Any]:
    """Median latencies and per-stage memory/FLOP figures of repeated calls (JSON-ready)."""
    flops = flops or {}
    totals = [c.total_seconds for c in calls]
    out_stages: dict[str, Any] = {}
    for s in STAGES:
        times = [c.stages[s].seconds for c in calls]
        med = _median(times)
        f = int(flops.get(s, 0))
        out_stages[s] = {
            "median_s": med,
            "times_s": times,
            "calls": calls[-1].stages[s].calls if calls else 0,
            "start_bytes": max((c.stages[s].start_bytes or 0) for c in calls) if calls else 0,
            "peak_bytes": max(c.stages[s].peak_bytes for c in calls) if calls else 0,
            "gflop": f / 1e9,
            "gflops_per_s": (f / 1e9 / med) if f and med > 0 else None,
        }
    others = [c.other_seconds for c in calls]
    total_med = _median(totals)
    stage_sum = sum(v["median_s"] for v in out_stages.values())
    # The residual check is per call (stages and total of the SAME call).
    fractions = [abs(c.other_seconds) / c.total_seconds for c in calls if c.total_seconds > 0]
    total_flops = sum(int(v) for v in flops.values())
    return {
        "stages": out_stages,
        "total": {
            "median_s": total_med,
            "times_s": totals,
            "peak_bytes": max(c.peak_bytes for c in calls) if calls else 0,
            "gflop": total_flops / 1e9,
            "gflops_per_s": (total_flops / 1e9 / total_med) if total_flops and total_med > 0 else None,
        },
        "other": {"median_s": _median(others), "times_s": others},
        "stage_sum_median_s": stage_sum,
        "max_residual_fraction": max(fractions) if fractions else None,
        "stages_sum_within_tolerance": bool(fractions) and max(fractions) <= RESIDUAL_TOLERANCE,
    }


def prepare_pipeline(pipe: Any, *, channels_last: bool = False, compile: bool = False) -> dict[str, Any]:
    """Layout and compilation of the benchmarked pipeline; returns what was done (for the JSON).

    ``compile``: ``torch.compile`` (inductor, default mode) of the hook-free modules: the UNet's
    down, mid and up blocks and the VAE encoder and decoder (``nn.Module.compile``, in place). The
    LQFM hook on ``unet.conv_in`` and the GroupNorm pooling of the tiled stages stay outside.
    """
    model = pipe.generator
    unet, vae = model.unet, model.vae
    if channels_last:
        pipe.to(channels_last=True)  # the pipeline's own VAE layout setting (restore keeps it)
        for m in (unet, model.sft):
            m.to(memory_format=torch.channels_last)
    compiled = []
    if compile:
        for name, m in [*((f"unet.down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)),
                        ("unet.mid_block", unet.mid_block),
                        *((f"unet.up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)),
                        ("vae.encoder", vae.encoder), ("vae.decoder", vae.decoder)]:  # fmt: skip
            m.compile(dynamic=False)  # one static graph per size: no slower dynamic-shape kernels
            compiled.append(name)
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return {"channels_last": channels_last, "vae_channels_last": pipe.vae_channels_last,
            "compiled_modules": compiled, "unet_attention_processors": processors,
            "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention")}  # fmt: skip


def cuda_event_latency(
    pipe: Any, lq: torch.Tensor, prompt: str, repeats: int, **restore_kwargs: Any
) -> dict[str, Any]:
    """Milliseconds of uninstrumented calls, CUDA events around each (after the warm-up):
    ``restore_ms`` the whole ``restore`` (prompt encoding included, input on the host), and
    ``forward_ms`` with the prompt already encoded and the input already on the device."""
    device = torch.device(pipe.device)
    embeds = pipe.encode_prompt([prompt] * lq.shape[0])
    lq_dev = lq.to(device)
    out: dict[str, Any] = {}
    for name, x, extra in (
        ("restore_ms", lq, {"prompt": prompt}),
        ("forward_ms", lq_dev, {"prompt_embeds": embeds}),
    ):
        times = []
        for i in range(repeats):
            g = torch.Generator().manual_seed(200 + i)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            pipe.restore(x, generator=g, **extra, **restore_kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[name] = {"median": _median(times), "times": times}
    return out


def benchmark_pipeline(
    pipe: Any,
    size: int,
    *,
    repeats: int = 3,
    warmup: int = 1,
    count_flops: bool = True,
    prompt: str = DEFAULT_PROMPT,
    batch: int = 1,
    progress: bool = False,
    **restore_kwargs: Any,
) -> dict[str, Any]:
    """Benchmark ``pipe.restore`` on a ``size``² output; returns the JSON-ready summary.

    The warm-up calls' end-to-end seconds are kept apart (``warmup_s``; with ``--compile`` the
    first includes compilation). On CUDA, :func:`cuda_event_latency` adds ``cuda_events``.
    """
    if repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {repeats}")
    lq = synthetic_lq(size, batch)
    flops: dict[str, int] | None = None
    warmup_s: list[float] = []
    upcasts = 0
    for i in range(warmup):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = timed_restore(
                pipe, lq, prompt, seed=i, count_flops=count_flops and i == 0, **restore_kwargs
            )
        upcasts += sum(issubclass(w.category, DecodeUpcastWarning) for w in caught)
        warmup_s.append(rec.total_seconds)
        if count_flops and i == 0:
            flops = {s: r.flops for s, r in rec.stages.items()}
    if count_flops and flops is None:  # no warm-up: count on an extra, untimed call
        rec = timed_restore(pipe, lq, prompt, seed=0, count_flops=True, **restore_kwargs)
        flops = {s: r.flops for s, r in rec.stages.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls = [
            timed_restore(pipe, lq, prompt, seed=100 + i, progress=progress, **restore_kwargs)
            for i in range(repeats)
        ]
    upcasts += sum(issubclass(w.category, DecodeUpcastWarning) for w in caught)
    summary = summarize(calls, flops)
    summary.update({"size": size, "batch": batch, "repeats": repeats, "warmup": warmup, "warmup_s": warmup_s,
                    "fp16_decode_upcasts": upcasts})  # fmt: skip
    if warmup_s:
        # what the first call cost beyond a steady one: compilation (and first-call work spaces)
        summary["compile_s"] = max(0.0, warmup_s[0] - summary["total"]["median_s"])
    if torch.device(pipe.device).type == "cuda":
        summary["cuda_events"] = cuda_event_latency(pipe, lq, prompt, repeats, **restore_kwargs)
    return summary


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="ascii") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def _fmt_gb(b: int | None) -> str:
    return "-" if not b else f"{b / 1024**3:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A text table of one configuration's summary."""
    head = (
        f"{result['size']}² output, {result['dtype']} on {result['device']}, batch {result['batch']}, "
        f"median of {result['repeats']} (warm-up {result['warmup']})"
    )
    rows = [
        f"{'stage':<14}{'median s':>10}{'share':>8}{'GFLOP':>10}{'GFLOP/s':>10}{'start GB':>10}{'peak GB':>10}"
    ]
    total = result["total"]["median_s"]
    for s in STAGES:
        r = result["stages"][s]
        gfs = "-" if r["gflops_per_s"] is None else f"{r['gflops_per_s']:.0f}"
        rows.append(
            f"{s:<14}{r['median_s']:>10.3f}{r['median_s'] / total:>8.1%}{r['gflop']:>10.0f}{gfs:>10}"
            f"{_fmt_gb(r['start_bytes']):>10}{_fmt_gb(r['peak_bytes']):>10}"
        )
    o = result["other"]["median_s"]
    rows.append(f"{'other':<14}{o:>10.3f}{o / total:>8.1%}")
    t = result["total"]
    gfs = "-" if t["gflops_per_s"] is None else f"{t['gflops_per_s']:.0f}"
    rows.append(
        f"{'total':<14}{total:>10.3f}{1:>8.0%}{t['gflop']:>10.0f}{gfs:>10}{'':>10}{_fmt_gb(t['peak_bytes']):>10}"
    )
    ok = "ok" if result["stages_sum_within_tolerance"] else "EXCEEDS 10%"
    rows.append(f"largest |other|/total over the timed calls: {result['max_residual_fraction']:.1%} ({ok})")
    if result.get("warmup_s"):
        rows.append(f"warm-up calls (s): {', '.join(f'{t:.3f}' for t in result['warmup_s'])}; "
                    f"first-call excess (compilation) {result.get('compile_s', 0):.1f} s")  # fmt: skip
    ev = result.get("cuda_events")
    if ev:
        rows.append(f"CUDA events, uninstrumented: restore {ev['restore_ms']['median']:.2f} ms, "
                    f"forward (prompt encoded, input on device) {ev['forward_ms']['median']:.2f} ms")  # fmt: skip
    return "\n".join([head, *rows])


def plot_sweep(results: dict[str, Any], path: str) -> None:
    """PNG of median time and peak memory against output pixels, one line per dtype/variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = results["runs"].values() if "runs" in results else [results]
    series: dict[str, list[tuple[int, float, float]]] = {}
    for run_ in runs:
        compiled = bool(run_.get("config", {}).get("compile"))
        for r in run_["results"]:
            ms = (
                r["cuda_events"]["forward_ms"]["median"] / 1e3
                if r.get("cuda_events")
                else r["total"]["median_s"]
            )
            label = f"{r['dtype']} {'compiled' if compiled else 'eager'} ({r['device']})"
            series.setdefault(label, []).append((r["size"] ** 2, ms, r["total"]["peak_bytes"] / 1024**3))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, pts in sorted(series.items()):
        pts.sort()
        px = [p[0] / 1e6 for p in pts]
        ax_t.plot(px, [p[1] for p in pts], "o-", label=label)
        ax_m.plot(px, [p[2] for p in pts], "o-", label=label)
    ax_t.set(xlabel="output megapixels", ylabel="seconds per image (median)", xscale="log", yscale="log",
             title="time vs pixels")  # fmt: skip
    ax_m.set(
        xlabel="output megapixels", ylabel="peak memory (GiB)", xscale="log", title="peak memory vs pixels"
    )
    ax_m.set_ylim(bottom=0)  # from 0: the peak includes the weights
    sides = sorted({round((p[0]) ** 0.5) for pts in series.values() for p in pts})
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([v * v / 1e6 for v in sides], [f"{v}²" for v in sides])
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes", nargs="+", default=["512", "1024"],
        help="output sizes (square, multiples of 8), e.g. 512 1024 or 512,1024,2048",
    )  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--max-memory", default=None,
                   help="plan tiles under this budget (GB or 'auto') with the library's planner (docs/memory.md)")  # fmt: skip
    p.add_argument("--release-compat", action="store_true",
                   help="UNet tiles one by one as the release (default: one batch with pooled GroupNorm)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny widths, same structure (smoke test)")
    p.add_argument("--progress", action="store_true", help="print every stage call as it finishes (stderr)")
    p.add_argument(
        "--channels-last", action="store_true", help="UNet, VAE and SFT weights in channels-last layout"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet blocks and the VAE encoder/decoder (compile time reported apart)",
    )
    p.add_argument(
        "--decoder",
        choices=("vae", "tiny"),
        default="vae",
        help="tiny: decode with AutoencoderTiny (random TAESD-shaped weights unless --tiny-decoder)",
    )
    p.add_argument(
        "--tiny-decoder", default=None, help="folder or Hub id of an AutoencoderTiny (with --decoder tiny)"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of time and peak memory vs pixels here")
    p.add_argument("--plot-only", nargs="+", default=None, metavar="JSON",
                   help="only plot saved results, from one or more JSON files (with --plot)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.sizes = [int(v) for item in args.sizes for v in str(item).split(",") if v.strip()]
    except ValueError:
        p.error(f"--sizes: expected integers separated by commas or spaces, got {args.sizes}")
    if args.plot_only and not args.plot:
        p.error("--plot-only needs --plot PNG")
    for s in args.sizes:
        if s <= 0 or s % 8:
            p.error(f"--sizes: {s} is not a positive multiple of 8")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from codsr.hostmem import configure_host_allocator
    from codsr.pipeline import tiling
    from codsr.testing.sd21 import build_sd21_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "codsr restore latency/memory, full-size SD 2.1-base, random weights",
        "machine": machine_info(device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": [],
    }
    for name in args.dtypes:
        if device.type == "cpu" and name == "fp16":
            print("warning: fp16 on the CPU has no fast kernels here; expect it to be slow", file=sys.stderr)
        t0 = time.perf_counter()
        pipe = build_sd21_pipeline(tiny=args.tiny, dtype=DTYPES[name], device=device)
        prepared = prepare_pipeline(pipe, channels_last=args.channels_last, compile=args.compile)
        decoder_kw: dict[str, Any] = {}
        if args.decoder == "tiny":
            decoder_kw["decoder"] = "tiny"
            if args.tiny_decoder:
                pipe.load_tiny_decoder(args.tiny_decoder)
            else:
                from diffusers import AutoencoderTiny

                torch.manual_seed(0)  # random TAESD-shaped weights: the cost, not the picture
                pipe.tiny_decoder = AutoencoderTiny().to(device=device, dtype=DTYPES[name]).eval()
        build_s = time.perf_counter() - t0
        weights = sum(
            p.numel() * p.element_size() for m in (pipe.generator, pipe.text_encoder) for p in m.parameters()
        )
        for size in args.sizes:
            # The plan is built here, once, and passed to every call: the benchmark runs the plan it reports.
            plan = tiling.plan(size, size, device=device, dtype=DTYPES[name], max_memory=args.max_memory,
                               batch=args.batch, release_compat=args.release_compat)  # fmt: skip
            print(f"tile plan for {size}²: {plan.describe()}", flush=True)
            # the CLI's rule: bounded RSS under a budget or when tiled, else reuse (CPU only)
            allocator = configure_host_allocator(budgeted=bool(args.max_memory), tiled=plan.vae_tiled, device=device)
            res = benchmark_pipeline(
                pipe, size, repeats=args.repeats, warmup=args.warmup, count_flops=not args.no_flops,
                batch=args.batch, progress=args.progress, tile_plan=plan, release_compat=args.release_compat,
                **decoder_kw,
            )  # fmt: skip
            res.update({"dtype": name, "device": str(device), "weights_bytes": weights, "build_s": build_s,
                        "memory_plan": plan.as_dict(), "release_compat": args.release_compat,
                        "decoder": args.decoder, "host_allocator": allocator, **prepared})  # fmt: skip
            results["results"].append(res)
            print(format_table(res), flush=True)
            print(flush=True)
        del pipe
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        saved = []
        for path in args.plot_only:
            with open(path, encoding="utf-8") as f:
                saved.append(json.load(f))
        # several files (e.g. sizes run under different budgets): one plot of all their runs
        plot_sweep(saved[0] if len(saved) == 1 else {"runs": dict(zip(args.plot_only, saved, strict=True))}, args.plot)
        print(f"wrote {args.plot}")
        return 0
    try:
        results = run(args)
    except StageMissingError as e:
        print(f"latency.py: error: {e}", file=sys.stderr)
        return 3
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

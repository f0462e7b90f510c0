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

Usage::

    python benchmarks/latency.py --sizes 512 1024 --dtypes fp32 bf16 --device cpu \\
        --repeats 3 --warmup 1 --threads 2 --out results.json
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
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from codsr.hostmem import PeakMemoryMeter  # noqa: E402

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
        (model, "decode", "vae_decode"),
        (stages_module, "tiled_decode", "vae_decode"),
        # release_compat=True runs the release's approximate tiled VAE instead
        (stages_module, "release_tiled_encoder_forward", "vae_encode"),
        (stages_module, "release_tiled_decoder_forward", "vae_decode"),
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
    """Benchmark ``pipe.restore`` on a ``size``² output; returns the JSON-ready summary."""
    if repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {repeats}")
    lq = synthetic_lq(size, batch)
    flops: dict[str, int] | None = None
    for i in range(warmup):
        rec = timed_restore(pipe, lq, prompt, seed=i, count_flops=count_flops and i == 0, **restore_kwargs)
        if count_flops and i == 0:
            flops = {s: r.flops for s, r in rec.stages.items()}
    if count_flops and flops is None:  # no warm-up: count on an extra, untimed call
        rec = timed_restore(pipe, lq, prompt, seed=0, count_flops=True, **restore_kwargs)
        flops = {s: r.flops for s, r in rec.stages.items()}
    calls = [
        timed_restore(pipe, lq, prompt, seed=100 + i, progress=progress, **restore_kwargs)
        for i in range(repeats)
    ]
    summary = summarize(calls, flops)
    summary.update({"size": size, "batch": batch, "repeats": repeats, "warmup": warmup})
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
    return "\n".join([head, *rows])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 1024], help="output sizes (square, multiples of 8)"
    )
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
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for s in args.sizes:
        if s <= 0 or s % 8:
            p.error(f"--sizes: {s} is not a positive multiple of 8")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from codsr.hostmem import limit_heap_fragmentation
    from codsr.pipeline import tiling
    from codsr.testing.sd21 import build_sd21_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.max_memory and device.type == "cpu":
        limit_heap_fragmentation()  # the glibc setting the memory model was measured with, as the CLI does
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
        build_s = time.perf_counter() - t0
        weights = sum(
            p.numel() * p.element_size() for m in (pipe.generator, pipe.text_encoder) for p in m.parameters()
        )
        for size in args.sizes:
            # The plan is built here, once, and passed to every call: the benchmark runs the plan it reports.
            plan = tiling.plan(size, size, device=device, dtype=DTYPES[name], max_memory=args.max_memory,
                               batch=args.batch, release_compat=args.release_compat)  # fmt: skip
            print(f"tile plan for {size}²: {plan.describe()}", flush=True)
            res = benchmark_pipeline(
                pipe, size, repeats=args.repeats, warmup=args.warmup, count_flops=not args.no_flops,
                batch=args.batch, progress=args.progress, tile_plan=plan, release_compat=args.release_compat,
            )  # fmt: skip
            res.update({"dtype": name, "device": str(device), "weights_bytes": weights, "build_s": build_s,
                        "memory_plan": plan.as_dict(), "release_compat": args.release_compat})  # fmt: skip
            results["results"].append(res)
            print(format_table(res), flush=True)
            print(flush=True)
        del pipe
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except StageMissingError as e:
        print(f"latency.py: error: {e}", file=sys.stderr)
        return 3
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: codsr's ``pipe()`` against the authors' release, in ONE run (issue 17).

Both sides load the SAME random weights from disk: an SD 2.1-base-layout diffusers folder
(full-size architecture, or ``--tiny``) and a synthetic ``codsr.pkl`` in the release's format,
both written once by :func:`ensure_weights` (``codsr.testing``). The release runs in its own venv
(``benchmarks/release_env.sh``) as a subprocess, ``benchmarks/release_runner.py``; codsr runs in
this process. Each repeat times one image on every side, alternating (the order is reversed
every other repeat), after one untimed warm-up call per side.

What is timed is the per-image path a user calls, tagging and file I/O excluded: the release's
``test_codsr.py`` loop body (resize rules, ``ToTensor``, ``model(lq, prompt)``, ``ToPILImage``,
colour fix) and codsr's ``pipe(image, upscale=, tags=, prompt=, color_fix=, generator=)``
returning a PIL image. Stages (same names on both sides):

=============== ======================================================================
text_encoding   CLIP on the 77-token prompt
vae_encode      VAE encoder (+ quant_conv), tiled or not
rgpa_sft        RGPA weight map + noising (paper Eq. 1, 3) and the SFT maps (paper Eq. 4)
unet            every UNet call (all tiles)
vae_decode      VAE decoder
color_fix       AdaIN / wavelet colour correction
other           total − stages: resizes, tensor/PIL conversions, noise, tile blending
=============== ======================================================================

The noise is the same on both sides in fp32 on the CPU (the release's global-generator draws
after ``torch.manual_seed(s)`` equal codsr's ``generator=torch.Generator().manual_seed(s)``), so
the warm-up outputs are compared too (``parity``): ours-fp32 vs release-fp32 should agree to
8-bit rounding; bf16 vs fp32 gives the precision cost (PSNR).

Quick check (tiny model, seconds)::

    bash benchmarks/release_env.sh          # once: checkout + venv in benchmarks/.release/
    python benchmarks/release_compare.py --tiny --size 64 --repeats 1

The real measurement (full size, 512², on a quiet machine; ~15 GB RAM, ~10 min)::

    python benchmarks/release_compare.py --size 512 --repeats 6 --threads 2
"""

from __future__ import annotations

import os

# Before torch is imported (here and in the release's subprocess): spinning OpenMP workers make
# a small shared CPU erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
RELEASE_DIR = HERE / ".release"
SCHEMA_VERSION = 1
STAGES: tuple[str, ...] = ("text_encoding", "vae_encode", "rgpa_sft", "unet", "vae_decode", "color_fix")
TAGS = "cat, tabby, whiskers, fur"  # a DAPE-like tag string; the prompt is f"{tags}, {user_prompt},"
# The stage sums must match the end-to-end time within this fraction, or the table says so.
RESIDUAL_TOLERANCE = 0.10


# ============================================================================ accounting (pure)
def median(xs: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(xs)) if xs else float("nan")


def account(total_s: float, stages_s: Mapping[str, float]) -> dict[str, float]:
    """Every stage of :data:`STAGES` (0 when absent) plus ``other`` = total − sum(stages).

    Unknown stage names are an error: they would silently vanish from the table.
    """
    unknown = sorted(set(stages_s) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    out = {s: float(stages_s.get(s, 0.0)) for s in STAGES}
    out["other"] = float(total_s) - sum(out[s] for s in STAGES)
    return out


def summarize(calls: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians over repeated calls, each ``{"total_s": t, "stages": {stage: s}}``.

    ``stages[s]`` and ``other`` are medians of the per-call values (so they need not add up to the
    median total exactly); ``max_residual_fraction`` is the largest per-call ``|other|/total``.
    """
    if not calls:
        raise ValueError("summarize needs at least one call")
    rows = [account(c["total_s"], c["stages"]) for c in calls]
    totals = [float(c["total_s"]) for c in calls]
    stages = {k: median([r[k] for r in rows]) for k in (*STAGES, "other")}
    fractions = [abs(r["other"]) / t for r, t in zip(rows, totals, strict=True) if t > 0]
    return {
        "total_s": median(totals),
        "times_s": totals,
        "stages_s": stages,
        "max_residual_fraction": max(fractions) if fractions else None,
        "n": len(calls),
    }


def ratio_rows(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per side: median total and ``ours/release`` ratios (total and per stage) vs ``baseline``.

    A stage ratio is None where the baseline's stage time is 0 (not measured there).
    """
    if baseline not in summaries:
        raise KeyError(f"baseline {baseline!r} is not among the measured sides {sorted(summaries)}")
    base = summaries[baseline]
    rows = []
    for name, s in summaries.items():
        stage_ratio = {
            k: (s["stages_s"][k] / base["stages_s"][k]) if base["stages_s"][k] > 0 else None
            for k in (*STAGES, "other")
        }
        rows.append({
            "side": name,
            "total_s": s["total_s"],
            "ratio": s["total_s"] / base["total_s"] if base["total_s"] > 0 else None,
            "stage_ratio": stage_ratio,
        })  # fmt: skip
    return rows


def format_tables(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> str:
    """The ratio table (s / image and ours/release) and the per-stage breakdown, as text."""
    rows = ratio_rows(summaries, baseline)
    out = [f"| | s / image | / {baseline} |", "|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        out.append(f"| {r['side']} | {r['total_s']:.3f} | {ratio} |")
    out.append("")
    names = list(summaries)
    out.append("| stage (s, median) | " + " | ".join(names) + " |")
    out.append("|---" * (len(names) + 1) + "|")
    for k in (*STAGES, "other"):
        out.append(f"| {k} | " + " | ".join(f"{summaries[n]['stages_s'][k]:.3f}" for n in names) + " |")
    out.append("| **total** | " + " | ".join(f"**{summaries[n]['total_s']:.3f}**" for n in names) + " |")
    worst = max((s["max_residual_fraction"] or 0.0) for s in summaries.values())
    out.append("")
    out.append(
        f"largest |other|/total over the timed calls: {worst:.1%} "
        f"({'ok' if worst <= RESIDUAL_TOLERANCE else 'large: a stage may be missing from the accounting'})"
    )
    return "\n".join(out)


def image_diff(a: Any, b: Any) -> dict[str, float]:
    """max |a−b|, mean |a−b| (in [0,1] units) and PSNR (dB) of two uint8 H×W×3 images."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64) / 255.0, np.asarray(b, dtype=np.float64) / 255.0
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    d = np.abs(x - y)
    mse = float((d**2).mean())
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)),
    }


# ============================================================================ weights on disk
def _write_tokenizer(folder: Path) -> None:
    """The byte-level CLIP tokenizer as vocab.json/merges.txt (readable by transformers 4.28 and 5)."""
    from codsr.testing.tiny_sd21 import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, byte_level_vocab

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _text_encoder_v4_keys(folder: Path) -> None:
    """Rewrite ``model.safetensors`` with transformers-4 key names (``text_model.`` prefix, position_ids).

    transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; transformers 4.28 (the
    release's pin) would then leave the whole text encoder randomly initialised. transformers 5 reads
    the prefixed names as well (and ignores the buffer).
    """
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(path)
    if all(k.startswith("text_model.") for k in sd):
        return
    sd = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous() for k, v in sd.items()}
    n_pos = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    sd.setdefault("text_model.embeddings.position_ids", torch.arange(n_pos, dtype=torch.long)[None])
    tmp = path.with_suffix(".tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def ensure_weights(folder: Path, tiny: bool, seed: int = 0) -> tuple[Path, Path]:
    """``folder/sd21`` (diffusers layout) and ``folder/codsr.pkl`` (release format), written once.

    ``tiny``: codsr.testing's tiny SD 2.1 (UNet conv_in 320 wide, as the release's SFT needs);
    else the full-size SD 2.1-base architecture with random weights. The checkpoint is
    :func:`codsr.testing.tiny_release_checkpoint` (stage 2: LoRA, alignment LoRA, VAE LoRA, SFT).
    """
    import torch

    from codsr import testing

    base, ckpt_path = folder / "sd21", folder / "codsr.pkl"
    stamp = folder / "READY.json"
    want = {"tiny": tiny, "seed": seed, "format": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return base, ckpt_path
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if tiny:
        comps, ckpt = testing.build_tiny_release(seed=seed)
    else:
        comps = testing.build_sd21_components(dtype=torch.float32, device="cpu", seed=seed)
        ckpt = testing.tiny_release_checkpoint(comps["vae"], comps["unet"], seed=seed + 2)
    testing.save_tiny_model(base, components=comps, overwrite=True)
    _write_tokenizer(base / "tokenizer")
    _text_encoder_v4_keys(base / "text_encoder")
    ckpt.save(ckpt_path, format="release")
    stamp.write_text(json.dumps(want))
    print(f"wrote {'tiny' if tiny else 'full-size'} weights to {folder} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return base, ckpt_path


def synthetic_image(size: int, seed: int = 0):
    """A smooth random RGB image with some edges (RGPA sees texture), uint8 PIL, ``size``²."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, size // 8), max(2, size // 8), 3))
    im = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float64) + rng.normal(0, 6, (size, size, 3))
    arr[size // 3 : size // 3 + max(1, size // 16), :, :] = 240  # a bright bar: strong gradients
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# ============================================================================ the release side
# glibc tunables equal to codsr.hostmem.reuse_freed_memory()'s mallopt calls (M_MMAP_MAX 0, M_TRIM_THRESHOLD)
RELEASE_REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


class ReleaseProcess:
    """The release's per-image server (``release_runner.py``) in the release venv."""

    def __init__(self, release_dir: Path, base: Path, ckpt: Path, *, dtype: str, device: str, threads: int,
                 log: Path, tile_args: Sequence[str] = (), reuse_memory: bool = False) -> None:  # fmt: skip
        python = release_dir / "venv" / "bin" / "python"
        src = release_dir / "src"
        if not python.is_file() or not (src / "codsr.py").is_file():
            raise FileNotFoundError(
                f"the release checkout/venv is missing under {release_dir}: run `bash benchmarks/release_env.sh`"
            )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(_thread_env(threads))
        if reuse_memory:  # the same glibc setting as codsr.hostmem.reuse_freed_memory, from outside
            env["GLIBC_TUNABLES"] = RELEASE_REUSE_TUNABLES
        cmd = [str(python), str(HERE / "release_runner.py"), "--release-src", str(src), "--model", str(base),
               "--ckpt", str(ckpt), "--dtype", dtype, "--device", device, "--threads", str(threads), *tile_args]  # fmt: skip
        self.log = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(src))  # fmt: skip
        self.info = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the release runner exited ({code}); see its log {self.log.name}")
        return json.loads(line)

    def run(self, image_path: Path, *, upscale: int, process_size: int, prompt: str, seed: int,
            color_fix: str, save: Path | None = None) -> dict[str, Any]:  # fmt: skip
        assert self.proc.stdin is not None
        req = {"cmd": "run", "image": str(image_path), "upscale": upscale, "process_size": process_size,
               "prompt": prompt, "seed": seed, "color_fix": color_fix, "save": str(save) if save else None}  # fmt: skip
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "OMP_WAIT_POLICY": "PASSIVE",
    }


# ============================================================================ our side
class _Clock:
    """Per-stage wall time of wrapped callables; a stage called inside another counts once (outer)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def reset(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}
        self.calls = {s: 0 for s in STAGES}

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - t0
                self.calls[stage] += 1
                self._depth -= 1

        return timed


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    had_own = name in vars(obj)
    old = vars(obj)[name] if had_own else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


# (owner, attribute, stage): owners are "pipe", "generator" or a module path; attributes that do not
# exist in the running codsr version are skipped (and listed in the JSON as not found).
OUR_STAGE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("pipe", "encode_prompt", "text_encoding"),
    ("generator", "encode_moments", "vae_encode"),
    ("generator", "noisy_latent", "rgpa_sft"),
    ("generator", "modulation", "rgpa_sft"),
    ("generator", "predict_noise", "unet"),
    ("generator", "decode", "vae_decode"),
    ("codsr.pipeline.pipeline", "tiled_encode_moments", "vae_encode"),
    ("codsr.pipeline.pipeline", "tiled_decode", "vae_decode"),
    ("codsr.pipeline.pipeline", "release_tiled_encoder_forward", "vae_encode"),
    ("codsr.pipeline.pipeline", "release_tiled_decoder_forward", "vae_decode"),
    ("codsr.pipeline.pipeline", "apply_color_fix", "color_fix"),
    ("codsr.pipeline.tiled_stages", "tiled_encode_moments", "vae_encode"),
    ("codsr.pipeline.tiled_stages", "tiled_decode", "vae_decode"),
    ("codsr.pipeline.tiled_stages", "release_tiled_encoder_forward", "vae_encode"),
    ("codsr.pipeline.tiled_stages", "release_tiled_decoder_forward", "vae_decode"),
)


@contextlib.contextmanager
def instrument_pipe(pipe: Any, clock: _Clock, found: list[str]) -> Iterator[None]:
    """Wrap our pipeline's stage callables (instance attributes / module globals) for the block."""
    import importlib

    owners: dict[str, Any] = {"pipe": pipe, "generator": pipe.generator}
    with contextlib.ExitStack() as stack:
        for owner, attr, stage in OUR_STAGE_TARGETS:
            if owner not in owners:
                try:
                    owners[owner] = importlib.import_module(owner)
                except ImportError:
                    owners[owner] = None
            obj = owners[owner]
            if obj is None or not callable(getattr(obj, attr, None)):
                continue
            stack.enter_context(_patched(obj, attr, clock.wrap(stage, getattr(obj, attr))))
            found.append(f"{owner}.{attr}")
        yield


def _process_size_kwargs(pipe: Any, process_size: int, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Make our pipe use the release's ``process_size`` (512 unless a small quick check asks less)."""
    if "process_size" in inspect.signature(pipe.__call__).parameters:
        return {"process_size": process_size}
    if process_size != 512:
        mod = sys.modules[type(pipe).__module__]
        fn = getattr(mod, "release_input_size", None)
        if fn is None:
            raise RuntimeError("cannot set process_size on this codsr version; use --size ≥ 512")
        stack.enter_context(
            _patched(mod, "release_input_size", functools.partial(fn, process_size=process_size))
        )
    return {}


def run_ours(pipe: Any, image: Any, *, upscale: int, process_size: int, tags: str, seed: int, color_fix: str,
             sync: Callable[[], None]) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """One timed ``pipe()`` call; returns ({total_s, stages, calls, wrapped}, PIL output)."""
    import torch

    clock = _Clock(sync)
    clock.reset()
    found: list[str] = []
    with contextlib.ExitStack() as stack:
        kw = _process_size_kwargs(pipe, process_size, stack)
        stack.enter_context(instrument_pipe(pipe, clock, found))
        generator = torch.Generator().manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        out = pipe(image, upscale=upscale, prompt="", tags=tags, color_fix=color_fix, generator=generator,
                   output_type="pil", **kw)  # fmt: skip
        sync()
        total = time.perf_counter() - t0
    return {
        "total_s": total,
        "stages": dict(clock.seconds),
        "calls": dict(clock.calls),
        "wrapped": found,
    }, out


# ============================================================================ the run
DTYPES = ("fp32", "bf16", "fp16")


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_total_bytes"] = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", type=int, default=512, help="output size (square, px; multiple of 8·upscale)")
    p.add_argument("--upscale", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed images per side (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per side first (≥1 for parity)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES, help="codsr's precisions")
    p.add_argument("--release-dtypes", nargs="+", default=["fp32"], choices=DTYPES,
                   help="the release's (fp32 is its CPU path, fp16 its GPU path; bf16 is cast from outside)")  # fmt: skip
    p.add_argument("--fp32-channels-last", action="store_true",
                   help="also time codsr fp32 with channels_last=True (the opt-in fast fp32 path)")  # fmt: skip
    p.add_argument("--unmerged-vae-lora", action="store_true",
                   help="also time codsr fp32 with merge_vae_lora=False (the release's exact VAE-encoder LoRA numerics)")  # fmt: skip
    p.add_argument("--allocator", choices=["reuse", "default"], default="reuse",
                   help="our process's glibc heap on the CPU: 'reuse' (as the codsr CLI and app set it "
                        "without a memory budget: codsr.hostmem.reuse_freed_memory) or glibc's default")  # fmt: skip
    p.add_argument("--release-allocator", choices=["reuse", "default"], default="default",
                   help="the release's: 'default' (as it ships) or 'reuse' (the same setting, given from "
                        "outside through GLIBC_TUNABLES)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model (a test / smoke run)")
    p.add_argument("--color-fix", default="adain", choices=["adain", "wavelet", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--release-dir", type=Path, default=RELEASE_DIR, help="holds src/ and venv/ (release_env.sh)"
    )
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="where the shared random weights are written once (default: <release-dir>/weights-{full,tiny})")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/release_compare_<size>[_tiny].json)")  # fmt: skip
    args = p.parse_args(argv)
    if args.size <= 0 or args.size % (8 * args.upscale):
        p.error(f"--size {args.size} must be a positive multiple of 8·upscale = {8 * args.upscale}")
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    if args.weights_dir is None:
        args.weights_dir = args.release_dir / ("weights-tiny" if args.tiny else "weights-full")
    if args.out is None:
        args.out = HERE / "results" / f"release_compare_{args.size}{'_tiny' if args.tiny else ''}.json"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    for k, v in _thread_env(args.threads).items():
        os.environ.setdefault(k, v)
    device = torch.device(args.device)
    allocator = "default"
    if args.allocator == "reuse":
        from codsr.hostmem import configure_host_allocator
        from codsr.pipeline.tiling import plan
        from codsr.precision import resolve_dtype

        # what the codsr CLI does without --max-memory: reuse for an untiled image, bounded RSS when tiled
        tiled = plan(args.size, args.size, device=device, dtype=resolve_dtype(args.dtypes[0])).vae_tiled
        allocator = configure_host_allocator(budgeted=False, tiled=tiled, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base, ckpt = ensure_weights(args.weights_dir, args.tiny, args.seed)
    process_size = min(512, args.size)  # the release's default 512; smaller only for quick checks
    lq_size = args.size // args.upscale
    work = Path(tempfile.mkdtemp(prefix="codsr_release_compare_"))
    image_path = work / "lq.png"
    synthetic_image(lq_size, args.seed).save(image_path)
    image = Image.open(image_path).convert("RGB")
    image.load()
    prompt = f"{TAGS}, ,"  # the release's f"{tags}, {user_prompt}," with an empty user prompt

    from codsr import CODSRPipeline
    from codsr.precision import resolve_dtype

    sides: dict[str, Any] = {}
    release_info: dict[str, Any] = {}
    releases: list[ReleaseProcess] = []
    try:
        for dt in args.release_dtypes:
            t0 = time.perf_counter()
            rp = ReleaseProcess(args.release_dir, base, ckpt, dtype=dt, device=args.device, threads=args.threads,
                                log=work / f"release_{dt}.log", reuse_memory=args.release_allocator == "reuse")  # fmt: skip
            releases.append(rp)
            sides[f"release {dt}"] = ("release", rp)
            release_info[dt] = {**rp.info, "start_s": time.perf_counter() - t0}
        ours_build: dict[str, float] = {}
        variants = [(f"codsr {dt}", dt, {}) for dt in args.dtypes]
        if args.fp32_channels_last:
            variants.append(("codsr fp32 channels_last", "fp32", {"channels_last": True}))
        if args.unmerged_vae_lora:
            variants.append(("codsr fp32 unmerged_vae_lora", "fp32", {"merge_vae_lora": False}))
        for name, dt, kw in variants:
            t0 = time.perf_counter()
            # tags are passed explicitly to both sides: no tagger (tagger=None, silent).
            pipe = CODSRPipeline.from_pretrained(
                base, checkpoint=ckpt, device=device, torch_dtype=resolve_dtype(dt), tagger=None, **kw
            )
            ours_build[name] = time.perf_counter() - t0
            sides[name] = ("ours", pipe)

        def one(name: str, seed: int, save: Path | None = None) -> tuple[dict[str, Any], Any]:
            kind, obj = sides[name]
            if kind == "release":
                ans = obj.run(image_path, upscale=args.upscale, process_size=process_size, prompt=prompt,
                              seed=seed, color_fix=args.color_fix, save=save)  # fmt: skip
                import numpy as np

                return ans, (np.load(save) if save else None)
            rec, out = run_ours(obj, image, upscale=args.upscale, process_size=process_size, tags=TAGS, seed=seed,
                                color_fix=args.color_fix, sync=sync)  # fmt: skip
            return rec, out

        names = list(sides)
        outputs: dict[str, Any] = {}
        wrapped: list[str] = []
        for w in range(args.warmup):
            for name in names:
                save = work / f"{name.replace(' ', '_')}.npy" if w == 0 else None
                rec, out = one(name, args.seed, save)
                if w == 0:
                    outputs[name] = out
                    wrapped = rec.get("wrapped", wrapped)
                print(
                    f"warm-up {w + 1}/{args.warmup} {name}: {rec['total_s']:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
        calls: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for i in range(args.repeats):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                rec, _ = one(name, args.seed + 1 + i)
                calls[name].append(
                    {"total_s": rec["total_s"], "stages": rec["stages"], "calls": rec["calls"]}
                )
                print(
                    f"repeat {i + 1}/{args.repeats} {name}: {rec['total_s']:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for rp in releases:
            rp.close()

    shutil.rmtree(work, ignore_errors=True)  # kept on failure: it holds the release's log
    summaries = {n: summarize(c) for n, c in calls.items()}
    baseline = next((n for n in names if n.startswith("release")), names[0])
    parity: dict[str, Any] = {}
    if outputs:
        pairs = [(f"codsr {d}", f"release {d}") for d in args.dtypes if f"release {d}" in outputs]
        pairs += [(n, "release fp32") for n, dt, kw in variants if kw and "release fp32" in outputs]
        if "codsr fp32" in outputs:
            pairs += [(n, "codsr fp32") for n, dt, _ in variants if n != "codsr fp32"]
        for a, b in pairs:
            if outputs.get(a) is not None and outputs.get(b) is not None:
                parity[f"{a} vs {b}"] = image_diff(outputs[a], outputs[b])
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "codsr pipe() vs the authors' release per-image forward, same weights, alternating, one run",
        "machine": machine_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "weights": {"base": str(base), "checkpoint": str(ckpt), "tiny": args.tiny},
        "release": {
            "commit": (args.release_dir / "COMMIT").read_text().strip()
            if (args.release_dir / "COMMIT").is_file()
            else None,
            "runners": release_info,
            "allocator": args.release_allocator,
        },  # fmt: skip
        "ours": {"build_s": ours_build, "wrapped": wrapped, "allocator": allocator},
        "baseline": baseline,
        "sides": {n: {**summaries[n], "calls": calls[n]} for n in names},
        "ratios": ratio_rows(summaries, baseline),
        "parity": parity,
        "table": format_tables(summaries, baseline),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(res["table"])
    for k, v in res["parity"].items():
        print(
            f"parity {k}: max |Δ| {v['max_abs']:.4f}, mean |Δ| {v['mean_abs']:.5f}, PSNR {v['psnr_db']:.1f} dB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

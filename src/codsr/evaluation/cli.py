"""``codsr evaluate`` and ``codsr benchmark-sets``: the paper's Table 1 protocol from the shell.

Heavy imports (numpy, PIL, torch, pyiqa, the pipeline) happen inside the ``run`` functions so
that ``codsr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from codsr.precision import PRECISIONS

METRIC_CHOICES = "psnr,ssim,lpips,dists,niqe,musiq,maniqa,clipiqa"

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_METRIC_UNAVAILABLE = 3


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated subset of {METRIC_CHOICES} (default: every metric that can run here: "
        "psnr,ssim without pyiqa; learned metrics need pip install 'codsr[metrics]' and cached weights)",
    )
    p.add_argument(
        "--dataset", default=None, help="dataset label for the Table 1 summary (default: folder name)"
    )
    p.add_argument(
        "--method", default=None, help="method label for the Table 1 summary (default: folder name)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="evaluate only matched pairs instead of failing on files without a partner",
    )
    p.add_argument("--quiet", action="store_true", help="no per-image progress on stderr")


def register(subparsers: Any) -> None:
    """Add ``evaluate`` and ``benchmark-sets`` to the ``codsr`` command line."""
    ev = subparsers.add_parser(
        "evaluate",
        help="score SR outputs with the paper's Table 1 protocol (PSNR/SSIM on Y, pyiqa metrics)",
        description="Score a folder of SR outputs (paired with --gt by file name) with the protocol of "
        "the CODSR paper's Table 1: PSNR/SSIM on the BT.601 Y channel, no border crop, plus "
        "LPIPS, DISTS, NIQE, MUSIQ, MANIQA (pipal), CLIPQA (clipiqa+_vitL14_512) through pyiqa.",
    )
    ev.add_argument("--pred", required=True, help="folder of SR outputs")
    ev.add_argument("--gt", default=None, help="folder of ground truths (omit for no-reference metrics only)")
    ev.add_argument(
        "--out",
        default=None,
        help="folder for per_image.csv, summary.md (Table 1 layout) and evaluation.json",
    )
    ev.add_argument("--seed", type=int, default=None, help="seed that produced the outputs (recorded only)")
    ev.add_argument(
        "--manifest",
        default=None,
        help="run manifest (JSON) to read the seed from (default: benchmark_manifest.json in or beside --pred)",
    )
    _add_eval_options(ev)
    ev.set_defaults(func=run)

    bm = subparsers.add_parser(
        "benchmark-sets",
        help="run CODSR over a paired LQ/GT folder (resumable) and evaluate it",
        description="Restore every image of --lq with CODSR into OUT/images (skipping outputs that "
        "already exist, so an interrupted run can be resumed), then evaluate against --gt into "
        "OUT/metrics. Each image's seed is derived from --seed and its file name.",
    )
    bm.add_argument("--lq", required=True, help="folder of low-quality inputs")
    bm.add_argument("--gt", required=True, help="folder of ground truths (paired by file name)")
    bm.add_argument("--out", required=True, help="output folder (images/, metrics/, benchmark_manifest.json)")
    bm.add_argument("--base-model", required=True, help="SD 2.1-base folder or hub id (diffusers layout)")
    bm.add_argument("--checkpoint", required=True, help="CODSR checkpoint (codsr.pkl or codsr format)")
    bm.add_argument("-s", "--upscale", type=int, default=4, help="upscaling factor (default 4)")
    bm.add_argument("--timestep", type=int, default=100, help="diffusion timestep t (default 100)")
    bm.add_argument("--seed", type=int, default=42, help="base seed (default 42)")
    bm.add_argument("--prompt", default=None, help="user prompt appended to the tags")
    bm.add_argument("--color-fix", default="adain", choices=["adain", "wavelet", "none"])
    bm.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="model dtype (auto: fp16 on CUDA/MPS, fp32 otherwise)",
    )
    bm.add_argument("--overwrite", action="store_true", help="recompute all outputs, replacing the manifest")
    _add_eval_options(bm)
    bm.set_defaults(func=run_benchmark_sets)


def _progress_printer(quiet: bool):
    if quiet:
        return None

    def show(done: int, total: int, item: Any) -> None:
        scores = "; ".join(f"{k.upper()}: {v:.6f}" for k, v in item.scores.items())
        print(f"[{done}/{total}] {item.image} | {scores}", file=sys.stderr, flush=True)

    return show


def _fail(command: str, exc: BaseException, code: int) -> int:
    print(f"codsr {command}: error: {exc}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """``codsr evaluate``."""
    from codsr.evaluation.evaluate import evaluate_dirs
    from codsr.evaluation.pairing import PairingError
    from codsr.evaluation.pyiqa_backend import MetricsUnavailableError
    from codsr.evaluation.report import table1_markdown

    try:
        result = evaluate_dirs(
            args.pred,
            args.gt,
            metrics=args.metrics,
            out_dir=args.out,
            dataset=args.dataset,
            method=args.method,
            device=args.device,
            seed=args.seed,
            manifest=args.manifest,
            allow_unpaired=args.allow_unpaired,
            progress=_progress_printer(args.quiet),
            command=["codsr", *sys.argv[1:]],
        )
    except MetricsUnavailableError as exc:
        return _fail("evaluate", exc, EXIT_METRIC_UNAVAILABLE)
    except (PairingError, ValueError, FileNotFoundError, OSError) as exc:
        return _fail("evaluate", exc, EXIT_BAD_INPUT)
    print(table1_markdown([result]), end="")
    if args.out:
        print(f"wrote per_image.csv, summary.md, evaluation.json to {args.out}", file=sys.stderr)
    return EXIT_OK


def run_benchmark_sets(args: argparse.Namespace) -> int:
    """``codsr benchmark-sets``."""
    from pathlib import Path

    import torch

    from codsr.evaluation.benchmark import ResumeMismatchError, make_pipeline_restorer, run_benchmark
    from codsr.evaluation.pairing import PairingError
    from codsr.evaluation.pyiqa_backend import MetricsUnavailableError, sha256_file
    from codsr.evaluation.report import table1_markdown
    from codsr.precision import resolve_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    ckpt = Path(args.checkpoint)
    config = {
        "base_model": args.base_model,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha256_file(ckpt) if ckpt.is_file() else None,
        "upscale": args.upscale,
        "timestep": args.timestep,
        "prompt": args.prompt,
        "color_fix": args.color_fix,
        "dtype": str(dtype).replace("torch.", ""),
    }
    try:
        from codsr import CODSRPipeline

        pipe = CODSRPipeline.from_pretrained(
            base_model=args.base_model, checkpoint=args.checkpoint, device=device, torch_dtype=dtype
        )
    except (FileNotFoundError, OSError, ValueError) as exc:
        return _fail("benchmark-sets", exc, EXIT_BAD_INPUT)
    restore = make_pipeline_restorer(
        pipe, upscale=args.upscale, timestep=args.timestep, prompt=args.prompt, color_fix=args.color_fix
    )

    def show(done: int, total: int, name: str, skipped: bool) -> None:
        if not args.quiet:
            print(
                f"[{done}/{total}] {name}{' (exists, skipped)' if skipped else ''}",
                file=sys.stderr,
                flush=True,
            )

    try:
        summary, result = run_benchmark(
            args.lq,
            args.gt,
            args.out,
            restore,
            seed=args.seed,
            config=config,
            metrics=args.metrics,
            dataset=args.dataset,
            method=args.method or "CODSR",
            device=device,
            overwrite=args.overwrite,
            allow_unpaired=args.allow_unpaired,
            progress=show,
            command=["codsr", *sys.argv[1:]],
        )
    except MetricsUnavailableError as exc:
        return _fail("benchmark-sets", exc, EXIT_METRIC_UNAVAILABLE)
    except (ResumeMismatchError, PairingError, ValueError, FileNotFoundError, OSError) as exc:
        return _fail("benchmark-sets", exc, EXIT_BAD_INPUT)
    print(table1_markdown([result]), end="")
    print(
        f"{len(summary.written)} image(s) restored, {len(summary.skipped)} skipped (already done); "
        f"reports in {Path(args.out) / 'metrics'}",
        file=sys.stderr,
    )
    return EXIT_OK

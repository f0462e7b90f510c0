"""One tiled stage of CODSR on the full-size SD 2.1-base architecture, timed alone.

Where ``benchmarks/latency.py`` times whole ``restore`` calls, this times one stage under a given
tiling, so a change to the exact tiled VAE or the UNet tiles can be measured in a minute or two:

=========== ===============================================================================
decode      the exact tiled VAE decoder (``vae_tiling.tiled_decode``) on a random latent
            (``--latent`` px), ``--tile`` latent px, ``--offload``; ``--tile 0`` = untiled
encode      the exact tiled VAE encoder (``vae_tiling.tiled_encode_moments``) on a random
            image of ``8·--latent`` px, ``--tile`` latent px (×8 image px); ``--tile 0`` = untiled
unet        the UNet's noise prediction of ``tiled_stages`` with ``TilePlan(latent_tile=--tile,
            latent_overlap=--overlap)``, tiles batched and ``--sequential`` one by one
=========== ===============================================================================

Reported per call: seconds, minor page faults (``getrusage``: fresh memory the kernel had to map)
and the peak RSS above the RSS at the start of the call (VmHWM, reset before it). Weights are random
(``codsr.testing.sd21``); the heap follows the CLI's rule for a tiled plan
(``configure_host_allocator``), or ``--allocator reuse``.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tiled_stages.py decode --latent 128 --tile 48 \\
        --offload disk --threads 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/tiled_stages.py unet --latent 96 --tile 64 --overlap 21 \\
        --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], Any]) -> dict[str, float]:
    """One call of ``fn``: seconds, minor page faults, peak RSS above the start (bytes)."""
    from codsr.hostmem import PeakMemoryMeter

    meter = PeakMemoryMeter(torch.device("cpu"))
    start = meter.reset()
    f0, t0 = _faults(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "page_faults": _faults() - f0, "peak_above_start_bytes": meter.peak() - start}


def stage_calls(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The calls to time, by name, on a random full-size (or ``--tiny``) model."""
    from codsr.pipeline.tiled_stages import tiled_stages
    from codsr.pipeline.tiling import TilePlan
    from codsr.pipeline.vae_tiling import tiled_decode, tiled_encode_moments
    from codsr.testing.sd21 import build_sd21_pipeline

    dtype = DTYPES[args.dtype]
    pipe = build_sd21_pipeline(tiny=args.tiny, dtype=dtype)
    model, vae = pipe.generator, pipe.generator.vae
    g = torch.Generator().manual_seed(0)
    lat, tile = args.latent, args.tile
    offload = None if args.offload == "none" else args.offload
    if args.stage == "decode":
        z = torch.randn(1, vae.config.latent_channels, lat, lat, generator=g).to(dtype)
        if tile:
            return {"tiled": lambda: tiled_decode(vae, z, tile, offload=offload)}
        return {"untiled": lambda: vae.decode(z, return_dict=False)[0]}
    if args.stage == "encode":
        x = (torch.rand(1, 3, 8 * lat, 8 * lat, generator=g) * 2 - 1).to(dtype)
        if tile:
            return {"tiled": lambda: tiled_encode_moments(vae, x, 8 * tile, offload=offload)}
        return {"untiled": lambda: model.encode_moments(x)}
    c = model.unet.config.block_out_channels[0]
    z_t = torch.randn(1, 4, lat, lat, generator=g)
    scale, shift = (0.1 * torch.randn(1, c, lat, lat, generator=g) for _ in range(2))
    emb = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([499])
    plan = TilePlan(latent_tile=tile or max(lat, 1), latent_overlap=args.overlap, offload=offload)
    modes = {"batched": plan}
    if args.sequential:
        modes["sequential"] = TilePlan(**{**plan.as_dict(), "sequential_unet": True})
    return {
        name: (lambda p=p: tiled_stages(model, p).predict_noise(z_t, t, emb, scale, shift)) for name, p in modes.items()
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("decode", "encode", "unet"))
    p.add_argument("--latent", type=int, default=128, help="latent side in px (image side / 8)")
    p.add_argument("--tile", type=int, default=48, help="tile side in latent px; 0 = untiled")
    p.add_argument("--overlap", type=int, default=16, help="UNet tile overlap in latent px")
    p.add_argument("--offload", choices=("none", "cpu", "disk"), default="none", help="where idle tiles wait")
    p.add_argument("--sequential", action="store_true", help="unet: also time the tiles one by one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allocator", choices=("tiled", "reuse"), default="tiled",
                   help="glibc heap: the CLI's rule for tiled plans (bounded RSS) or reuse")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny widths, same structure (smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.latent < 1 or args.tile < 0 or args.overlap < 0:
        p.error("--latent must be ≥ 1, --tile and --overlap ≥ 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from codsr.hostmem import configure_host_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = configure_host_allocator(budgeted=args.allocator == "tiled", tiled=args.allocator == "tiled")
    results: dict[str, Any] = {"config": vars(args), "host_allocator": allocator, "calls": {}}
    with torch.inference_mode():
        for name, fn in stage_calls(args).items():
            res = measure(fn)
            results["calls"][name] = res
            print(f"{args.stage} {name}: {res['seconds']:.2f} s, {res['page_faults']} page faults, "
                  f"peak +{res['peak_above_start_bytes'] / 1024**3:.2f} GiB", flush=True)  # fmt: skip
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

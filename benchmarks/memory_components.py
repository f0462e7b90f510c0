"""Peak memory of single inference components on the full-size SD 2.1-base (random weights).

Measures what ``codsr.pipeline.tiling.MemoryModel`` is fitted to, one component at a time, in
one process (the peak is reset between measurements): the VAE encoder / decoder untiled, tiled
with tiles on the device, or tiled with idle tiles offloaded; the UNet on one tile or on a batch
of tiles with pooled GroupNorm statistics (the pipeline's default tiled path). Each line of output
is a JSON record; ``delta_bytes`` is the peak above the memory in use when the component started.

Specs (positional): ``enc:SIZE[:TILE[:OFFLOAD]]``, ``dec:SIZE[:TILE[:OFFLOAD]]`` (SIZE, TILE in
image px; ``-`` = untiled / no offload), ``mid:SIZE`` (the VAE's untiled latent-resolution mid-block for a SIZE² image), ``unet:TILE[xN]``
(latent px, N tiles in one batch).

    nice -n 10 python benchmarks/memory_components.py --dtype bf16 enc:1024 dec:1024:512:disk unet:150 unet:64x4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import torch  # noqa: E402

from codsr.hostmem import PeakMemoryMeter, limit_heap_fragmentation  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _opt(parts: list[str], i: int) -> str | None:
    return parts[i] if len(parts) > i and parts[i] != "-" else None


def measure(
    spec: str, modules: dict, dtype: torch.dtype, device: torch.device, meter: PeakMemoryMeter
) -> dict:
    from codsr.model.lqfm import conv_in_modulation
    from codsr.pipeline.latent_tiling import pooled_group_norm
    from codsr.pipeline.vae_tiling import tiled_decode, tiled_encode_moments

    parts = spec.split(":")
    kind = parts[0]
    g = torch.Generator().manual_seed(0)
    rec: dict = {"spec": spec, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    with torch.no_grad():
        if kind in ("enc", "dec"):
            vae = modules["vae"]
            size = int(parts[1])
            tile = _opt(parts, 2)
            offload = _opt(parts, 3)
            if kind == "enc":
                x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
            else:
                x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
            start = meter.reset()
            t0 = time.perf_counter()
            if kind == "enc":
                y = (
                    vae.quant_conv(vae.encoder(x))
                    if tile is None
                    else tiled_encode_moments(vae, x, int(tile), offload=offload)
                )
            else:
                y = (
                    vae.decode(x).sample
                    if tile is None
                    else tiled_decode(vae, x, int(tile) // 8, offload=offload)
                )
            rec.update(size=size, tile=None if tile is None else int(tile), offload=offload)
        elif kind == "mid":
            # The decoder's latent-resolution part (conv_in + mid-block with global attention),
            # which is never tiled; the encoder's mid-block has the same layout.
            vae = modules["vae"]
            size = int(parts[1])
            x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
            start = meter.reset()
            t0 = time.perf_counter()
            y = vae.decoder.mid_block(vae.decoder.conv_in(vae.post_quant_conv(x)), None)
            rec.update(size=size)
        elif kind == "unet":
            unet = modules["unet"]
            tile_s, _, n_s = parts[1].partition("x")
            t, n = int(tile_s), int(n_s or 1)
            z = torch.randn(n, 4, t, t, generator=g).to(device, dtype)
            scale = (0.1 * torch.randn(n, 320, t, t, generator=g)).to(device, dtype)
            emb = (
                torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
                .to(device, dtype)
                .expand(n, -1, -1)
            )
            steps = torch.full((n,), 100, device=device)
            start = meter.reset()
            t0 = time.perf_counter()
            with conv_in_modulation(unet, scale, scale):
                if n > 1:
                    with pooled_group_norm(unet, torch.ones(n, 1, t, t), 1):
                        y = unet(z, steps, encoder_hidden_states=emb, return_dict=False)[0]
                else:
                    y = unet(z, steps, encoder_hidden_states=emb, return_dict=False)[0]
            rec.update(tile=t, tiles=n)
        else:
            raise SystemExit(f"unknown component spec {spec!r}: use enc:..., dec:... or unet:...")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        peak = meter.peak()
        del y
    rec.update(start_bytes=start, peak_bytes=peak, delta_bytes=peak - start)
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    from codsr.testing.sd21 import empty_sd21_modules, materialize_random

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append JSON lines here too")
    p.add_argument("--glibc-default-heap", action="store_true",
                   help="keep glibc's dynamic mmap threshold (budgeted runs fix it at 1 MiB, as measured by default)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.glibc_default_heap:
        limit_heap_fragmentation()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    wanted = {"unet" if s.split(":")[0] == "unet" else "vae" for s in args.specs}
    mods = empty_sd21_modules()
    modules = {}
    gen = torch.Generator().manual_seed(0)
    for name in sorted(wanted):
        modules[name] = materialize_random(mods[name], dtype, device, gen).to(device).eval()
    del mods
    meter = PeakMemoryMeter(device)
    for spec in args.specs:
        rec = measure(spec, modules, dtype, device, meter)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

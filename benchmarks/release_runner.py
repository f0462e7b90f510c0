"""Runs the authors' CODSR release (``CODSR_test`` in its ``codsr.py``) as a timed per-image server.

This file runs INSIDE the release's own virtual environment (``benchmarks/release_env.sh``), with
the release checkout on ``sys.path``; it imports nothing from codsr. ``release_compare.py`` starts
it as a subprocess and sends one JSON request per line on stdin; each answer is one JSON line on
the protocol stream (the process's original stdout; everything the release prints goes to stderr).

Nothing of the release is edited or copied. What is patched from outside, and why:

* CUDA device strings → the requested device (``--device cpu``): ``CODSR_test.__init__`` hard-codes
  ``"cuda"`` (``torch.load(map_location="cuda")``, ``.to("cuda")``, ``torch.tensor(device="cuda")``,
  ``.cuda()``, ``set_timesteps(device="cuda")``). ``torch.load``, ``Tensor.to/.cuda``,
  ``Module.to/.cuda`` and the ``device=`` argument of torch's tensor factories are wrapped to map
  them *while the model is built only*; the timed forward runs on unpatched torch.
  ``my_utils.devices.device`` (its tiled VAE's device) is set to the same device.
* Random draws: the release draws its two Gaussian tensors (posterior sample, RGPA noise) from
  torch's global generator without a seed; ``torch.manual_seed(seed)`` before each image makes
  them the same draws as codsr's ``generator=torch.Generator().manual_seed(seed)`` (float32, CPU).
* ``torchvision``: only its colour fix needs it (``ToTensor``/``ToPILImage``); if the venv's torch
  has no working torchvision (``RELEASE_TORCH=torch==2.13.0``), a two-class stand-in with
  torchvision's semantics is installed in ``sys.modules`` (noted in the answer's ``notes``).

The per-image path timed is that of the release's ``test_codsr.py`` loop without tagging and file
I/O: the resize rules, ``ToTensor``, ``lq*2-1``, ``model(lq, prompt)``, ``ToPILImage``, the colour
fix. Stages are timed by wrapping the model's sub-modules on the instance:

=============== ==========================================================
text_encoding   ``model.encode_prompt``
vae_encode      ``model.vae.encode`` (its tiled-VAE hook included)
rgpa_sft        ``model.sft``, ``model.sobel_layer``, ``model.GraygradToWeight_Patchwise_Sobel``
unet            ``model.unet`` forward (every tile)
vae_decode      ``model.vae.decode``
color_fix       ``adain_color_fix`` / ``wavelet_color_fix``
other           total − stages (resizes, tensor/PIL conversions, noise, tile blending)
=============== ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import sys
import time
import types
from typing import Any

STAGES = ("text_encoding", "vae_encode", "rgpa_sft", "unet", "vae_decode", "color_fix")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _protocol_stream():
    """The original stdout for answers; fd 1 and ``sys.stdout`` then point at stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


# ---------------------------------------------------------------------------------------- patches
def _device_mapper(target: str):
    import torch

    def map_device(d: Any) -> Any:
        if isinstance(d, str) and d.startswith("cuda"):
            return target
        if isinstance(d, torch.device) and d.type == "cuda":
            return torch.device(target)
        return d

    return map_device


@contextlib.contextmanager
def cuda_strings_to(target: str):
    """Map "cuda" device arguments to ``target`` in the calls ``CODSR_test.__init__`` makes."""
    import torch

    if target.startswith("cuda"):
        yield
        return
    md = _device_mapper(target)
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, new: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    def with_device_kw(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = md(kwargs["device"])
            return fn(*args, **kwargs)

        return wrapped

    def to_mapped(fn):
        @functools.wraps(fn)
        def wrapped(self, *args, **kwargs):
            args = tuple(md(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = md(kwargs["device"])
            return fn(self, *args, **kwargs)

        return wrapped

    orig_load = torch.load

    def load(*args, **kwargs):
        kwargs["map_location"] = target
        return orig_load(*args, **kwargs)

    patch(torch, "load", load)
    patch(torch.Tensor, "to", to_mapped(torch.Tensor.to))
    patch(torch.Tensor, "cuda", lambda self, *a, **k: self.to(target))
    patch(torch.nn.Module, "to", to_mapped(torch.nn.Module.to))
    patch(torch.nn.Module, "cuda", lambda self, *a, **k: self.to(target))
    for name in (
        "tensor",
        "as_tensor",
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "randn",
        "rand",
        "linspace",
    ):
        patch(torch, name, with_device_kw(getattr(torch, name)))
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def _install_torchvision_standin() -> bool:
    """If torchvision cannot be imported, provide ``torchvision.transforms.{ToTensor, ToPILImage}``.

    Semantics as torchvision's: ``ToTensor`` maps an RGB PIL image to a float C×H×W tensor / 255;
    ``ToPILImage`` maps a float C×H×W tensor by ``mul(255).byte()`` (truncation) to an RGB image.
    """
    try:
        import torchvision.transforms  # noqa: F401

        return False
    except Exception:  # noqa: BLE001 - absent, or a CUDA build that fails to register its ops
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    import numpy as np
    import torch
    from PIL import Image

    class ToTensor:
        def __call__(self, pic):
            arr = np.array(pic, dtype=np.uint8, copy=True)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)

    class ToPILImage:
        def __call__(self, pic):
            if pic.is_floating_point():
                pic = pic.mul(255).byte()
            return Image.fromarray(pic.permute(1, 2, 0).contiguous().numpy(), mode="RGB")

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tr.ToTensor, tr.ToPILImage = ToTensor, ToPILImage
    tv.transforms = tr
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr
    return True


# ---------------------------------------------------------------------------------------- timing
class Clock:
    """Sums the wall time of wrapped callables per stage; nested stage calls count once (outer)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.seconds = {s: 0.0 for s in STAGES}
        self.calls = {s: 0 for s in STAGES}
        self._depth = 0

    def reset(self) -> None:
        for s in STAGES:
            self.seconds[s], self.calls[s] = 0.0, 0

    def wrap(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
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


# ---------------------------------------------------------------------------------------- the model
def build(args: argparse.Namespace):
    import torch

    sys.path.insert(0, args.release_src)
    os.chdir(args.release_src)  # its codsr.py appends os.getcwd() to sys.path
    notes: list[str] = []
    if _install_torchvision_standin():
        notes.append("torchvision unavailable in the release venv: ToTensor/ToPILImage stand-in used")
    # the release's own modules (its checkout is first on sys.path; codsr here is ITS codsr.py)
    rdevices = importlib.import_module("my_utils.devices")
    rdevices.device = torch.device(args.device)
    rcolor = importlib.import_module("my_utils.wavelet_color_fix")
    CODSR_test = importlib.import_module("codsr").CODSR_test  # noqa: N806

    rargs = argparse.Namespace(
        pretrained_model_name_or_path=args.model,
        codsr_path=args.ckpt,
        mixed_precision="fp16" if args.dtype == "fp16" else "fp32",
        vae_encoder_tiled_size=args.vae_encoder_tiled_size,
        vae_decoder_tiled_size=args.vae_decoder_tiled_size,
        latent_tiled_size=args.latent_tiled_size,
        latent_tiled_overlap=args.latent_tiled_overlap,
    )
    with cuda_strings_to(args.device):
        model = CODSR_test(rargs)
    model.eval()
    if args.dtype == "bf16":  # not a release option: its weights cast as its fp16 mode casts them
        dt = torch.bfloat16
        model.weight_dtype = dt
        for m in (model.unet, model.vae, model.text_encoder, model.sft, model.sobel_layer):
            m.to(dt)
        notes.append("bf16 is not a release option: its modules were cast to bfloat16 from outside")
    return model, rcolor, notes


def instrument(model, rcolor, clock: Clock) -> dict[str, Any]:
    """Wrap the release's stage callables on their instances; returns the colour-fix functions."""
    model.encode_prompt = clock.wrap("text_encoding", model.encode_prompt)
    model.vae.encode = clock.wrap("vae_encode", model.vae.encode)
    model.vae.decode = clock.wrap("vae_decode", model.vae.decode)
    model.unet.forward = clock.wrap("unet", model.unet.forward)
    model.sft.forward = clock.wrap("rgpa_sft", model.sft.forward)
    model.sobel_layer.forward = clock.wrap("rgpa_sft", model.sobel_layer.forward)
    model.GraygradToWeight_Patchwise_Sobel = clock.wrap("rgpa_sft", model.GraygradToWeight_Patchwise_Sobel)
    return {
        "adain": clock.wrap("color_fix", rcolor.adain_color_fix),
        "wavelet": clock.wrap("color_fix", rcolor.wavelet_color_fix),
    }


def per_image(
    model, fixes: dict[str, Any], image, upscale: int, process_size: int, prompt: str, color_fix: str
):
    """The release's per-image steps (test_codsr.py's loop body without tagging and file I/O)."""
    import torch
    from PIL import Image
    from torchvision import transforms

    w0, h0 = image.size
    resize_flag = False
    if w0 < process_size // upscale or h0 < process_size // upscale:
        s = (process_size // upscale) / min(w0, h0)
        image = image.resize((int(s * w0), int(s * h0)))
        resize_flag = True
    image = image.resize((image.size[0] * upscale, image.size[1] * upscale))
    image = image.resize((image.width - image.width % 8, image.height - image.height % 8), Image.LANCZOS)
    lq = transforms.ToTensor()(image).unsqueeze(0).to(model.device)
    with torch.no_grad():
        lq = lq * 2 - 1
        out = model(lq, prompt=prompt)
        out_pil = transforms.ToPILImage()(out[0].cpu() * 0.5 + 0.5)
        if color_fix in fixes:
            out_pil = fixes[color_fix](target=out_pil, source=image)
        if resize_flag:  # the release computes this resize and discards it; so do we
            out_pil.resize((int(upscale * w0), int(upscale * h0)))
    return out_pil


def serve(args: argparse.Namespace, proto) -> None:
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, rcolor, notes = build(args)
    build_s = time.perf_counter() - t0
    dev = torch.device(args.device)
    clock = Clock((lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None))
    fixes = instrument(model, rcolor, clock)
    import diffusers
    import peft
    import transformers

    info = {
        "ready": True, "build_s": build_s, "notes": notes, "device": str(dev), "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }  # fmt: skip
    proto.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        image = Image.open(req["image"]).convert("RGB")
        image.load()  # file I/O done before the clock starts
        clock.reset()
        torch.manual_seed(int(req["seed"]))
        clock.sync()
        t0 = time.perf_counter()
        out = per_image(model, fixes, image, int(req["upscale"]), int(req["process_size"]), req["prompt"],
                        req.get("color_fix", "adain"))  # fmt: skip
        clock.sync()
        total = time.perf_counter() - t0
        ans: dict[str, Any] = {"total_s": total, "stages": dict(clock.seconds), "calls": dict(clock.calls),
                               "size": list(out.size)}  # fmt: skip
        if req.get("save"):
            np.save(req["save"], np.asarray(out))
        proto.write(json.dumps(ans) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release-src", required=True, help="the release checkout (benchmarks/.release/src)")
    p.add_argument("--model", required=True, help="SD 2.1-base diffusers folder")
    p.add_argument("--ckpt", required=True, help="codsr.pkl in the release format")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    # test_codsr.py's defaults
    p.add_argument("--vae-encoder-tiled-size", type=int, default=1024)
    p.add_argument("--vae-decoder-tiled-size", type=int, default=224)
    p.add_argument("--latent-tiled-size", type=int, default=150)
    p.add_argument("--latent-tiled-overlap", type=int, default=50)
    args = p.parse_args(argv)
    args.release_src = os.path.abspath(args.release_src)
    args.model, args.ckpt = os.path.abspath(args.model), os.path.abspath(args.ckpt)
    proto = _protocol_stream()
    serve(args, proto)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tiny CPU demonstration that CODSR stage-1 training learns (docs/training.md, "Evidence").

    python scripts/tiny_stage1_demo.py --hr tests/fixtures/drealsr/test_HR tests/fixtures/real_lq \
        --benchmark tests/fixtures/drealsr --out runs/tiny_demo

1. builds a tiny random SD-2.1-like model (``codsr make-tiny-model``);
2. pre-trains its VAE as an autoencoder on the HR images (``configs/tiny/vae.yaml``): stage 1
   freezes the decoder, and a random decoder would make every output noise;
3. trains CODSR stage 1 (``configs/tiny/stage1.yaml``: Real-ESRGAN LQ, t ~ U{50..250}, RGPA,
   LQFM, LoRA on VAE encoder + UNet, MSE loss) on the same HR images;
4. evaluates held-out DRealSR ×4 pairs at the tiny model's scale: the centre 128² of each HQ image
   and the matching centre 32² of its LQ image, bicubic-upsampled ×4 (the pipeline's resize), then
   Y-PSNR (BT.601, docs/method.md#evaluation) of the one-step output at t = 100, at step 0, during training and at
   the end (the final number through ``CODSRPipeline`` loading the release-format ``.pkl``).
   References: bicubic; the pre-trained tiny VAE's reconstruction of the HQ crop (roughly what the
   frozen decoder reaches with the pre-trained encoder) and of the bicubic input (an "identity"
   generator that only passes its input latent through). A second set uses the same HQ crops
   with synthetic Real-ESRGAN LQ (the training degradation, fixed seed).

Writes ``results.json``, ``results.md``, ``loss_curve.csv``/``.png`` and sample grids to ``--out``.
Everything runs on the CPU; ``--vae-steps``/``--stage1-steps`` trade time for quality.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from codsr.imageio import IMAGE_EXTENSIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--hr",
        required=True,
        nargs="+",
        help="folder(s) of HR training images (files with '_LR' in the name are skipped)",
    )
    p.add_argument("--benchmark", required=True, help="folder with test_LR/ and test_HR/ (DRealSR ×4 layout)")
    p.add_argument("--out", default="runs/tiny_demo", help="output folder")
    p.add_argument("--vae-steps", type=int, default=None, help="default: max_steps of configs/tiny/vae.yaml (600)")
    p.add_argument(
        "--stage1-steps", type=int, default=None, help="default: max_steps of configs/tiny/stage1.yaml (400)"
    )
    p.add_argument("--eval-every", type=int, default=100, help="evaluate during stage 1 every N steps")
    p.add_argument("--crop", type=int, default=128, help="HQ crop side for training and evaluation")
    p.add_argument("--max-eval", type=int, default=0, help="use only the first N benchmark pairs (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data
def training_list(hr_roots: list[Path], out: Path) -> Path:
    files = sorted(
        p
        for root in hr_roots
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and "_LR" not in p.stem
    )
    if not files:
        raise SystemExit(f"no HR images under {', '.join(map(str, hr_roots))}")
    path = out / "train_hq.txt"
    path.write_text("".join(f"{p.resolve()}\n" for p in files), encoding="utf-8")
    return path


def load_m11(path: Path) -> torch.Tensor:
    from codsr.data.datasets import load_image

    return torch.from_numpy(load_image(path)).permute(2, 0, 1).float().div(127.5).sub(1)[None]


def center(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def benchmark_pairs(root: Path, crop: int, limit: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, bicubic-upsampled LQ, HQ) centre crops in [-1, 1]."""
    hq_dir, lq_dir = root / "test_HR", root / "test_LR"
    pairs = []
    for hq_path in sorted(hq_dir.iterdir()):
        lq_path = lq_dir / hq_path.name
        if not lq_path.is_file():
            continue
        hq, lq = load_m11(hq_path), load_m11(lq_path)
        scale = hq.shape[-1] // lq.shape[-1]
        lq_c = center(lq, crop // scale)
        up = F.interpolate((lq_c + 1) / 2, scale_factor=scale, mode="bicubic", align_corners=False)
        pairs.append((hq_path.stem, up.clamp(0, 1) * 2 - 1, center(hq, crop)))
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise SystemExit(f"no LR/HR pairs in {root}")
    return pairs


def synthetic_pairs(pairs, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The same HQ crops with Real-ESRGAN LQ (training degradation), resized back bicubically."""
    from codsr.data.degradation import degrade, resize_back

    out = []
    for i, (name, _, hq) in enumerate(pairs):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        small = degrade((hq + 1) / 2, g)
        out.append((name, resize_back(small, tuple(hq.shape[-2:]), "bicubic") * 2 - 1, hq))
    return out


# ----------------------------------------------------------------------------------- metrics
def psnr_y(pred: torch.Tensor, target: torch.Tensor) -> float:
    from codsr.training.stage1 import psnr_y_batch

    return psnr_y_batch(pred, target)[0]


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    moments = vae.quant_conv(vae.encoder(x))
    return vae.decoder(vae.post_quant_conv(moments.chunk(2, dim=1)[0])).clamp(-1, 1)


def evaluate(restore, sets) -> dict[str, float]:
    scores = {}
    for set_name, pairs in sets.items():
        vals = [psnr_y(restore(lq, i), hq) for i, (_, lq, hq) in enumerate(pairs)]
        scores[set_name] = float(np.mean(vals))
    return scores


# ----------------------------------------------------------------------------------- plots
def plot_curve(points: list[tuple[int, float]], path: Path, title: str) -> None:
    """A minimal line chart with PIL (no matplotlib needed)."""
    w, h, m = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1e-6

    def pos(x, y):
        return m + (x - x0) / max(1, x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    d.rectangle([m, m, w - m, h - m], outline="black")
    d.line([pos(x, y) for x, y in points], fill=(235, 170, 170), width=1)
    k = max(1, len(points) // 6)  # running mean over k logged points
    smooth = [(points[i][0], float(np.mean(ys[max(0, i - k + 1) : i + 1]))) for i in range(len(points))]
    d.line([pos(x, y) for x, y in smooth[k - 1 :]], fill=(200, 30, 30), width=2)
    d.text((m, 15), title, fill="black")
    d.text((m, h - m + 8), f"step {x0}", fill="black")
    d.text((w - m - 60, h - m + 8), f"step {x1}", fill="black")
    d.text((5, m - 12), f"{y1:.4f}", fill="black")
    d.text((5, h - m), f"{y0:.4f}", fill="black")
    img.save(path)


def save_grid(rows: list[list[torch.Tensor]], path: Path) -> None:
    grid = torch.cat([torch.cat(r, dim=-1) for r in rows], dim=-2)[0]
    Image.fromarray(((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from codsr.model.base import load_base_components
    from codsr.pipeline.pipeline import CODSRPipeline
    from codsr.testing.tiny_sd21 import save_tiny_model
    from codsr.training.config import load_config
    from codsr.training.stage1 import Stage1Trainer
    from codsr.training.trainer_utils import read_metrics
    from codsr.training.vae_pretrain import VAEPretrainTrainer

    # the step counts of the shipped tiny configs unless asked otherwise (docs/training.md)
    if args.vae_steps is None:
        args.vae_steps = load_config("tiny/vae").max_steps
    if args.stage1_steps is None:
        args.stage1_steps = load_config("tiny/stage1").max_steps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.time()
    train_list = training_list([Path(h) for h in args.hr], out)
    n_train = len(train_list.read_text().splitlines())
    base = out / "base"
    if not (base / "model_index.json").is_file():
        save_tiny_model(base, seed=args.seed, overwrite=True)

    # --- 1. VAE pre-training (tiny recipe only) ------------------------------------------
    t0 = time.time()
    vae_cfg = load_config("tiny/vae", [
        f"model.base_model={base}", f"data.train_hq={train_list}", f"output_dir={out / 'vae'}",
        f"max_steps={args.vae_steps}", f"checkpoint.every={args.vae_steps}", f"seed={args.seed}",
        "logging.progress_bar=false",
    ])  # fmt: skip
    VAEPretrainTrainer(vae_cfg).train()
    timings["vae_pretrain_s"] = time.time() - t0
    model_dir = out / "vae" / "model"

    # --- evaluation sets and references ----------------------------------------------------
    real = benchmark_pairs(Path(args.benchmark), args.crop, args.max_eval)
    sets = {"drealsr_real_lq": real, "drealsr_synthetic_lq": synthetic_pairs(real, args.seed)}
    vae = load_base_components(model_dir, components=("vae",)).vae.eval()
    refs = {
        "bicubic": evaluate(lambda lq, i: lq, sets),
        "tiny_vae(bicubic)": evaluate(lambda lq, i: vae_roundtrip(vae, lq), sets),
        "tiny_vae(HQ)": {
            k: float(np.mean([psnr_y(vae_roundtrip(vae, hq), hq) for _, _, hq in v])) for k, v in sets.items()
        },  # fmt: skip
    }

    # --- 2. stage 1 -----------------------------------------------------------------------
    t0 = time.time()
    s1_cfg = load_config("tiny/stage1", [
        f"model.base_model={model_dir}", f"data.train_hq={train_list}", f"output_dir={out / 'stage1'}",
        f"max_steps={args.stage1_steps}", f"checkpoint.every={args.stage1_steps}", f"data.crop_size={args.crop}",
        f"seed={args.seed}", "logging.progress_bar=false",
    ])  # fmt: skip
    trainer = Stage1Trainer(s1_cfg)
    trainer.setup()
    curve: list[dict] = []
    eval_time = 0.0

    def restore_fn(lq, i):
        return trainer.restore(lq, 100, seed=10_000 + i).cpu()

    def record(step: int) -> None:
        nonlocal eval_time
        te = time.time()
        scores = evaluate(restore_fn, sets)
        curve.append({"step": step, **scores})
        eval_time += time.time() - te
        print(
            f"[demo] stage-1 step {step}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()),
            flush=True,
        )

    record(0)
    step0_samples = [restore_fn(lq, i) for i, (_, lq, _) in enumerate(real[:4])]
    trainer.callbacks.append(lambda tr, logs: record(tr.step) if tr.step % args.eval_every == 0 else None)
    trainer.train()
    timings["stage1_train_s"] = time.time() - t0 - eval_time
    timings["stage1_eval_s"] = eval_time

    # --- final: the release-format checkpoint through the inference pipeline -----------------
    pkl = out / "stage1" / "codsr_stage1.pkl"
    pipe = CODSRPipeline.from_pretrained(model_dir, pkl, device="cpu", tagger=None)  # trained prompt-free

    def pipe_restore(lq, i):
        return pipe.restore(lq, prompt="", timestep=100, generator=torch.Generator().manual_seed(10_000 + i))

    final_pipe = evaluate(pipe_restore, sets)
    rows = [
        [lq, s0, pipe_restore(lq, i), hq]
        for i, ((_, lq, hq), s0) in enumerate(zip(real[:4], step0_samples, strict=True))
    ]
    save_grid(rows, out / "samples_drealsr_lq_step0_final_hq.png")

    metrics = [m for m in read_metrics(out / "stage1" / "logs" / "metrics.jsonl") if "train/loss" in m]
    (out / "loss_curve.csv").write_text(
        "step,loss\n" + "".join(f"{m['step']},{m['train/loss']:.6f}\n" for m in metrics), encoding="utf-8"
    )
    plot_curve(
        [(m["step"], m["train/loss"]) for m in metrics],
        out / "loss_curve.png",
        "stage-1 training loss (MSE): logged means (light), running mean (dark)",
    )
    vae_metrics = [m for m in read_metrics(out / "vae" / "logs" / "metrics.jsonl") if "train/mse" in m]
    timings["total_s"] = time.time() - t_start

    results = {
        "train_images": n_train,
        "eval_pairs": len(real),
        "crop": args.crop,
        "vae_steps": args.vae_steps,
        "stage1_steps": args.stage1_steps,
        "vae_train_mse_first_last": [vae_metrics[0]["train/mse"], vae_metrics[-1]["train/mse"]],
        "stage1_loss_first_last": [metrics[0]["train/loss"], metrics[-1]["train/loss"]],
        "references": refs,
        "curve": curve,
        "final_via_pipeline": final_pipe,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [
        "| Y-PSNR (dB), 128² centre crops | DRealSR real LQ | same HQ, synthetic Real-ESRGAN LQ |",
        "|---|---|---|",
    ]
    for name, v in refs.items():
        lines.append(f"| {name} | {v['drealsr_real_lq']:.2f} | {v['drealsr_synthetic_lq']:.2f} |")
    for c in curve:
        lines.append(
            f"| stage 1, step {c['step']} | {c['drealsr_real_lq']:.2f} | {c['drealsr_synthetic_lq']:.2f} |"
        )
    lines.append(f"| stage 1 final via CODSRPipeline + .pkl | {final_pipe['drealsr_real_lq']:.2f} | "
                 f"{final_pipe['drealsr_synthetic_lq']:.2f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(json.dumps(results["timings_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``codsr doctor``: which weights are found, where the others are expected, and the torch set-up.

Lists every weight of :data:`codsr.weights.WEIGHTS` (where it was found and by which rule, or
where it is looked for and the command that gets it), its checksum status, and the torch /
device / dtype situation. Exits 1 when a weight the asked ``--task`` needs is missing (or has a
wrong checksum), else 0.
"""

from __future__ import annotations

import argparse
import sys

from codsr.weights import TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="list the weights codsr can use, where they are, and the torch/device set-up",
        description="List every weight (SD 2.1-base, codsr.pkl, RAM, DAPE, LPIPS-VGG, DINO, Grounding DINO, "
        "SAM 2.1): where it was found (flag → environment variable → $CODSR_HOME / ~/.cache/codsr → library "
        "caches) or is expected and how to get it, its SHA-256 status, and the torch/device/dtype situation. "
        "Exits 1 when a weight the task needs is missing.",
    )
    p.add_argument("--task", choices=TASKS, default="upscale",
                   help="what you want to run; its missing weights make the exit status 1 (default: upscale)")  # fmt: skip
    p.add_argument("--checkpoint", default=None, help="the CODSR checkpoint you will pass (default: $CODSR_CHECKPOINT)")
    p.add_argument("--base-model", default=None, help="SD 2.1-base folder you will pass (default: $CODSR_BASE_MODEL)")
    p.add_argument("--ram", default=None, help="RAM weights you will pass (default: $CODSR_RAM)")
    p.add_argument("--dape", default=None, help="DAPE weights you will pass (default: $CODSR_DAPE)")
    p.add_argument("--no-checksum", action="store_true", help="do not hash the files found (hashing RAM takes ~10 s)")
    p.set_defaults(func=run)


def torch_report() -> list[str]:
    """Lines on torch, the devices seen and the dtype ``codsr upscale`` would use."""
    import torch

    from codsr.pipeline.pipeline import default_device

    lines = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            bf16 = torch.cuda.is_bf16_supported() if i == 0 else None
            lines.append(f"cuda:{i} {name}" + ("" if bf16 is None else f" (bf16 {'yes' if bf16 else 'no'})"))
    else:
        lines.append("CUDA: not available")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"MPS: {'available' if mps is not None and mps.is_available() else 'not available'}")
    dev = default_device()
    dtype = "fp16" if dev.type in ("cuda", "mps") else "fp32"
    lines.append(f"codsr upscale would run on {dev} in {dtype} (override with --device / --fp32 --bf16 --fp16)")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    return lines


def run(args: argparse.Namespace) -> int:
    from codsr.weights import WEIGHTS, codsr_home, find_weight, verify_checksum

    explicit = {"codsr": args.checkpoint, "sd21-base": args.base_model, "ram": args.ram, "dape": args.dape}
    print(f"weights (cache dir: {codsr_home()}; task: {args.task})")
    missing: list[str] = []
    for key, spec in WEIGHTS.items():
        st = find_weight(key, explicit.get(key))
        needed = args.task in spec.tasks
        mark = "needed" if needed else "optional"
        if st.found:
            check = "not checked" if args.no_checksum else verify_checksum(key, st.path)
            print(f"  [ok]      {key:<15} {spec.filename} — found at {st.path} ({st.source}); sha256 {check}; {mark}")
            if check == "mismatch":
                print(f"            SHA-256 differs from the published {spec.sha256}: re-download it")
                if needed:
                    missing.append(key)
            if spec.hub is not None and spec.hub.revision is None and st.source == "hub-cache":
                print("            (Hub copy: revision not pinned in codsr.weights)")
        else:
            tag = "MISSING" if needed else "absent"
            print(f"  [{tag.lower() if not needed else tag}]{' ' * (9 - len(tag))}{key:<15} {spec.filename} — "
                  f"{mark}; looked at: {'; '.join(st.looked_at)}")  # fmt: skip
            print(f"            get it: {spec.get_command()}")
            if needed:
                missing.append(key)
    print("torch:")
    for line in torch_report():
        print(f"  {line}")
    if missing:
        print(f"codsr doctor: missing for {args.task}: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"codsr doctor: everything {args.task} needs is found")
    return 0

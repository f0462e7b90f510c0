"""``codsr convert`` and ``codsr push``: the CODSR model folder and the Hugging Face Hub (docs/hub.md)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="turn a codsr.pkl / trained checkpoint into a CODSR model folder (safetensors + config)",
        description="Convert the release's codsr.pkl, a trained .pkl or a codsr .safetensors into a self-describing "
        "folder (codsr_config.json + codsr.safetensors) that CODSRPipeline.from_pretrained(OUT_DIR) loads. The "
        "pickle is read with torch.load(weights_only=True): no code stored in it runs.",
    )
    c.add_argument("checkpoint", help="codsr.pkl (release or trained) or a codsr .safetensors checkpoint")
    c.add_argument("out_dir", help="output folder")
    _model_options(c)
    c.set_defaults(func=run_convert)

    p = sub.add_parser(
        "push",
        help="upload a CODSR model folder (or checkpoint) to the Hugging Face Hub with a model card",
        description="Upload a CODSR folder to a Hub model repo (created if missing) with a generated README.md "
        "model card (kept if the folder has one). A .pkl/.safetensors checkpoint is converted first.",
    )
    p.add_argument("source", help="CODSR model folder, or a checkpoint to convert on the fly")
    p.add_argument("repo_id", help="Hub repo 'owner/name'")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one, `hf auth login`)")
    p.add_argument("--license", default=None, help="licence id for the card (default: openrail++, the base model's)")
    _model_options(p)
    p.set_defaults(func=run_push)


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model settings (when converting a checkpoint)")
    g.add_argument("--base-model", default=None, help="SD 2.1-base repo id or folder (default: the maintained mirror)")
    g.add_argument("--base-revision", default=None, help="pin the base model's revision (commit hash recommended)")
    g.add_argument("--timestep", type=int, default=None, help="default timestep stored in the config (default: 100)")
    g.add_argument("--tagger", choices=("dape", "ram", "none"), default="dape",
                   help="tagger the model expects (default: dape, as the release)")  # fmt: skip
    g.add_argument("--ram", default=None, help="RAM weights reference stored in the config")
    g.add_argument("--dape", default=None, help="DAPE weights reference stored in the config")


def _convert(args: argparse.Namespace, checkpoint: str, out_dir: str) -> None:
    from codsr.model.pretrained import TaggerSettings, convert_checkpoint

    tagger = TaggerSettings(None if args.tagger == "none" else args.tagger, args.ram, args.dape)
    convert_checkpoint(checkpoint, out_dir,
                       base_model=args.base_model, base_model_revision=args.base_revision,
                       default_timestep=args.timestep, tagger=tagger)  # fmt: skip


def run_convert(args: argparse.Namespace) -> int:
    from codsr.model.checkpoint import CheckpointError

    try:
        _convert(args, args.checkpoint, args.out_dir)
    except (FileNotFoundError, CheckpointError, NotADirectoryError) as e:
        print(f"codsr convert: {e}", file=sys.stderr)
        return 2
    print(f"codsr convert: wrote {args.out_dir} (codsr_config.json + codsr.safetensors)", file=sys.stderr)
    return 0


def run_push(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from codsr.model.checkpoint import CheckpointError
    from codsr.model.pretrained import DEFAULT_LICENSE, push_folder

    kwargs = dict(private=args.private, revision=args.revision, token=args.token, create_pr=args.create_pr,
                  commit_message=args.commit_message, license=args.license or DEFAULT_LICENSE)  # fmt: skip
    try:
        if Path(args.source).is_dir():
            info = push_folder(args.source, args.repo_id, **kwargs)
        else:
            with tempfile.TemporaryDirectory(prefix="codsr-push-") as tmp:
                _convert(args, args.source, tmp)
                info = push_folder(tmp, args.repo_id, **kwargs)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"codsr push: {e}", file=sys.stderr)
        return 2
    print(f"codsr push: {getattr(info, 'commit_url', info)}", file=sys.stderr)
    return 0

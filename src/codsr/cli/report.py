"""``codsr report OUT_DIR``: merge the run records of all workers of a batch job into one summary."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarise a (sharded / Ray) upscale run from its run records",
        description="Merge the JSON-lines run records (codsr-run.*.jsonl) that every `codsr upscale` worker "
        "appends in its output folder: done / failed / missing images and throughput per worker. Exits 1 "
        "when an image failed or is missing (or a shard never started), 2 when the folder has no records "
        "(docs/scale-out.md).",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="the output folder of `codsr upscale`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from codsr.scaleout import summarize

    if not Path(args.out_dir).is_dir():
        print(f"codsr report: {args.out_dir!r} is not a folder (give the output folder of codsr upscale)",
              file=sys.stderr)  # fmt: skip
        return 2
    summary = summarize(args.out_dir)
    if summary.records == 0:
        print(f"codsr report: no run records (codsr-run.*.jsonl) in {args.out_dir}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.text())
    return summary.exit_code

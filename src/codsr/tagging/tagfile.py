"""Reading the tag tables ``codsr tag -o`` writes: ``name<TAB>tags`` per line (TSV) or a JSON object.

One reader serves every consumer of such tables (training prompts, stage-2 mask captions); the
``label`` names the option the file came from in error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_tag_table(path: str | os.PathLike, label: str = "tag file") -> dict[str, str]:
    """``{name: text}`` from a TSV (``name<TAB>text``; blank and ``#`` lines skipped) or a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{label} {p} not found (write one with `codsr tag -i IMAGES -o tags.tsv`)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{label} {p}: a JSON file must be an object mapping names to text")
        return {str(k): v for k, v in data.items()}
    table: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, value = line.partition("\t")
        if not sep:
            raise ValueError(f"{label} {p}, line {n}: expected 'name<TAB>text'")
        table[name.strip()] = value.strip()
    return table

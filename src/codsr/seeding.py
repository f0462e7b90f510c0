"""The per-image seed: one formula for ``codsr upscale``, batch runs and the benchmark runner.

An image's seed depends only on the run's base seed and the image's name (its path below the
input folder), never on the order images are processed in, so an interrupted and resumed run
writes exactly the files an uninterrupted one would, and the same image gets the same noise in
``codsr upscale`` and in ``codsr benchmark-sets``. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import PurePath

__all__ = ["SEED_RULE", "image_seed"]

# The formula in words, recorded in run manifests so a resume under another rule is refused.
SEED_RULE = 'int.from_bytes(sha256(f"{base_seed}/{relative_name}".encode()).digest()[:4], "big")'


def image_seed(base_seed: int, relative_name: str | os.PathLike[str]) -> int:
    """Per-image seed in [0, 2**32): first 4 bytes (big-endian) of sha256("<base_seed>/<name>").

    ``relative_name`` is the path below the input root (just the file name for a flat folder);
    it is written with "/" separators and Unicode-normalised (NFC), so Windows paths and macOS
    decomposed names give the same seed. The range suits ``torch.Generator.manual_seed``,
    ``numpy.random.default_rng`` and ``random.seed`` alike.

    >>> image_seed(42, "sub/photo 1.jpg")
    487282075
    """
    name = relative_name if isinstance(relative_name, str) else PurePath(relative_name).as_posix()
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    digest = hashlib.sha256(f"{int(base_seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big")

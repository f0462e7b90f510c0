"""Per-key tag cache for training (prompts are RAM tags of the HQ crop: docs/method.md#stage-1).

Tagging a 512² crop costs about a second on a CPU (a few ms on a GPU), and the same crop key
comes back every epoch, so tags are stored per key in an append-only JSON-lines file
``<cache_dir>/<namespace>.jsonl`` (one ``{"key": ..., "tags": ...}`` object per line; the last line
for a key wins). Each :meth:`TagCache.put` appends its lines with one ``O_APPEND`` write
(:func:`codsr.atomic.append_bytes`), so concurrent writers (data-loader workers, ranks) never
interleave their entries; a line left incomplete by a killed writer is skipped on reading (its
key is simply tagged again).

The key must identify the pixels the tagger sees (e.g. ``"path.png|x0,y0,512|flip0"``); the
namespace must identify the tagger (RAM vs RAM+DAPE), by default ``tagger.name``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from codsr.atomic import append_bytes

logger = logging.getLogger(__name__)

__all__ = ["TagCache", "cached_tags"]


class TagCache:
    """Tags by key, kept in memory and mirrored to ``<cache_dir>/<namespace>.jsonl``."""

    def __init__(self, cache_dir: str | os.PathLike, namespace: str = "tags") -> None:
        if not namespace or any(c in namespace for c in "/\\") or namespace.startswith("."):
            raise ValueError(
                f"namespace={namespace!r}: use a plain file-name stem such as 'ram' or 'ram+dape'"
            )
        self.path = Path(cache_dir) / f"{namespace}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tags: dict[str, str] = {}
        self._size = 0
        self.reload()

    def reload(self) -> None:
        """Read entries appended (by this or other processes) since the last read."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._size)
            chunk = f.read()
        # Only whole lines count: another writer may be half-way through the last one.
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].decode("utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._tags[entry["key"]] = entry["tags"]
            except (ValueError, TypeError, KeyError):  # a writer killed mid-line: re-tag that key
                logger.warning("%s: skipping an unreadable cache line (%.60r)", self.path, line)
        self._size += end

    def __contains__(self, key: str) -> bool:
        return key in self._tags

    def __len__(self) -> int:
        return len(self._tags)

    def get(self, key: str) -> str | None:
        return self._tags.get(key)

    def put(self, items: dict[str, str]) -> None:
        """Store tags for several keys (one append of whole lines)."""
        if not items:
            return
        text = "".join(json.dumps({"key": k, "tags": v}, ensure_ascii=False) + "\n" for k, v in items.items())
        append_bytes(self.path, text.encode("utf-8"))
        self._tags.update(items)

    def get_or_compute(self, tagger: Callable, images, keys: Sequence[str]) -> list[str]:
        """Tags for ``keys``; only the images whose key is not cached are passed to ``tagger``.

        ``images`` is a ``[B, 3, H, W]`` tensor or a list (PIL images), aligned with ``keys``;
        ``tagger(images_subset)`` must return one string per image (e.g. a :class:`RAMTagger`).
        """
        keys = list(keys)
        if len(keys) != len(images):
            raise ValueError(f"keys: {len(keys)} keys for {len(images)} images")
        todo = [i for i, k in enumerate(keys) if k not in self._tags]
        if todo:
            self.reload()  # another worker may have tagged them meanwhile
            todo = [i for i in todo if keys[i] not in self._tags]
        if todo:
            if hasattr(images, "index_select"):
                import torch

                subset = images.index_select(0, torch.tensor(todo, device=images.device))
            else:
                subset = [images[i] for i in todo]
            new_tags = list(tagger(subset))
            if len(new_tags) != len(todo):
                raise RuntimeError(f"tagger returned {len(new_tags)} tag strings for {len(todo)} images")
            self.put({keys[i]: t for i, t in zip(todo, new_tags, strict=True)})
        return [self._tags[k] for k in keys]


_CACHES: dict[tuple[str, str], TagCache] = {}


def cached_tags(
    tagger: Callable, images, keys: Sequence[str], cache_dir: str | os.PathLike, namespace: str | None = None
) -> list[str]:
    """Tags of ``images`` (one per key), computed with ``tagger`` only for keys not yet cached.

    ``namespace`` defaults to ``tagger.name`` (``"ram"`` / ``"ram+dape"`` for a :class:`RAMTagger`).
    The cache object is reused across calls with the same directory and namespace.
    """
    namespace = namespace or getattr(tagger, "name", None) or "tags"
    slot = (str(Path(cache_dir).resolve()), namespace)
    if slot not in _CACHES:
        _CACHES[slot] = TagCache(cache_dir, namespace)
    return _CACHES[slot].get_or_compute(tagger, images, keys)

"""The one way codsr writes a file: all of it or nothing (standard library only).

Every output and artefact (images, masks, sidecars, manifests, reports, checkpoints) goes through
:func:`atomic_write` (or one of its thin variants): the bytes are written to a temp file in the
target's folder, flushed and fsync-ed, then ``os.replace``-d over the final name, and the folder is
fsync-ed so the rename itself survives a power cut. A write that fails or is interrupted (also by
Ctrl-C) removes its temp file and leaves the final name untouched: readers and resumed runs never
see a half-written file.

Temp files are named ``.{name}.codsr-tmp-{host}-{pid}-{8 hex}``. Host and pid let a later run tell
a live writer's temp file (another process on this host that is still running) from the leftover of
a killed one: :func:`remove_temp_files` deletes only the stale ones, so it is safe to call on a
folder that another process is writing into. Temp files from other hosts (shared network folders)
are judged by age instead. Names without host and pid (``.{name}.codsr-tmp-{8 hex}``, the form
earlier codsr versions wrote) are always stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "TEMP_MARKER",
    "append_bytes",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "is_stale_temp_file",
    "is_temp_file",
    "remove_temp_files",
    "temp_file_owner",
]

TEMP_MARKER = ".codsr-tmp-"
# Foreign-host temp files untouched for this long (seconds) are taken as left over: a live writer
# keeps touching its file, and no single image or checkpoint takes an hour to write.
FOREIGN_MAX_AGE = 3600.0

_TEMP_RE = re.compile(
    r"^\..+" + re.escape(TEMP_MARKER) + r"(?:(?P<host>[A-Za-z0-9_-]{1,32})-(?P<pid>\d{1,10})-)?[0-9a-f]{8}$"
)
_NAME_KEEP = 150  # bytes of the final name kept in the temp name (file names are limited to 255)


def _host_tag() -> str:
    """This host's name as it appears in temp names: [A-Za-z0-9_-], at most 32 characters."""
    name = socket.gethostname().split(".")[0] or "host"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:32]


def _new_temp(final: Path) -> tuple[Path, int]:
    """Create (O_EXCL) a fresh temp file beside ``final``; returns its path and an open fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    prefix = f".{final.name[:_NAME_KEEP]}{TEMP_MARKER}{_host_tag()}-{os.getpid()}-"
    while True:
        tmp = final.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return tmp, os.open(tmp, flags, 0o666)  # 0o666 & ~umask, like a normally created file
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync, then rename it to ``path``.

    The parent folder is created. If ``write`` raises (or the process is interrupted), the temp
    file is removed, ``path`` keeps its previous content (or stays absent), and the error
    propagates. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temp(final)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:  # also KeyboardInterrupt: never leave the temp file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Context manager for writers that need a file *name* (``safetensors.torch.save_file``,
    ``torch.save(obj, name)``, ``Image.save(name, format=...)``): yields a temp path beside
    ``path``; on a clean exit the file is fsync-ed and renamed to ``path``, on an error removed.

    >>> with atomic_path("model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temp(final)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; newlines are written as given (no ``\\r\\n`` on Windows)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str],
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    allow_nan: bool = True,
) -> Path:
    """Write ``data`` as UTF-8 JSON (non-ASCII kept as is, a final newline) to ``path`` atomically."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


def append_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` to ``path`` with one ``write`` on an ``O_APPEND`` descriptor.

    For append-only logs shared by several processes (e.g. the tag cache): each call's bytes land
    together at the end of the file, never interleaved with another appender's (Linux serialises
    appends to a regular file). A writer killed mid-call can leave a partial last record; readers
    of such logs must skip an unparseable line.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:  # a regular-file write is only short on a full disk or a signal
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# left-over temp files
# --------------------------------------------------------------------------------------------


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """True for a temp file of :func:`atomic_write` (``.{name}.codsr-tmp-[{host}-{pid}-]XXXXXXXX``)."""
    return bool(_TEMP_RE.match(Path(path).name))


def temp_file_owner(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """(host, pid) of the process that created a temp file; None for other names and old-style ones."""
    m = _TEMP_RE.match(Path(path).name)
    if not m or m["host"] is None:
        return None
    return m["host"], int(m["pid"])


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else / cannot tell
        return True
    return True


def is_stale_temp_file(
    path: str | os.PathLike[str], *, foreign_max_age: float = FOREIGN_MAX_AGE, now: float | None = None
) -> bool:
    """True if ``path`` is a temp file whose writer is gone.

    Same host: the writing process no longer runs. Other host: the file was last modified more than
    ``foreign_max_age`` seconds ago. Old-style names without host and pid: always. Not a temp file
    name, or the file vanished: False.
    """
    p = Path(path)
    if not is_temp_file(p):
        return False
    owner = temp_file_owner(p)
    if owner is None:
        return True
    host, pid = owner
    if host == _host_tag():
        return not _pid_alive(pid)
    try:
        age = (time.time() if now is None else now) - p.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > foreign_max_age


def remove_temp_files(
    folder: str | os.PathLike[str], *, recursive: bool = True, foreign_max_age: float = FOREIGN_MAX_AGE
) -> list[Path]:
    """Delete the stale temp files (:func:`is_stale_temp_file`) in ``folder``; returns them, sorted.

    Temp files of writers that are still running are kept, so this is safe while another process
    writes into the same folder.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    candidates = root.rglob(f"*{TEMP_MARKER}*") if recursive else root.glob(f"*{TEMP_MARKER}*")
    removed = []
    for p in sorted(candidates):
        if p.is_file() and is_stale_temp_file(p, foreign_max_age=foreign_max_age):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed

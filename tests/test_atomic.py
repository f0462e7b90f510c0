"""codsr.atomic: the one atomic writer, its temp-file names and the stale-temp cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from codsr import atomic
from codsr.atomic import (
    append_bytes,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_stale_temp_file,
    is_temp_file,
    remove_temp_files,
    temp_file_owner,
)


class _Boom(Exception):
    pass


def test_writes_bytes_text_and_json(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "x\ny\n")
    assert (tmp_path / "t.txt").read_bytes() == b"x\ny\n"  # no newline translation
    atomic_write_json(tmp_path / "m.json", {"b": "é", "a": float("nan")}, indent=1)
    assert (tmp_path / "m.json").read_bytes() == '{\n "b": "é",\n "a": NaN\n}\n'.encode()
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": [2]}, indent=None, sort_keys=True)
    assert (tmp_path / "s.json").read_text() == '{"a": [2], "b": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.json", "s.json", "t.txt"]


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_a_failing_write_leaves_no_temp_file_and_the_old_content(tmp_path, error):
    target = tmp_path / "out.json"
    target.write_bytes(b"previous")

    def half(f):
        f.write(b"partial")
        raise error("disk went away")

    with pytest.raises(error):
        atomic_write(target, half)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(error), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise error("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    with atomic_path(tmp_path / "w.bin") as tmp:
        assert tmp.parent == tmp_path and is_temp_file(tmp) and tmp.exists()
        assert not (tmp_path / "w.bin").exists()
        tmp.write_bytes(b"weights")
    assert (tmp_path / "w.bin").read_bytes() == b"weights" and not tmp.exists()


def test_temp_names_carry_host_and_pid(tmp_path, monkeypatch):
    seen = []
    new_temp = atomic._new_temp
    monkeypatch.setattr(atomic, "_new_temp", lambda final: seen.append(new_temp(final)) or seen[-1])
    atomic_write(tmp_path / ("n" * 240 + ".png"), lambda f: f.write(b"x"))
    name = seen[0][0].name
    assert len(name.encode()) < 255 and name.startswith("." + "n" * 150 + ".codsr-tmp-")
    assert temp_file_owner(name) == (atomic._host_tag(), os.getpid())
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: "gpu-node.07.example.org")
    assert atomic._host_tag() == "gpu-node"
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: "wörk station")
    assert atomic._host_tag() == "w_rk_station"


def test_temp_name_parsing():
    assert temp_file_owner(".a.png.codsr-tmp-gpu-node-12-4567-0123abcd") == ("gpu-node-12", 4567)
    assert temp_file_owner(".a.png.codsr-tmp-0123abcd") is None  # old style: no owner
    assert is_temp_file(".a.png.codsr-tmp-0123abcd") and is_temp_file(".a.codsr-tmp-h-1-0123abcd")
    for name in (
        "a.png.codsr-tmp-0123abcd",
        ".a.png.codsr-tmp-xyz",
        ".a.png.codsr-tmp-h-1-0123ABCD",
        "a.png",
    ):
        assert not is_temp_file(name) and temp_file_owner(name) is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_temp_files_keeps_live_writers(tmp_path):
    host, now = atomic._host_tag(), time.time()
    dead = _dead_pid()
    live = tmp_path / f".a.png.codsr-tmp-{host}-{os.getpid()}-0123abcd"
    stale = tmp_path / f".b.png.codsr-tmp-{host}-{dead}-0123abcd"
    old_style = tmp_path / "sub" / ".c.png.codsr-tmp-deadbeef"
    foreign_new = tmp_path / ".d.png.codsr-tmp-otherhost-1-0123abcd"
    foreign_old = tmp_path / ".e.png.codsr-tmp-otherhost-1-0123abce"
    keep = [tmp_path / "a.png", tmp_path / ".a.png.codsr-tmp-xyz"]
    old_style.parent.mkdir()
    for p in (live, stale, old_style, foreign_new, foreign_old, *keep):
        p.write_bytes(b"x")
    os.utime(foreign_old, (now - 7200, now - 7200))
    assert not is_stale_temp_file(live) and is_stale_temp_file(stale) and is_stale_temp_file(old_style)
    assert not is_stale_temp_file(foreign_new) and is_stale_temp_file(foreign_old)
    assert is_stale_temp_file(foreign_new, foreign_max_age=60, now=now + 61)
    assert remove_temp_files(tmp_path, recursive=False) == sorted([stale, foreign_old])
    assert remove_temp_files(tmp_path) == [old_style]
    assert all(p.exists() for p in (live, foreign_new, *keep))
    assert remove_temp_files(tmp_path / "missing") == []


def test_append_bytes_adds_whole_records(tmp_path):
    log = tmp_path / "log.jsonl"
    for i in range(3):
        append_bytes(log, (json.dumps({"i": i}) + "\n").encode())
    assert [json.loads(line)["i"] for line in log.read_text().splitlines()] == [0, 1, 2]


def test_tag_cache_skips_a_line_torn_by_a_killed_writer(tmp_path):
    from codsr.tagging.cache import TagCache

    cache = TagCache(tmp_path, "ram")
    cache.put({"a.png": "cat, dog"})
    append_bytes(cache.path, b'{"key": "b.png", "ta')  # killed mid-line
    cache.put({"c.png": "tree"})  # lands after the torn bytes: that line is lost, nothing else
    fresh = TagCache(tmp_path, "ram")
    assert (fresh.get("a.png"), fresh.get("b.png"), fresh.get("c.png")) == ("cat, dog", None, None)
    fresh.put({"d.png": "sky"})
    assert TagCache(tmp_path, "ram").get("d.png") == "sky" and len(TagCache(tmp_path, "ram")) == 2

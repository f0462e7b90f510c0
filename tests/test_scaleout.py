"""codsr.scaleout and ``codsr upscale --shard`` / ``codsr report``: shards run at the same time into one
folder give the single-process bytes, each image in exactly one shard; a SIGKILLed run resumes with
``--skip-existing`` to the same bytes; the batch runner never deletes a live worker's temp file.

End-to-end runs use the tiny model written once per session (``tiny_model_dir``) on the CPU; they are
marked slow (about 4 s per image there, 13 images per run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.atomic import TEMP_MARKER, _host_tag
from codsr.batch import run_batch
from codsr.cli import main
from codsr.scaleout import (
    LaunchEnv,
    RunRecord,
    Shard,
    detect_launch,
    read_records,
    record_path,
    relative_name,
    resolve_shard,
    shard_index,
    summarize,
)

# ------------------------------------------------------------------------------ shards, launchers


def test_shard_index_is_the_documented_hash():
    # first 8 bytes of sha256("a/b.png"), big-endian, modulo N — computed here independently
    digest = hashlib.sha256(b"a/b.png").digest()
    value = int.from_bytes(digest[:8], "big")
    assert [shard_index("a/b.png", n) for n in (1, 2, 3, 7)] == [0, value % 2, value % 3, value % 7]
    assert shard_index("sub/photo 1.jpg", 4) == 0  # the docstring's example
    # Windows separators and decomposed Unicode (macOS) give the same shard
    assert shard_index("a\\b.png", 7) == shard_index("a/b.png", 7)
    assert shard_index("cafe\u0301.png", 97) == shard_index("caf\u00e9.png", 97)


def test_shards_partition_and_adding_files_moves_nothing():
    names = [f"d{i % 3}/img{i}.png" for i in range(200)]
    shards = [Shard(i, 4) for i in range(4)]
    owners = [[s.owns(n) for s in shards] for n in names]
    assert all(sum(o) == 1 for o in owners)  # each name in exactly one shard
    counts = [sum(o[i] for o in owners) for i in range(4)]
    assert min(counts) > 30  # roughly even (hash), 50 expected each
    more = names + [f"new{i}.png" for i in range(50)]
    assert [[s.owns(n) for s in shards] for n in more[:200]] == owners


def test_shard_parse_and_errors():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4" and Shard(1, 4).tag == "1-of-4"
    for bad in ("4/4", "1", "a/b", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="0 ≤ I < N"):
            Shard.parse(bad)


def test_launcher_environments():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"}
    assert detect_launch(torchrun) == LaunchEnv(5, 8, 1, "torchrun")
    assert detect_launch(slurm) == LaunchEnv(3, 4, 2, "slurm")
    assert detect_launch({**slurm, **torchrun}).launcher == "torchrun"  # srun torchrun: torchrun's ranks
    assert detect_launch({}) is None
    assert LaunchEnv(5, 8, 1, "torchrun").device(cuda_available=True) == "cuda:1"
    assert LaunchEnv(5, 8, 1, "torchrun").device(cuda_available=False) == "cpu"
    assert resolve_shard("auto", slurm) == (Shard(3, 4), LaunchEnv(3, 4, 2, "slurm"))
    assert resolve_shard("2/3", {}) == (Shard(2, 3), None)
    assert resolve_shard(None, torchrun) == (None, None)
    with pytest.raises(ValueError, match="no launcher environment"):
        resolve_shard("auto", {})
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2"})


# ------------------------------------------------------------------------------ records, report


def test_report_merges_records_latest_state_wins(tmp_path):
    out = tmp_path / "out"
    root = tmp_path / "in"
    out.mkdir()
    (out / "a.png").write_bytes(b"a")
    (out / "c.png").write_bytes(b"c")
    r0 = RunRecord(record_path(out, "0-of-2"), out_dir=out, input_root=root, shard="0/2", worker="h:1",
                   peak_memory=lambda: 1000)  # fmt: skip
    r0.start([root / "a.png", root / "b.png"])
    r0.image("done", root / "a.png", out / "a.png", seed=7, seconds=2.0)
    r0.image("failed", root / "b.png", None, seconds=1.0, error="read: not an image")
    r1 = RunRecord(record_path(out, "1-of-2"), out_dir=out, input_root=root, shard="1/2", worker="h:2")
    r1.start([root / "c.png", root / "d.png", root / "e.png"])
    r1.image("done", root / "c.png", out / "c.png", seconds=0.5)
    r1.image("done", root / "d.png", out / "d.png", seconds=0.5)  # its output was deleted since
    with open(record_path(out, "1-of-2"), "ab") as f:
        f.write(b'{"event": "image", "inp')  # a line torn by SIGKILL
    s = summarize(out)
    assert s.expected == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert s.done == {"a.png": "a.png", "c.png": "c.png"}
    assert s.failed == {"b.png": "read: not an image"}
    assert s.missing == ["d.png", "e.png"]  # output gone; never reached
    assert s.missing_shards == [] and s.records == 2 and s.exit_code == 1
    w0, w1 = s.workers["h:1"], s.workers["h:2"]
    assert (w0.done, w0.failed, w0.busy_seconds, w0.images_per_second, w0.peak_memory) == (1, 1, 3.0, 1 / 3, 1000)
    assert (w1.done, w1.images_per_second) == (2, 2.0)
    # a resumed run of shard 1 finishes e and redoes d: everything done except the failed b
    (out / "d.png").write_bytes(b"d")
    (out / "e.png").write_bytes(b"e")
    r1.image("skipped", root / "d.png", out / "d.png")
    r1.image("done", root / "e.png", out / "e.png", seconds=0.5)
    r0.image("done", root / "b.png", out / "a.png", seconds=1.0)  # b fixed and redone
    s = summarize(out)
    assert (len(s.done), s.failed, s.missing, s.exit_code) == (5, {}, [], 0)
    # a shard 2/3 run into the same folder: shards 0/3 and 1/3 never started
    RunRecord(record_path(out, "2-of-3"), out_dir=out, input_root=root, shard="2/3").start([])
    assert summarize(out).missing_shards == ["0/3", "1/3"]


def test_record_lines_are_whole_json(tmp_path):
    rec = RunRecord(record_path(tmp_path, "all"), out_dir=tmp_path, input_root=tmp_path / "in", shard="all",
                    worker="w", device="cpu", peak_memory=lambda: 123)  # fmt: skip
    rec.start([tmp_path / "in" / "sub" / "x.png"], seed=42)
    rec.image("done", tmp_path / "in" / "sub" / "x.png", tmp_path / "sub" / "x.png", seed=9, seconds=0.25)
    rec.image("skipped", tmp_path / "in" / "sub" / "x.png", tmp_path / "sub" / "x.png", seed=9)
    lines = [json.loads(raw) for raw in record_path(tmp_path, "all").read_text(encoding="utf-8").splitlines()]
    assert [line["event"] for line in lines] == ["start", "image", "image"]
    assert lines[0]["inputs"] == ["sub/x.png"] and lines[0]["seed"] == 42 and lines[0]["device"] == "cpu"
    assert {k: lines[1][k] for k in ("input", "output", "seed", "status", "seconds", "peak_memory", "error")} == {
        "input": "sub/x.png", "output": "sub/x.png", "seed": 9, "status": "done", "seconds": 0.25,
        "peak_memory": 123, "error": ""}  # fmt: skip
    assert lines[2]["peak_memory"] is None  # skipped: nothing was computed
    assert relative_name(tmp_path / "elsewhere" / "y.png", tmp_path / "in") == "y.png"


def test_run_batch_with_planned_outputs_feeds_the_record(tmp_path):
    """run_batch(outputs=..., on_item=RunRecord.on_item): the model-free path the shards and Ray use."""
    from codsr.seeding import image_seed

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(src / name)
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "b_planned.png").write_bytes(b"already there")
    rec = RunRecord(record_path(out, "1-of-1"), out_dir=out, input_root=src, shard="0/1", worker="w")
    inputs = [src / "a.png", src / "b.png", src / "c.png"]
    outputs = [out / "x" / "a_planned.png", out / "b_planned.png", out / "c.png"]
    rec.start(inputs)
    report = run_batch(inputs, lambda image, seed: image.rgb, out_dir=out, skip_existing=True, input_root=src,
                       seed=7, progress=False, outputs=outputs, on_item=rec.on_item)  # fmt: skip
    assert [i.output for i in report.done] == [out / "x" / "a_planned.png"]  # the planned name, not a.png
    assert np.asarray(Image.open(out / "x" / "a_planned.png")).max() == 100
    lines = [line for line in read_records(out) if line["event"] == "image"]
    assert [(x["input"], x["output"], x["status"], x["seed"]) for x in lines] == [
        ("a.png", "x/a_planned.png", "done", image_seed(7, "a.png")),
        ("b.png", "b_planned.png", "skipped", image_seed(7, "b.png")),
        ("c.png", None, "failed", image_seed(7, "c.png")),
    ]
    assert lines[2]["error"].startswith("read:")
    s = summarize(out)
    assert (sorted(s.done), list(s.failed), s.missing) == (["a.png", "b.png"], ["c.png"], [])
    with pytest.raises(ValueError, match="2 paths for 3 inputs"):
        run_batch(inputs, lambda image, seed: image.rgb, out_dir=out, skip_existing=True, outputs=outputs[:2])


# ------------------------------------------------------------------------------ stale temp files


def test_batch_start_keeps_a_live_workers_temp_file_and_removes_a_dead_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = out / f".x.png{TEMP_MARKER}{_host_tag()}-{live.pid}-0123abcd"
        dead_tmp = out / f".y.png{TEMP_MARKER}{_host_tag()}-{dead.pid}-0123abcd"
        foreign_fresh = out / f".z.png{TEMP_MARKER}otherhost-1-0123abcd"
        foreign_old = out / f".w.png{TEMP_MARKER}otherhost-2-0123abcd"
        for p in (live_tmp, dead_tmp, foreign_fresh, foreign_old):
            p.write_bytes(b"partial")
        os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))  # older than FOREIGN_MAX_AGE (1 h)
        report = run_batch([], lambda image, seed: None, out_dir=out, skip_existing=False, progress=False)
        assert sorted(report.removed_temp_files) == sorted([dead_tmp, foreign_old])
        assert live_tmp.exists() and foreign_fresh.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------ end to end


def _images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        sub = folder / ("sub" if i % 4 == 0 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray((rng.random((16 + 2 * (i % 3), 20, 3)) * 255).astype(np.uint8)).save(sub / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # fails in whichever shard


def _argv(src: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["upscale", "-i", str(src), "-o", str(out), "-r", "-s", "2", "--device", "cpu", "--quiet",
            "--base-model", str(model / "tiny-sd21"), "--checkpoint", str(model / "codsr_tiny.pkl"), *extra]  # fmt: skip


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""), **extra)  # fmt: skip
    return env


@contextlib.contextmanager
def _one_thread():
    """Run in-process work with one torch thread, as the worker processes (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The single-process run (in this process) over 12 images + one broken file."""
    root = tmp_path_factory.mktemp("scaleout")
    src = root / "in"
    _images(src)
    out = root / "single"
    # The workers run with OMP_NUM_THREADS=1 (_env): CPU float reductions depend on the thread count,
    # so the reference uses one thread too (docs/scale-out.md: same device, dtype and threads → same bytes).
    with _one_thread():
        assert main(_argv(src, out, tiny_model_dir)) == 1  # the broken file
    outputs = _outputs(out)
    assert len(outputs) == 12
    return src, outputs


@pytest.mark.slow  # ~4 s per image for the tiny model on this CPU: > 30 s
def test_two_shards_at_once_equal_the_single_process_run(reference, tiny_model_dir, tmp_path, capsys):
    src, expected = reference
    out = tmp_path / "out"
    # shard 1 finds I/N in a torchrun-style environment (--shard auto), shard 0 is given explicitly
    procs = [
        subprocess.Popen([sys.executable, "-m", "codsr", *_argv(src, out, tiny_model_dir, "--shard", "0/2")],
                         env=_env(), stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-m", "codsr", *_argv(src, out, tiny_model_dir, "--shard", "auto")],
                         env=_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0"), stderr=subprocess.PIPE, text=True),
    ]  # fmt: skip
    errs = [p.communicate(timeout=300)[1] for p in procs]
    broken_shard = shard_index("broken.jpg", 2)
    assert [p.returncode for p in procs] == [1 if i == broken_shard else 0 for i in (0, 1)], errs
    assert _outputs(out) == expected  # byte for byte
    assert not [p for p in out.rglob(f"*{TEMP_MARKER}*")]

    images = {0: set(), 1: set()}
    for line in read_records(out):
        if line["event"] == "image":
            images[int(line["shard"][0])].add(line["input"])
    assert images[0].isdisjoint(images[1])
    assert images[0] | images[1] == {relative_name(p, src) for p in src.rglob("*") if p.is_file()}
    assert all(shard_index(name, 2) == i for i, names in images.items() for name in names)

    capsys.readouterr()
    assert main(["report", str(out)]) == 1  # the broken file failed
    text = capsys.readouterr().out
    assert "13 inputs: 12 done, 1 failed, 0 missing (2 record file(s), 2 worker(s))" in text
    assert "broken.jpg: read:" in text
    (out / "sub" / "img4.png").unlink()  # an output lost since: missing
    assert main(["report", str(out), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["missing"], list(summary["failed"])) == (11, ["sub/img4.png"], ["broken.jpg"])
    assert sum(w["done"] for w in summary["workers"].values()) == 12


@pytest.mark.slow  # ~4 s per image for the tiny model on this CPU: > 30 s
def test_sigkill_then_skip_existing_finishes_with_the_same_bytes(reference, tiny_model_dir, tmp_path, capsys):
    src, expected = reference
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "codsr", *_argv(src, out, tiny_model_dir)], env=_env(),
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(list(out.rglob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = _outputs(out)
    assert 2 <= len(partial) < 12 and all(expected[k] == v for k, v in partial.items())  # no half file
    capsys.readouterr()
    assert main(["report", str(out)]) == 1
    assert "missing" in capsys.readouterr().out
    with _one_thread():
        assert main(_argv(src, out, tiny_model_dir, "--skip-existing")) == 1  # broken.jpg still fails
    assert _outputs(out) == expected
    assert not [p for p in out.rglob(f"*{TEMP_MARKER}*")]  # the killed writer's temp file is gone
    capsys.readouterr()
    main(["report", str(out)])
    assert "13 inputs: 12 done, 1 failed, 0 missing" in capsys.readouterr().out

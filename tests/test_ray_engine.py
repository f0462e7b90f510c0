"""``codsr upscale --engine ray`` on a local Ray instance (2 CPUs, bound to 127.0.0.1): the same bytes as
the single-process run, per-worker run records that ``codsr report`` merges, and skip-existing.

Skips only where Ray is not installed (optional extra ``codsr[ray]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OPTIONAL_EXTRA, skip_reason

ray = pytest.importorskip("ray", reason=skip_reason(OPTIONAL_EXTRA, "ray (pip install 'codsr[ray]')"))

from codsr.atomic import TEMP_MARKER  # noqa: E402
from codsr.cli import main  # noqa: E402
from codsr.scaleout import read_records, summarize  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs on 127.0.0.1, shut down after the module; workers import this tree's codsr."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
                                  "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


def _argv(src: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["upscale", "-i", str(src), "-o", str(out), "-s", "2", "--device", "cpu", "--quiet",
            "--base-model", str(model / "tiny-sd21"), "--checkpoint", str(model / "codsr_tiny.pkl"), *extra]  # fmt: skip


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.mark.slow  # Ray start-up + ~4 s per image for the tiny model on this CPU
def test_ray_engine_writes_the_single_process_bytes(local_ray, tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray((rng.random((16, 18 + 2 * (i % 2), 3)) * 255).astype(np.uint8)).save(src / f"p{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # Ray's workers run with OMP_NUM_THREADS=1: the reference uses one thread too (CPU float reductions
    # depend on the thread count; docs/scale-out.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(src, tmp_path / "single", tiny_model_dir)) == 1
    finally:
        torch.set_num_threads(threads)
    expected = _outputs(tmp_path / "single")
    assert len(expected) == 6

    out = tmp_path / "ray"
    assert main(_argv(src, out, tiny_model_dir, "--engine", "ray", "--workers", "2")) == 1  # the broken file
    assert _outputs(out) == expected  # bit for bit
    assert not list(out.rglob(f"*{TEMP_MARKER}*"))
    workers = {line["worker"] for line in read_records(out) if line["event"] == "image"}
    assert len(workers) == 2  # one pipeline per actor, each with its own record
    s = summarize(out)
    assert (len(s.expected), len(s.done), list(s.failed), s.missing) == (7, 6, ["broken.png"], [])
    assert s.failed["broken.png"].startswith("read:")

    # resume: delete one output; with --skip-existing only it is redone, to the same bytes
    (out / "p3.png").unlink()
    capsys.readouterr()
    assert main(_argv(src, out, tiny_model_dir, "--engine", "ray", "--workers", "1", "--skip-existing")) == 1
    assert "1 done, 5 skipped (output exists), 1 failed" in capsys.readouterr().err
    assert _outputs(out) == expected


def test_ray_engine_refuses_a_shard(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "--engine", "ray", "--shard", "0/2"]) == 2
    assert "drop --shard" in capsys.readouterr().err

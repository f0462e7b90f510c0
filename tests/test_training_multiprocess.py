"""Stage-1 training across 2 CPU processes (``accelerate launch --multi_gpu --num_processes 2 -m``-style,
gloo): the ranks end with identical weights, and the training state they wrote resumes in 1 process.

Stage 2 across 2 processes is tested in tests/test_training_stage2.py
(``test_two_processes_keep_identical_weights``); this module covers stage 1 and the 2 → 1 resume.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from codsr.testing.tiny_sd21 import TinyModelConfig, save_tiny_model
from codsr.training.run import main as train_main
from codsr.training.trainer_utils import list_states

# Runs codsr.training.run's main in each process, then dumps that rank's trainable weights.
WORKER = """
import sys
from safetensors.torch import save_file
from codsr.training.trainer import BaseTrainer
from codsr.training.run import main

OUT = sys.argv.pop(1)
train = BaseTrainer.train


def train_and_dump(self):
    result = train(self)
    tensors = {k: p.detach().cpu().contiguous() for k, p in self.trainable_parameters().items()}
    meta = {"world": str(self.world), "rank": str(self.rank), "loss": repr(result["logs"].get("loss"))}
    save_file(tensors, f"{OUT}/rank{self.rank}.safetensors", metadata=meta)
    return result


BaseTrainer.train = train_and_dump
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    model = save_tiny_model(root / "model", TinyModelConfig(unet={"layers_per_block": [0, 1]}), seed=0)
    hq = root / "hq"
    hq.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img = np.kron(rng.uniform(0, 255, size=(8, 8, 3)), np.ones((8, 8, 1)))
        img[:, 30 + i :: 7] = 255 - img[:, 30 + i :: 7]  # stripes: texture for RGPA
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(hq / f"img{i}.png")
    return root, model, hq


def _overrides(model: Path, hq: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.base_model={model}", f"data.train_hq={hq}", f"output_dir={out}", "data.crop_size=64",
            "loss.lpips_pretrained=false", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.log_every=1", "optim.lr=1e-3", *extra]  # fmt: skip


@pytest.mark.slow  # two processes start torch and build the tiny model: ~1 min on the 2-core CI machine
def test_stage1_two_processes_stay_in_sync_and_resume_in_one(setup, tmp_path):
    root, model, hq = setup
    out = tmp_path / "run"
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # codsr.training.run sets it
    src = str(Path(__file__).resolve().parents[1] / "src")
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(worker), str(tmp_path),
           "--config", "tiny/stage1", "--set",
           *_overrides(model, hq, out, "train.batch_size=1", "train.global_batch_size=2",
                       "train.gradient_accumulation_steps=null", "max_steps=2", "checkpoint.state_every=2")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    metas = []
    for r in (0, 1):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    assert [m["world"] for m in metas] == ["2", "2"]
    assert metas[0]["loss"] != metas[1]["loss"]  # each rank saw its own images
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP kept the ranks bit-identical
    moved = [k for k in ranks[0] if ".lora_B." in k and bool(ranks[0][k].abs().sum() > 0)]
    assert moved  # LoRA B starts at zero: the 2 steps trained

    states = list_states(out / "state")
    assert [p.name for p in states] == ["step-00000002"]
    meta = json.loads((states[-1] / "meta.json").read_text(encoding="utf-8"))
    assert (meta["world_size"], meta["accumulation"], meta["step"]) == (2, 1, 2)  # 1 × 1 × 2 processes = 2
    saved = load_file(str(states[-1] / "trainable.safetensors"))
    for k in ranks[0]:
        assert torch.equal(saved[k], ranks[0][k]), k

    # resume in ONE process (no launcher): starts from the 2-process weights at step 2, goes on to 3
    from codsr.training.stage1 import Stage1Trainer

    seen = {}
    original = Stage1Trainer._resume

    def spy(self):
        original(self)
        seen["step"] = self.step
        seen["weights"] = {k: p.detach().clone() for k, p in self.trainable_parameters().items()}

    Stage1Trainer._resume = spy
    try:
        code = train_main(["--config", "tiny/stage1", "--set",
                           *_overrides(model, hq, out, "train.batch_size=2", "train.global_batch_size=2",
                                       "train.gradient_accumulation_steps=null", "max_steps=3",
                                       "checkpoint.state_every=1", "resume=latest")])  # fmt: skip
    finally:
        Stage1Trainer._resume = original
    assert code == 0
    assert seen["step"] == 2
    for k in ranks[0]:
        assert torch.equal(seen["weights"][k], ranks[0][k]), k
    assert [p.name for p in list_states(out / "state")][-1] == "step-00000003"
    resumed = json.loads((list_states(out / "state")[-1] / "meta.json").read_text(encoding="utf-8"))
    assert (resumed["world_size"], resumed["step"]) == (1, 3)

"""Stage-2 trainer (TMG + VSD, docs/method.md#stage-2) on tiny random models, CPU, 64² crops.

The module fixture runs the documented chain from scratch: ``codsr make-tiny-model --grounding``
→ ``codsr train --config tiny/stage1`` (2 steps) → ``codsr masks`` with the tiny Grounding DINO /
SAM 2 → stage 2 (``codsr train --config tiny/stage2``) in the tests below.
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
from safetensors.torch import load_file

from codsr.training.config import CONFIG_DIR, ConfigError, load_config
from codsr.training.stage2 import Stage2Trainer, alignment_attn2_parameter, configure_stage2_trainable
from codsr.training.trainer_utils import list_states, read_metrics

TAGS = ["cat, black, grass", "dog, tree, green", "sky, blue, cloud", "car, road, red", "house, window, tree",
        "flower, field, yellow"]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """HR images (64², so a crop is the whole image) → tiny model → stage-1 ckpt → masks, all via the CLIs."""
    from codsr.cli import main as codsr_main
    from codsr.training.run import main as train_main

    root = tmp_path_factory.mktemp("chain")
    hr = root / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, tags in enumerate(TAGS):
        img = np.kron(rng.uniform(0, 255, size=(8, 8, 3)), np.ones((8, 8, 1)))
        img[:, 30 + i :: 7] = 255 - img[:, 30 + i :: 7]  # stripes: texture for RGPA
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(hr / f"img{i}.png")
        lines.append(f"img{i}.png\t{tags}\n")
    (root / "caps.tsv").write_text("".join(lines), encoding="utf-8")
    (root / "arch.yaml").write_text("unet: {layers_per_block: [0, 1]}\n", encoding="utf-8")
    model = root / "M"
    assert (
        codsr_main(
            ["make-tiny-model", "--out", str(model), "--grounding", "--config", str(root / "arch.yaml")]
        )
        == 0
    )
    assert train_main(["--config", "tiny/stage1", "--set", f"model.base_model={model}", f"data.train_hq={hr}",
                       "data.crop_size=64", "train.batch_size=2", "max_steps=2", f"output_dir={root / 's1'}",
                       "logging.progress_bar=false", "optim.lr=1e-3"]) == 0  # fmt: skip
    rc = codsr_main(["masks", "--data", str(hr), "--out", str(root / "masks"), "--crop", "64",
                     "--captions", str(root / "caps.tsv"), "--noun-backend", "spacy",
                     "--grounding-dino", str(model / "grounding_dino"), "--sam2", str(model / "sam2"),
                     "--device", "cpu"])  # fmt: skip
    assert rc == 0
    return {"root": root, "hr": hr, "model": model, "stage1": root / "s1" / "codsr_stage1.pkl",
            "masks": root / "masks", "caps": root / "caps.tsv"}  # fmt: skip


def overrides(chain, out, *extra: str) -> list[str]:
    return [
        f"model.base_model={chain['model']}",
        f"model.init_checkpoint={chain['stage1']}",
        f"data.train_hq={chain['hr']}",
        f"masks.dir={chain['masks']}",
        f"masks.grounding_dino={chain['model'] / 'grounding_dino'}",
        f"masks.sam2={chain['model'] / 'sam2'}",
        f"output_dir={out}",
        "logging.progress_bar=false",
        "logging.log_every=1",
        "max_steps=2",
        *extra,
    ]


def config(chain, out, *extra: str):
    return load_config("tiny/stage2", overrides(chain, out, *extra))


def snapshot(trainer) -> dict[str, torch.Tensor]:
    out = {k: p.detach().clone() for k, p in trainer.trainable_parameters().items()}
    out.update({f"fake.{k}": v for k, v in trainer.fake_score_state().items()})
    return out


# ------------------------------------------------------------------------------------ config
def test_shipped_stage2_has_the_release_hyper_parameters():
    repo = Path(__file__).resolve().parents[1]
    for name in ("stage2.yaml", "tiny/stage2.yaml"):  # configs/ links to the packaged files
        assert (repo / "configs" / name).resolve() == (CONFIG_DIR / name).resolve()
    cfg = load_config("stage2")
    assert cfg.stage == "2" and cfg.max_steps == 4000
    assert cfg.train.batch_size == 1 and cfg.train.global_batch_size == 16
    assert cfg.accumulation_steps(4) == 4 and cfg.accumulation_steps(1) == 16  # 1 × 4 × 4 GPUs
    assert cfg.optim.lr == 5e-5 and cfg.train.max_grad_norm == 1.0
    assert (cfg.train.timestep_min, cfg.train.timestep_max) == (50, 250)
    assert (cfg.loss.mse_weight, cfg.loss.lpips_weight) == (1.0, 2.0)
    assert (cfg.tmg.layers, cfg.tmg.area_weight, cfg.tmg.bce_weight) == ("first", 0.5, 0.025)
    v = cfg.vsd
    assert (v.weight, v.rank, v.guidance_scale, v.lr, v.max_grad_norm) == (2.0, 4, 7.5, 5e-5, 1.0)
    assert (v.timestep_min, v.timestep_max, v.negative_prompt) == (20, 979, None)
    assert cfg.prompts.null_text_prob == 0.2 and cfg.prompts.mode == "masks" and cfg.masks.mode == "offline"
    assert (cfg.masks.box_threshold, cfg.masks.text_threshold, cfg.masks.max_boxes) == (0.4, 0.3, 2)
    assert not cfg.gan.enabled
    paper = load_config("stage2", ["tmg.layers=all", "tmg.area_weight=1", "tmg.bce_weight=0"])
    assert (paper.tmg.layers, paper.tmg.area_weight, paper.tmg.bce_weight) == ("all", 1.0, 0.0)
    for bad, key in [("tmg.layers=last", "tmg.layers"), ("masks.mode=live", "masks.mode"),
                     ("prompts.mode=ram", "prompts.mode"), ("vsd.timestep_max=1000", "vsd.timestep_max"),
                     ("vsd.timestep_min=990", "vsd.timestep_min"), ("gan.enabled=true", "gan.enabled")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            load_config("stage2", [bad])
    with pytest.raises(ConfigError, match="'file' or 'ram'"):
        load_config("stage2", ["masks.mode=online"])  # online needs captions from a file or RAM
    with pytest.raises(ConfigError, match="stage 2 only"):
        load_config("stage1", ["prompts.mode=masks"])


# ------------------------------------------------------------------------------------ gradients
def test_gradients_reach_only_the_attn2_alignment_lora(chain, tmp_path):
    cfg = config(chain, tmp_path / "g", "loss.lpips_weight=2.0", "loss.lpips_pretrained=false",
                 "prompts.null_text_prob=0")  # fmt: skip
    trainer = Stage2Trainer(cfg)
    trainer.setup()
    gen = trainer.generator
    names = dict(gen.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    attn2 = {n.rsplit(".", 1)[0] for n in names if n.endswith(".attn2.to_q.base_layer.weight")}
    # every attn2 layer × q/k/v/out × A/B, of the alignment adapters only
    assert len(attn2) == 4 and len(trainable) == 4 * 4 * 2
    assert trainable == {n for n in names if alignment_attn2_parameter(n)}
    assert all("_alignment." in n and ".attn2." in n for n in trainable)
    assert set(trainer.trainable_parameters()) == {f"generator.{n}" for n in trainable}
    assert trainer.capture.layer_names == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]

    batch = trainer.data.next()
    assert batch["hq"].shape == (2, 3, 64, 64) and batch["masks"].shape[:2] == batch["mask_valid"].shape
    logs = trainer.train_micro_step(batch, 1)
    assert logs["tmg_masks"] >= 1 and logs["area"] > 0 and logs["bce"] > 0 and logs["lpips"] > 0
    expected = logs["mse"] + 2 * logs["lpips"] + 2 * logs["vsd"] + 0.5 * logs["area"] + 0.025 * logs["bce"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    for n, p in names.items():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    # B = 0 at init: the gradient reaches every alignment B (and no A yet)
    assert all(names[n].grad.abs().sum() > 0 for n in trainable if ".lora_B." in n)
    assert all(p.grad is None for p in trainer.text_encoder.parameters())
    fake = trainer.vsd.fake_score_parameters()
    assert fake and all(p.grad is not None for p in fake)  # the fake-score loss, accumulated
    assert all(p.grad is None for n, p in trainer.vsd.unet.named_parameters() if "lora" not in n)
    assert torch.isfinite(torch.tensor(logs["fake_score"]))
    with pytest.raises(RuntimeError, match="add_alignment_lora"):
        configure_stage2_trainable(
            type(gen)(gen.vae, type(gen.unet).from_config(gen.unet.config), gen.scheduler)
        )


def test_gradient_checkpointing_keeps_the_tmg_gradients(chain, tmp_path):
    """Paper variant (TMG over all attn2 layers): the same gradients with UNet checkpointing."""
    cfg = config(chain, tmp_path / "c", "vsd.weight=0", "prompts.null_text_prob=0", "tmg.layers=all")
    trainer = Stage2Trainer(cfg)
    trainer.setup()
    assert len(trainer.capture.layer_names) == 4
    batch = trainer.data.next()
    streams = trainer.rng.state_dict()
    params = trainer.trainable_parameters()

    def grads():
        trainer.rng.load_state_dict(streams)
        trainer.optimizer.zero_grad(set_to_none=True)
        logs = trainer.train_micro_step(batch, 1)
        return logs, {k: p.grad.clone() for k, p in params.items()}

    logs_a, plain = grads()
    trainer.generator.unet.enable_gradient_checkpointing()
    assert trainer.generator.unet.is_gradient_checkpointing
    logs_b, ckpt = grads()
    assert logs_a["area"] > 0 and logs_b["area"] == pytest.approx(logs_a["area"], rel=1e-6)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-7, rtol=1e-5, msg=k)
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        Stage2Trainer(config(chain, tmp_path / "m", f"model.init_checkpoint={tmp_path / 'none.pkl'}")).setup()


def test_area_loss_falls_when_only_the_attention_is_trained(chain, tmp_path):
    """Fixed batch, masks and noise; loss = L_area only: the attn2 alignment LoRA learns to put
    each noun's attention inside its mask."""
    cfg = config(chain, tmp_path / "a", "loss.mse_weight=0", "vsd.weight=0", "tmg.bce_weight=0",
                 "tmg.area_weight=1", "optim.lr=5e-2", "prompts.null_text_prob=0", "data.flip=false")  # fmt: skip
    trainer = Stage2Trainer(cfg)
    trainer.setup()
    assert trainer.vsd is None
    batch = trainer.data.next()
    trainer.data.next = lambda: batch
    streams = trainer.rng.state_dict()
    areas = []
    for _ in range(10):
        trainer.rng.load_state_dict(streams)
        areas.append(trainer.optimizer_step()["area"])
    # 0.0507 → 0.0292 measured; the masks cover most of each image and the first attn2 map is 4×4
    assert areas[-1] < 0.65 * areas[0], areas
    assert all(b < a for a, b in zip(areas, areas[1:], strict=False)), areas


def test_stage1_records_its_base_and_stage2_warns_on_another(chain, tmp_path):
    import shutil
    import warnings

    from codsr.training.provenance import BaseModelMismatchWarning, read_provenance, sidecar_path

    # stage 1 (run by the chain fixture through the CLI) wrote its base beside the checkpoint
    meta = read_provenance(chain["stage1"])
    assert sidecar_path(chain["stage1"]).is_file()
    assert meta["base_model"] == str(chain["model"]) and meta["training_stage"] == 1
    # same base: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        Stage2Trainer(config(chain, tmp_path / "same", "vsd.weight=0")).build_models()
    # a different base folder (an identical copy is still another base): one warning naming both
    other = tmp_path / "other_base"
    shutil.copytree(chain["model"], other)
    with pytest.warns(BaseModelMismatchWarning) as caught:
        Stage2Trainer(config(chain, tmp_path / "o", "vsd.weight=0", f"model.base_model={other}")).build_models()
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(chain["model"]) in msg and str(other) in msg and "model.base_model" in msg


def test_null_text_dropout_drops_the_masks_with_the_caption(chain, tmp_path):
    trainer = Stage2Trainer(config(chain, tmp_path / "n", "prompts.null_text_prob=1.0", "vsd.weight=0"))
    trainer.setup()
    batch = trainer.data.next()
    assert batch["prompt"] == ["", ""] and batch["caption"] == ["", ""] and not batch["mask_valid"].any()
    logs = trainer.train_micro_step(batch, 1)
    assert logs["tmg_masks"] == 0 and logs["area"] == 0.0 and logs["bce"] == 0.0


# ------------------------------------------------------------------------------------ online masks
def test_online_masks_equal_the_precomputed_ones(chain, tmp_path):
    """masks.mode=online: Grounded-SAM2 on each HQ crop in the loop gives what `codsr masks` stored."""
    from codsr.stage2.masks import load_masks, read_sidecar

    cfg = config(chain, tmp_path / "o", "masks.mode=online", "prompts.mode=file", f"prompts.file={chain['caps']}",
                 "prompts.null_text_prob=0", "data.flip=false", "vsd.weight=0")  # fmt: skip
    trainer = Stage2Trainer(cfg)
    trainer.setup()
    batch = trainer.data.next()
    assert "masks" not in batch
    prompts, nouns, masks, valid, mlogs = trainer.batch_conditioning(batch, batch["hq"])
    assert mlogs["masks_failed"] == 0 and mlogs["masks_ok"] == sum(len(n) for n in nouns) > 0
    for b, path in enumerate(batch["path"]):
        key = os.path.basename(path)
        meta = read_sidecar(chain["masks"], key)
        assert prompts[b] == meta["caption"] and nouns[b] == meta["nouns"]
        stored, ok = load_masks(chain["masks"], key, meta)
        n = len(meta["nouns"])
        assert torch.equal(masks[b, :n], torch.from_numpy(stored)) and valid[b, :n].tolist() == ok.tolist()
        assert not valid[b, n:].any()
    logs = trainer.train_micro_step(batch, 1)
    assert logs["tmg_masks"] == int(valid.sum()) and logs["masks_ok"] == mlogs["masks_ok"]


# ------------------------------------------------------------------------------------ CLI, export, pipeline
def test_cli_writes_a_release_stage2_checkpoint_that_the_pipeline_loads(chain, tmp_path):
    from codsr.pipeline.pipeline import CODSRPipeline
    from codsr.training.run import main

    out = tmp_path / "cli"
    assert main(["--config", "tiny/stage2", "--set", *overrides(chain, out, "checkpoint.every=1")]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "codsr_stage2_step000001.pkl", "codsr_stage2_step000001.pkl.json",
        "codsr_stage2_step000002.pkl", "codsr_stage2_step000002.pkl.json"]  # fmt: skip
    meta = json.loads((out / "codsr_stage2.pkl.json").read_text(encoding="utf-8"))
    assert (meta["base_model"], meta["training_stage"], meta["init_checkpoint"]) == (
        str(chain["model"]), 2, str(chain["stage1"]))  # fmt: skip
    release = torch.load(out / "codsr_stage2.pkl", weights_only=True)
    groups = ("encoder", "decoder", "others")
    assert set(release) == {"rank_vae", "vae_lora_encoder_modules", "state_dict_vae", "rank_unet",
                            "state_dict_unet", "state_dict_sft",
                            *(f"unet_lora_{g}_modules_{s}" for g in groups for s in ("default", "sam"))}  # fmt: skip
    stage1 = torch.load(chain["stage1"], weights_only=True)
    unet = release["state_dict_unet"]
    trained = load_file(str(list_states(out / "state")[-1] / "trainable.safetensors"))
    n_attn2_b = 0
    for key, value in unet.items():
        if "_alignment." not in key:  # stage 1 frozen: bit-identical to the stage-1 checkpoint
            assert torch.equal(value, stage1["state_dict_unet"][key]), key
        elif ".lora_B." in key and ".attn2." not in key:
            assert not value.any(), key  # alignment B stays zero off attn2
        elif ".lora_B." in key:
            n_attn2_b += 1
            assert value.abs().sum() > 0, key  # trained away from B = 0
            assert torch.equal(value, trained[f"generator.unet.{key}"])
    assert n_attn2_b == 4 * 4
    for part in ("state_dict_vae", "state_dict_sft"):
        assert all(torch.equal(v, stage1[part][k]) for k, v in release[part].items()) and release[part]
    metrics = [m for m in read_metrics(out / "logs" / "metrics.jsonl") if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train/vsd"]) and np.isfinite(m["train/area"]) for m in metrics)

    # the pipeline (merged LoRA, both families) restores like the trainer's unmerged adapters
    trainer = Stage2Trainer(load_config(out / "config.yaml", ["resume=latest"]))
    trainer.setup()
    assert trainer.step == 2
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = trainer.restore(lq, 100, seed=7)
    assert trainer.capture.maps == {}  # validation records no attention
    # tagger=None: prompt-free, as the trainer restores
    pipe = CODSRPipeline.from_pretrained(chain["model"], out / "codsr_stage2.pkl", device="cpu", tagger=None)
    theirs = pipe.restore(lq, prompt="", timestep=100, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)
    # tagger=None: prompt-free, as the trainer restores
    pipe1 = CODSRPipeline.from_pretrained(chain["model"], chain["stage1"], device="cpu", tagger=None)
    before = pipe1.restore(lq, prompt="", timestep=100, generator=torch.Generator().manual_seed(7))
    assert (before - theirs).abs().max() > 1e-5  # the alignment LoRA changed the output


# ------------------------------------------------------------------------------------ resume
@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_resume_reproduces_the_uninterrupted_run(chain, tmp_path):
    """Accumulation 2 (fake-score gradients accumulated too): 2 steps == 1 step + resume + 1 step,
    bit for bit for the alignment LoRA and the VSD fake-score LoRA."""
    extra = ["train.batch_size=1", "train.gradient_accumulation_steps=2", "checkpoint.state_every=1"]
    straight = Stage2Trainer(config(chain, tmp_path / "a", *extra))
    straight.train()
    first = Stage2Trainer(config(chain, tmp_path / "b", *extra, "max_steps=1"))
    first.train()
    resumed = Stage2Trainer(config(chain, tmp_path / "b", *extra, "resume=latest"))
    assert resumed.train()["step"] == 2 and resumed.resumed_from.name == "step-00000001"
    a, b, mid = snapshot(straight), snapshot(resumed), snapshot(first)
    assert a.keys() == b.keys() and any(k.startswith("fake.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))
    assert all(
        any(not torch.equal(a[k], mid[k]) for k in a if k.startswith(p)) for p in ("fake.", "generator.")
    )


# ------------------------------------------------------------------------------------ two processes
WORKER = """
import sys
from safetensors.torch import save_file
import codsr.training.stage2 as stage2
from codsr.training.run import main

OUT = sys.argv.pop(1)
train = stage2.Stage2Trainer.train


def train_and_dump(self):
    result = train(self)
    tensors = {k: p.detach().cpu().contiguous() for k, p in self.trainable_parameters().items()}
    tensors.update({"fake." + k: v.contiguous() for k, v in self.fake_score_state().items()})
    meta = {"world": str(self.world), "loss": repr(result["logs"]["loss"])}
    save_file(tensors, f"{OUT}/rank{self.rank}.safetensors", metadata=meta)
    return result


stage2.Stage2Trainer.train = train_and_dump
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_two_processes_keep_identical_weights(chain, tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): the ranks see different
    data, yet DDP (alignment LoRA) and the explicit all-reduce (fake-score LoRA) keep them equal."""
    from safetensors import safe_open

    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # codsr.training.run sets it
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(worker), str(tmp_path),
           "--config", "tiny/stage2", "--set",
           *overrides(chain, tmp_path / "ddp", "train.batch_size=1", "train.global_batch_size=4",
                      "train.gradient_accumulation_steps=null", "max_steps=2", "prompts.null_text_prob=0")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    metas = []
    for r in (0, 1):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    assert [m["world"] for m in metas] == ["2", "2"]
    assert metas[0]["loss"] != metas[1]["loss"]  # different data on each rank
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("fake.") for k in ranks[0])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    moved = [
        k for k in ranks[0] if ".lora_B." in k and not torch.equal(ranks[0][k], torch.zeros_like(ranks[0][k]))
    ]
    assert any(k.startswith("generator.") for k in moved)
    meta = (list_states(tmp_path / "ddp" / "state")[-1] / "meta.json").read_text()
    assert '"world_size": 2' in meta and '"accumulation": 2' in meta  # 1 × 2 accumulation × 2 processes = 4

    # The state the 2 processes wrote resumes in ONE process (accumulation 4 keeps the global batch of 4),
    # starting from exactly the weights both ranks ended with.
    seen = {}
    original = Stage2Trainer._resume

    def spy(self):
        original(self)
        seen.update({k: p.detach().clone() for k, p in self.trainable_parameters().items()})

    monkeypatch.setattr(Stage2Trainer, "_resume", spy)
    resumed = Stage2Trainer(config(chain, tmp_path / "ddp", "train.batch_size=1", "train.global_batch_size=4",
                                   "train.gradient_accumulation_steps=null", "max_steps=3",
                                   "prompts.null_text_prob=0", "resume=latest"))  # fmt: skip
    assert resumed.train()["step"] == 3 and resumed.resumed_from.name == "step-00000002"
    assert seen and seen.keys() == {k for k in ranks[0] if not k.startswith("fake.")}
    for k, v in seen.items():
        assert torch.equal(v.cpu(), ranks[0][k]), k

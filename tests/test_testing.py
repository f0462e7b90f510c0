"""codsr.testing: the tiny SD 2.1 builder, the tiny release model, tiny Grounding DINO/SAM 2, `codsr make-tiny-model`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from codsr.model.checkpoint import load_checkpoint
from codsr.model.lora import lora_delta, unet_lora_target_modules, vae_lora_target_modules
from codsr.testing.grounding import save_tiny_grounding_models
from codsr.testing.release import BASE_NOISE_STD, build_tiny_release, save_tiny_release, tiny_pipeline
from codsr.testing.tiny_sd21 import (
    TinyModelConfig,
    build_tiny_components,
    byte_level_vocab,
    bytes_to_unicode,
    save_tiny_model,
)

SMALL = TinyModelConfig(unet={"layers_per_block": [0, 1]})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", SMALL, seed=0)


def test_byte_level_vocab_layout():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == "Ā"
    vocab = byte_level_vocab()
    assert len(vocab) == 514
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 256 + 64
    assert vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
    assert sorted(vocab.values()) == list(range(514))


def test_saved_folder_loads_as_sd21_base(tiny_dir):
    from codsr.model.base import load_base_components

    comps = load_base_components(tiny_dir)
    assert comps.unet.conv_in.out_channels == 320
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size == 32
    assert comps.vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        moments = comps.vae.quant_conv(comps.vae.encoder(torch.zeros(1, 3, 64, 48)))
    assert moments.shape == (1, 8, 8, 6)  # ×8 downsampling, 4 latent channels (mean + logvar)
    assert float(comps.scheduler.alphas_cumprod[100]) == pytest.approx(0.8942232, abs=1e-6)
    assert (
        comps.scheduler.config.beta_schedule == "scaled_linear" and comps.scheduler.config.steps_offset == 1
    )
    tok = comps.tokenizer
    ids = tok(["ab, c", ""], max_length=77, padding="max_length", truncation=True).input_ids
    # BOS, a, b</w>, ,</w>, c</w>, EOS, then "!" (id 0) padding as in SD 2.1
    assert ids[0][:7] == [512, 64, 256 + 65, 256 + 11, 256 + 66, 513, 0]
    assert ids[1][:3] == [512, 513, 0] and len(ids[0]) == 77
    emb = comps.text_encoder(torch.tensor(ids))[0]
    assert emb.shape == (2, 77, 32)


def test_seeded_weights_are_reproducible(tiny_dir):
    again = build_tiny_components(SMALL, seed=0)
    other = build_tiny_components(SMALL, seed=1)
    saved = load_file(str(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(again["unet"].state_dict()[key], saved[key])
    assert not torch.equal(other["unet"].state_dict()[key], saved[key])


def test_config_validation_and_overwrite_guard(tiny_dir):
    with pytest.raises(ValueError, match="320"):
        TinyModelConfig(unet={"block_out_channels": [64, 64]}).unet_kwargs()
    with pytest.raises(ValueError, match="unknown tiny-model config keys"):
        TinyModelConfig.from_dict({"unett": {}})
    with pytest.raises(FileExistsError, match="not empty"):
        save_tiny_model(tiny_dir)


def test_make_tiny_model_command(tmp_path, capsys):
    from codsr.cli import main

    cfg = tmp_path / "arch.yaml"
    cfg.write_text("unet:\n  layers_per_block: [0, 1]\ntext_encoder:\n  num_hidden_layers: 1\n")
    argv = ["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "3", "--config", str(cfg)]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir()
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_codsr_tiny"] == {"seed": 3}
    unet = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    assert unet["layers_per_block"] == [0, 1] and unet["block_out_channels"] == [320, 64]
    assert main(argv) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("unett: {}\n")
    assert main(["make-tiny-model", "--out", str(tmp_path / "b"), "--config", str(bad)]) == 2
    assert "unknown tiny-model config keys ['unett']" in capsys.readouterr().err


# ------------------------------------------------------------------ the tiny release model
@pytest.fixture(scope="module")
def release():
    return build_tiny_release(seed=0)


def _delta(ckpt, name, adapter):
    a = ckpt.unet_lora[f"{name}.lora_A.{adapter}.weight"]
    b = ckpt.unet_lora[f"{name}.lora_B.{adapter}.weight"]
    return lora_delta(a, b)


def test_synthetic_checkpoint_has_the_release_layout(release, tmp_path):
    comps, ckpt = release
    assert (ckpt.stage, ckpt.rank_vae, ckpt.rank_unet) == (2, 4, 16)
    assert ckpt.vae_lora_modules == vae_lora_target_modules(comps["vae"])
    assert ckpt.unet_lora_modules == unet_lora_target_modules(comps["unet"])
    # stage-1 adapters are non-zero everywhere; alignment adapters only on cross-attention
    for group in ("encoder", "decoder", "others"):
        for name in ckpt.unet_lora_modules[group]:
            assert _delta(ckpt, name, f"default_{group}").abs().max() > 0, name
            align = _delta(ckpt, name, f"default_{group}_alignment").abs().max()
            assert (align > 0) == (".attn2." in name), name
    assert any(".attn2." in n for n in ckpt.unet_lora_modules["others"])
    assert all(v.abs().max() > 0 for v in ckpt.sft.values())
    assert torch.equal(ckpt.unet_extra["conv_in.base_layer.weight"], comps["unet"].conv_in.weight)
    # the release dict round-trips through torch.load(weights_only=True)
    path = ckpt.save(tmp_path / "c.pkl", format="release")
    raw = torch.load(path, weights_only=True)
    assert raw["rank_unet"] == 16 and "unet_lora_others_modules_sam" in raw
    again = load_checkpoint(path)
    assert again.unet_lora.keys() == ckpt.unet_lora.keys()
    assert all(torch.equal(again.unet_lora[k], v) for k, v in ckpt.unet_lora.items())


def test_base_weights_are_perturbed_and_seeded(release):
    comps, ckpt = release
    fresh = build_tiny_components(seed=0)
    diff = (comps["unet"].conv_out.weight - fresh["unet"].conv_out.weight).detach()
    assert abs(float(diff.std()) - BASE_NOISE_STD) < 2e-3
    comps2, ckpt2 = build_tiny_release(seed=0)
    assert torch.equal(comps2["vae"].encoder.conv_in.weight, comps["vae"].encoder.conv_in.weight)
    assert all(torch.equal(ckpt2.sft[k], v) for k, v in ckpt.sft.items())
    comps3, ckpt3 = build_tiny_release(seed=1)
    assert not torch.equal(comps3["vae"].encoder.conv_in.weight, comps["vae"].encoder.conv_in.weight)


def test_tiny_pipeline_merges_the_checkpoint(release):
    comps, ckpt = release
    pipe = tiny_pipeline(seed=0)
    # W = W0 + (8/16)·ΔW(stage 1) + (8/16)·ΔW(alignment), by hand for one cross-attention projection
    name = next(n for n in ckpt.unet_lora_modules["others"] if n.endswith("attn2.to_k"))
    w0 = dict(comps["unet"].named_modules())[name].weight
    expect = w0 + 0.5 * _delta(ckpt, name, "default_others") + 0.5 * _delta(ckpt, name, "default_others_alignment")
    merged = dict(pipe.generator.unet.named_modules())[name].weight
    torch.testing.assert_close(merged, expect, rtol=0, atol=1e-6)
    assert (merged - w0).abs().max() > 1e-3


def test_saved_release_equals_the_in_memory_pipeline(tiny_pipeline, tiny_model_dir):
    from codsr import CODSRPipeline

    assert sorted(p.name for p in tiny_model_dir.iterdir()) == ["codsr_tiny.pkl", "tiny-sd21"]
    loaded = CODSRPipeline.from_pretrained(
        tiny_model_dir / "tiny-sd21", tiny_model_dir / "codsr_tiny.pkl", device="cpu", torch_dtype=torch.float32
    )
    lq = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = tiny_pipeline.restore(lq, prompt="a cat", generator=torch.Generator().manual_seed(1))
    b = loaded.restore(lq, prompt="a cat", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = tiny_pipeline.restore(lq, prompt="a cat", generator=torch.Generator().manual_seed(2))
    assert (a - c).abs().max() > 1e-2  # the noise matters: the model is not degenerate
    assert a.min() >= -1 and a.max() <= 1 and float(a.std()) > 0.05


def test_save_tiny_release_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "tiny-sd21").mkdir()
    (tmp_path / "tiny-sd21" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_tiny_release(tmp_path)


# ------------------------------------------------------------------ tiny Grounding DINO / SAM 2
def test_grounding_builder_validates_sizes(tmp_path):
    with pytest.raises(ValueError, match="exceed 64"):
        save_tiny_grounding_models(tmp_path, detector_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        save_tiny_grounding_models(tmp_path, sam_size=100)

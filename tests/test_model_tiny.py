"""Tiny random SD-2.1-like model builder (codsr.model.tiny) and `codsr make-tiny-model`."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from codsr.model.tiny import (
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
    from codsr.training import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    cfg = tmp_path / "arch.yaml"
    cfg.write_text("unet:\n  layers_per_block: [0, 1]\ntext_encoder:\n  num_hidden_layers: 1\n")
    args = parser.parse_args(
        ["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "3", "--config", str(cfg)]
    )
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir()
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert args.func(args) == 2  # refuses to overwrite

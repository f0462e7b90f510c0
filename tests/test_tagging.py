"""codsr.tagging: RAM Swin-L / DAPE tagger, file layouts, tag rule and CLI.

Weights are the seeded rule of :mod:`codsr.testing.ram`, written once per module in the two real
file layouts (``{'model': sd}`` RAM file, flat DAPE file). The logits the authors' tagger computes
from those weights are in the release-parity RAM fixture (``ram``: ``reference.npz``, 4.3 MB, kept
out of git); the tests comparing against them skip where it is absent, naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codsr.tagging import cli
from codsr.tagging.cache import TagCache, cached_tags
from codsr.tagging.convert import (
    CheckpointError,
    load_tagger_state_dict,
    merge_dape,
    ram_to_model_state_dict,
    read_dape_file,
    read_ram_file,
)
from codsr.tagging.hub import HubFile, parse_hub_ref, resolve_weight
from codsr.tagging.tagger import IMAGENET_MEAN, IMAGENET_STD, RAMTagger, preprocess
from codsr.tagging.taglist import class_thresholds, tag_list, tags_from_logits
from conftest import FIXTURES, REPO

TOL = 2e-5  # fixture README: recommended atol on CPU fp32
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ref(ram_fixture_dir: Path) -> dict[str, np.ndarray]:
    """The RAM fixture's reference arrays (logits of the authors' tagger on the rule weights)."""
    with np.load(ram_fixture_dir / "reference.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def rule_files(tmp_path_factory):
    """Rule weights written as ram_swin_large_14m.pth / DAPE.pth layouts (0.85 GB)."""
    from codsr.testing.ram import write_rule_files

    files = write_rule_files(tmp_path_factory.mktemp("ram_rule"))
    yield files
    for path in files.values():  # 0.85 GB: do not leave it in pytest's kept temp folders
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ram_tagger(rule_files) -> RAMTagger:
    return RAMTagger.from_pretrained(rule_files["ram"], device="cpu", torch_dtype=torch.float32)


def _sha16(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().astype("<f4").tobytes()).hexdigest()[:16]


def test_rule_weights_match_the_fixture_anchors():
    """First values and sha256 of the anchor draws listed in the RAM fixture's README (seed 2026)."""
    from codsr.testing.ram import dape_rule_state_dict, dape_shapes, ram_shapes

    assert len(ram_shapes()) == 366 and len(dape_shapes()) == 248
    dape = dape_rule_state_dict()
    for key, first, sha in (
        ("tag_encoder.encoder.layer.0.attention.self.key.lora_A", -0.01256430521607399, "a5d65feb100cb5b8"),
        ("tag_encoder.encoder.layer.0.attention.self.key.lora_B", 0.0, "de676bae28a48001"),
        ("tagging_head.encoder.layer.0.crossattention.self.key.lora_B", 0.039061639457941055, "30a324401c52d823"),
        ("visual_encoder.layers.3.blocks.1.attn.qkv.lora_B", 0.044509246945381165, "7a56dacc682f781c"),
    ):
        assert float(dape[key].flatten()[0]) == first and _sha16(dape[key]) == sha, key
    tied = dape_rule_state_dict(tied_variant=True)
    changed = sorted(k for k in dape if not torch.equal(dape[k], tied[k]))
    assert changed == [f"tag_encoder.encoder.layer.{i}.crossattention.self.{p}.lora_B"
                       for i in (0, 1) for p in ("key", "query")]  # fmt: skip


def test_ram_rule_weights_match_the_fixture_anchors(rule_files):
    ram = read_ram_file(rule_files["ram"])
    for key, first, sha in (
        ("fc.bias", 0.007310915272682905, "4c9fc9c5bf2ce854"),
        ("fc.weight", -0.0011346051469445229, "d09febe82ead6147"),
        ("image_proj.bias", 0.03303154557943344, "d7bcecb9393d2f17"),
        ("wordvec_proj.bias", 0.0019472477724775672, "19e138b4c5a8099b"),
        ("wordvec_proj.weight", 0.007913251407444477, "0534aa5ab4a6f017"),  # the last of 366 draws
    ):
        assert float(ram[key].flatten()[0]) == first and _sha16(ram[key]) == sha, key


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]


def test_rule_weights_equal_the_fixture_tensors(rule_files, ram_fixture_dir):
    """Every tensor's sha256 equals the one the RAM fixture lists (keys_ram.tsv / keys_dape.tsv, in draw order)."""
    ram = read_ram_file(rule_files["ram"])
    rows = _tsv_rows(ram_fixture_dir / "keys_ram.tsv")
    assert [r["key"] for r in rows] == sorted(ram)
    assert all(hashlib.sha256(ram[r["key"]].numpy().astype("<f4").tobytes()).hexdigest() == r["sha256_f32le"]
               for r in rows)  # fmt: skip
    del ram
    rows = _tsv_rows(ram_fixture_dir / "keys_dape.tsv")
    for name, column in (("dape", "sha256_f32le"), ("dape_tied", "tied_variant_sha256_f32le")):
        dape = read_dape_file(rule_files[name])
        assert [r["key"] for r in rows] == sorted(dape)
        assert all(_sha16(dape[r["key"]]) == r[column][:16] for r in rows), name


def _capture(module: torch.nn.Module, fn):
    """Run ``fn()`` and return its result plus the concatenated outputs of ``module``."""
    outputs = []
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o.detach().float().clone()))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, torch.cat(outputs)


def _check_against_reference(logits: torch.Tensor, ref, case: str) -> None:
    assert logits.dtype == torch.float32 and logits.shape == (2, 4585)
    diff = np.abs(logits.numpy() - ref[f"logits_{case}"]).max()
    assert diff <= TOL, f"{case}: max |logit diff| {diff:.3g}"
    on = 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64))) > ref["class_threshold"]
    np.testing.assert_array_equal(on, ref[f"targets_{case}"].astype(bool))
    for i in range(2):
        np.testing.assert_array_equal(np.flatnonzero(on[i]), ref[f"tag_idx_{case}_{i}"])
    assert tags_from_logits(logits) == [str(s) for s in ref[f"tags_{case}"]]


# ------------------------------------------------------------------- parity with the release


@pytest.mark.slow
def test_ram_only_logits_embeds_and_tags_match_release(ram_tagger, ref):
    x = torch.from_numpy(ref["inputs"])
    logits, embeds = _capture(ram_tagger.model.image_proj, lambda: ram_tagger.logits(x))
    assert np.abs(embeds.numpy() - ref["image_embeds_ram"]).max() <= TOL
    _check_against_reference(logits, ref, "ram")
    assert ram_tagger.name == "ram"


@pytest.mark.slow
def test_ram_plus_dape_logits_embeds_and_tags_match_release(rule_files, ref):
    tagger = RAMTagger.from_pretrained(rule_files["ram"], dape_path=rule_files["dape"])
    x = torch.from_numpy(ref["inputs"])
    logits, embeds = _capture(tagger.model.image_proj, lambda: tagger.logits(x))
    assert np.abs(embeds.numpy() - ref["image_embeds_dape"]).max() <= TOL
    _check_against_reference(logits, ref, "dape")
    assert tagger.name == "ram+dape"


@pytest.mark.slow
def test_tied_dape_variant_from_01_images_batched_and_bf16(rule_files, ref):
    """Tied tag-encoder deltas are merged like the release; tags() does the release preprocessing."""
    with pytest.raises(
        CheckpointError,
        match=r"tag_encoder\.encoder\.layer\.[01]\.crossattention\.self\.(query|key)\.lora_B is non-zero",
    ):
        load_tagger_state_dict(rule_files["ram"], rule_files["dape_tied"], merge_tied=False)

    tagger = RAMTagger.from_pretrained(rule_files["ram"], dape_path=rule_files["dape_tied"])
    x = torch.from_numpy(ref["inputs"])
    images01 = x * STD + MEAN  # 384² RGB in [0, 1]: the resize is the identity
    tags, logits = _capture(tagger.model.fc, lambda: tagger(images01, batch_size=1))
    _check_against_reference(logits.squeeze(-1), ref, "dape_tied")
    assert tags == [str(s) for s in ref["tags_dape_tied"]]

    tagger.to(torch.bfloat16)  # the .to() path the pipeline uses; thresholds must stay float32
    assert tagger.dtype == torch.bfloat16 and tagger.thresholds.dtype == torch.float32
    low = tagger.logits(x[1:])
    assert low.dtype == torch.float32
    assert np.abs(low.numpy() - ref["logits_dape_tied"][1:]).max() < 0.15


# --------------------------------------------------------------------- preprocessing, tag rule


def test_preprocess_is_bilinear_without_antialias_then_imagenet_normalised():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 768, 768, generator=g)
    # Halving with bilinear, align_corners=False, no antialias samples between pixel pairs: the 2x2 mean.
    expected = (x.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2)) - MEAN) / STD
    torch.testing.assert_close(preprocess(x), expected, atol=2e-6, rtol=0)
    assert preprocess(x[0]).shape == (1, 3, 384, 384)
    with pytest.raises(ValueError, match="RGB"):
        preprocess(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="255"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))

    array = (torch.rand(384, 384, 3, generator=g) * 255).to(torch.uint8).numpy()
    from_pil = preprocess([Image.fromarray(array), Image.fromarray(array).convert("L")])
    to_tensor = torch.from_numpy(array).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    torch.testing.assert_close(from_pil[:1], (to_tensor - MEAN) / STD, atol=0, rtol=0)
    gray = from_pil[1:] * STD + MEAN  # grayscale -> 3 equal channels
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=1e-6, rtol=0)


def test_thresholds_and_tag_list_are_the_shipped_release_files():
    thresholds = class_thresholds()
    assert thresholds.dtype == torch.float32 and thresholds.shape == (4585,)
    assert int((thresholds == 1.0).sum()) == 10
    data = REPO / "src" / "codsr" / "tagging" / "data"
    # sha256 of the release's ram_tag_list.txt / ram_tag_list_threshold.txt (RAM fixture's meta)
    assert (
        hashlib.sha256((data / "ram_tag_list.txt").read_bytes()).hexdigest()
        == "5d96d2f7225527480ad773aaac76b6e5c08a18adf6eae9ca7d2ab923d5e7bd8b"
    )
    assert (
        hashlib.sha256((data / "ram_tag_list_threshold.txt").read_bytes()).hexdigest()
        == "b6f81d0de1bc7f9c251af512c413eae976c77dbfbadf700d4e3d90510f4c6447"
    )
    for name in ("LICENSE.recognize-anything", "NOTICE.recognize-anything.txt"):
        assert (data / name).is_file()
    assert tag_list()[0] == "3D CG rendering" and len(tag_list()) == 4585
    logits = torch.full((1, 4585), -20.0)
    logits[0, [7, 2]] = 20.0  # class order, not logit order
    assert tags_from_logits(logits) == [f"{tag_list()[2]}, {tag_list()[7]}"]


def test_thresholds_equal_the_ones_the_release_used(ref):
    np.testing.assert_array_equal(class_thresholds().numpy(), ref["class_threshold"])


# --------------------------------------------------------------------------- file layouts


def test_ram_key_mapping_ignores_off_path_keys_and_renames_legacy_names(rule_files):
    sd = read_ram_file(rule_files["ram"])
    base = ram_to_model_state_dict(sd)
    assert len(base) == 366
    # Original Swin downsamples at the end of stage i, timm at the start of stage i+1.
    assert (
        base["visual_encoder.layers.2.downsample.reduction.weight"]
        is sd["visual_encoder.layers.1.downsample.reduction.weight"]
    )
    full = {k.replace("tagging_head.", "vision_multi."): v for k, v in sd.items()}
    full.update({
        "visual_encoder.layers.0.blocks.0.attn.relative_position_index": torch.zeros(144, 144, dtype=torch.long),
        "visual_encoder.layers.0.blocks.1.attn_mask": torch.zeros(64, 144, 144),
        "visual_encoder.layers.0.blocks.0.condition_attention.0.weight": torch.zeros(3),
        "tag_encoder.encoder.layer.0.crossattention.self.query.weight": torch.zeros(768, 768),
        "text_decoder.cls.predictions.bias": torch.zeros(30524),
    })  # fmt: skip
    converted = ram_to_model_state_dict(full)
    assert converted.keys() == base.keys() and all(converted[k] is base[k] for k in base)

    missing = dict(sd)
    del missing["visual_encoder.layers.1.downsample.reduction.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing key 'visual_encoder\.layers\.1\.downsample\.reduction\.weight'"
    ):
        ram_to_model_state_dict(missing, source="ram.pth")
    extra = dict(sd, **{"visual_encoder.layers.0.blocks.0.attn.gate.weight": torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'visual_encoder\.layers\.0\.blocks\.0\.attn\.gate\.weight'"
    ):
        ram_to_model_state_dict(extra)
    bad = dict(
        sd, **{"visual_encoder.layers.3.blocks.1.attn.relative_position_bias_table": torch.zeros(169, 48)}
    )
    with pytest.raises(CheckpointError, match="not resampled"):
        ram_to_model_state_dict(bad)


def test_ram_file_errors_name_the_file_and_key(tmp_path, rule_files):
    partial = tmp_path / "partial.pth"
    torch.save({"model": {"label_embed": torch.zeros(4585, 512)}}, partial)
    with pytest.raises(
        CheckpointError, match=r"partial\.pth: missing key 'visual_encoder\.patch_embed\.proj\.weight'"
    ):
        load_tagger_state_dict(partial)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="not a RAM checkpoint"):
        read_ram_file(other)
    with pytest.raises(CheckpointError, match="LoRA file"):
        read_ram_file(rule_files["dape"])
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_ram_file(pickled)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_ram_file(tmp_path / "nowhere.pth")


def test_lora_merge_rule_on_small_weights():
    """W + (B @ A)/8; Swin qkv: q rows from A[:8]/B[:C], v rows from A[8:]/B[C:], k rows untouched."""
    g = torch.Generator().manual_seed(1)
    c = 4
    w_qkv, w_q = torch.randn(3 * c, c, generator=g), torch.randn(768, 768, generator=g)
    qkv, q = (
        "visual_encoder.layers.0.blocks.0.attn.qkv",
        "tagging_head.encoder.layer.0.crossattention.self.query",
    )
    te_q = "tag_encoder.encoder.layer.0.crossattention.self.query"
    a2, b2 = torch.randn(16, c, generator=g), torch.randn(2 * c, 8, generator=g)
    a, b = torch.randn(8, 768, generator=g), torch.randn(768, 8, generator=g)
    a_te, b_te = torch.randn(8, 768, generator=g), torch.randn(768, 8, generator=g)
    model_sd = {qkv + ".weight": w_qkv, q + ".weight": w_q, "fc.weight": torch.ones(1, 768)}
    dape = {qkv + ".lora_A": a2, qkv + ".lora_B": b2, q + ".lora_A": a, q + ".lora_B": b,
            te_q + ".lora_A": a_te, te_q + ".lora_B": b_te,
            "text_decoder.bert.encoder.layer.3.attention.self.key.lora_A": torch.ones(8, 768)}  # fmt: skip
    merged = merge_dape(model_sd, dape)
    torch.testing.assert_close(merged[qkv + ".weight"][:c], w_qkv[:c] + b2[:c] @ a2[:8] / 8)
    assert torch.equal(merged[qkv + ".weight"][c : 2 * c], w_qkv[c : 2 * c])
    torch.testing.assert_close(merged[qkv + ".weight"][2 * c :], w_qkv[2 * c :] + b2[c:] @ a2[8:] / 8)
    torch.testing.assert_close(merged[q + ".weight"], w_q + (b @ a + b_te @ a_te) / 8)
    assert merged["fc.weight"] is model_sd["fc.weight"] and torch.equal(
        model_sd[q + ".weight"], w_q
    )  # no in-place edit
    with pytest.raises(CheckpointError, match="non-zero"):
        merge_dape(model_sd, dape, merge_tied=False)
    zero_te = dict(dape, **{te_q + ".lora_B": torch.zeros(768, 8)})
    torch.testing.assert_close(
        merge_dape(model_sd, zero_te, merge_tied=False)[q + ".weight"], w_q + b @ a / 8
    )

    with pytest.raises(CheckpointError, match=r"missing key '.*self\.query\.lora_B'"):
        merge_dape(model_sd, {k: v for k, v in dape.items() if k != q + ".lora_B"})
    with pytest.raises(CheckpointError, match=r"unexpected key '.*self\.value\.lora_A'"):
        merge_dape(
            model_sd, dict(dape, **{"tagging_head.encoder.layer.0.crossattention.self.value.lora_A": a})
        )
    with pytest.raises(CheckpointError, match="r=8"):
        merge_dape(model_sd, dict(dape, **{qkv + ".lora_A": a2[:8]}))


def test_dape_file_layout_errors(tmp_path, rule_files):
    dape = read_dape_file(rule_files["dape"])
    assert len(dape) == 248
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": dape}, wrapped)
    with pytest.raises(CheckpointError, match="flat"):
        read_dape_file(wrapped)
    mixed = tmp_path / "mixed.pth"
    torch.save({"fc.weight": torch.zeros(1, 768), **dape}, mixed)
    with pytest.raises(CheckpointError, match=r"unexpected key 'fc\.weight'"):
        read_dape_file(mixed)
    trimmed = tmp_path / "trimmed.pth"
    torch.save({k: v for k, v in dape.items() if "layers.2.blocks.17." not in k}, trimmed)
    with pytest.raises(
        CheckpointError,
        match=r"trimmed\.pth: missing key 'visual_encoder\.layers\.2\.blocks\.17\.attn\.qkv\.lora_A'",
    ):
        load_tagger_state_dict(rule_files["ram"], trimmed)


# -------------------------------------------------------------------------- weight resolution


def test_hub_references_and_missing_files_give_clear_errors(tmp_path, monkeypatch):
    assert parse_hub_ref("hf://xinyu1205/recognize_anything_model/ram_swin_large_14m.pth") == HubFile(
        "xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth"
    )
    space = parse_hub_ref("hf://spaces/xinyu1205/recognize-anything@v2/sub/DAPE.pth")
    assert (space.repo_id, space.filename, space.repo_type, space.revision) == (
        "xinyu1205/recognize-anything",
        "sub/DAPE.pth",
        "space",
        "v2",
    )
    assert space.url == "https://huggingface.co/spaces/xinyu1205/recognize-anything/blob/v2/sub/DAPE.pth"
    with pytest.raises(ValueError, match="OWNER/REPO"):
        parse_hub_ref("hf://ram_swin_large_14m.pth")

    (tmp_path / "ram_swin_large_14m.pth").write_bytes(b"x")
    assert resolve_weight(tmp_path, "ram_swin_large_14m.pth") == tmp_path / "ram_swin_large_14m.pth"
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]DAPE\.pth.*github\.com/cswry/OSEDiff"):
        resolve_weight(tmp_path / "nowhere" / "DAPE.pth", "DAPE.pth")

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as info:
        RAMTagger.from_pretrained(
            "hf://xinyu1205/recognize_anything_model/ram_swin_large_14m.pth", cache_dir=tmp_path / "hub"
        )
    message = str(info.value)
    assert "ram_swin_large_14m.pth" in message and "HF_HUB_OFFLINE" in message
    assert (
        "https://huggingface.co/xinyu1205/recognize_anything_model/blob/main/ram_swin_large_14m.pth"
        in message
    )


# -------------------------------------------------------------------------------- tag cache


class _CountingTagger:
    name = "fake"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, images) -> list[str]:
        self.seen.append(len(images))
        return [f"tag{float(im.sum()):.0f}" for im in images]


def test_cached_tags_compute_each_key_once_and_persist(tmp_path):
    tagger = _CountingTagger()
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)  # sums 0, 12, 24, 36
    keys = ["a", "b", "c", "d"]
    assert cached_tags(tagger, images[:2], keys[:2], tmp_path) == ["tag0", "tag12"]
    assert cached_tags(tagger, images, keys, tmp_path) == ["tag0", "tag12", "tag24", "tag36"]
    assert tagger.seen == [2, 2]  # the second call only tagged c and d
    assert cached_tags(tagger, images[[3, 0]], ["d", "a"], tmp_path) == ["tag36", "tag0"]
    assert tagger.seen == [2, 2]
    assert (tmp_path / "fake.jsonl").read_text().count("\n") == 4

    other = TagCache(tmp_path, "fake")  # e.g. the next run, or another data-loader worker
    assert len(other) == 4 and other.get("c") == "tag24"
    other.put({"e": "late, tag"})
    first = TagCache(tmp_path, "fake")
    with open(first.path, "a", encoding="utf-8") as f:
        f.write('{"key": "half-writ')  # a concurrent writer mid-line: ignored until complete
    first.reload()
    assert first.get("e") == "late, tag" and len(first) == 5
    assert TagCache(tmp_path, "ram+dape").get("a") is None  # per-tagger namespace
    with pytest.raises(ValueError, match="keys"):
        cached_tags(tagger, images, keys[:3], tmp_path)


# -------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="codsr")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.slow
def test_cli_tags_a_folder_with_the_real_model_and_reports_unreadable_files(
    ram_tagger, tmp_path, monkeypatch, capsys
):
    calls = []

    def fake_from_pretrained(ram, dape=None, **kwargs):
        calls.append((ram, dape, kwargs))
        return ram_tagger

    monkeypatch.setattr(RAMTagger, "from_pretrained", staticmethod(fake_from_pretrained))
    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.open(FIXTURES / "real_lq" / "RealESRGAN_inputs" / "00003.png").convert("RGB")
    photo.resize((300, 200)).save(folder / "chelsea.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "tags.tsv"
    args = _parse(["tag", "-i", str(folder), "-o", str(out), "--ram", "ram.pth", "--device", "cpu"])
    assert args.func(args) == 1  # the unreadable file makes the exit code non-zero
    assert calls == [("ram.pth", None, {"device": "cpu", "torch_dtype": None})]  # None: the device default
    expected = ram_tagger.tags([cli.read_rgb(folder / "chelsea.png")])[0]
    assert expected and out.read_text() == f"chelsea.png\t{expected}\n"
    assert "cannot read" in capsys.readouterr().err


def test_cli_stdout_json_and_argument_errors(tmp_path, monkeypatch, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(image)

    class _Tagger:
        def tags(self, images):
            return [f"{im.size[0]}x{im.size[1]}" for im in images]

    monkeypatch.setattr(RAMTagger, "from_pretrained", staticmethod(lambda *a, **k: _Tagger()))
    args = _parse(["tag", "-i", str(image), "--device", "cpu"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "photo.jpg\t40x20\n"
    out = tmp_path / "tags.json"
    args = _parse(["tag", "-i", str(tmp_path), "-o", str(out), "--device", "cpu", "--batch-size", "1"])
    assert args.func(args) == 0 and json.loads(out.read_text()) == {"photo.jpg": "40x20"}
    assert args.func(_parse(["tag", "-i", str(tmp_path / "missing")])) == 2
    assert args.func(_parse(["tag", "-i", str(image), "-o", str(tmp_path / "x.csv")])) == 2


def test_read_rgb_applies_exif_orientation_and_converts_to_rgb(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("L", (40, 20), 128).save(tmp_path / "rot.jpg", exif=exif)
    image = cli.read_rgb(tmp_path / "rot.jpg")
    assert image.mode == "RGB" and image.size == (20, 40)

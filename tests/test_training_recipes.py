"""The tiny CPU recipes of docs/training.md and docs/stage2.md agree with the shipped configs and the
repository: step counts, one base model for stage 1 and stage 2, the chain of output folders, and
training images that exist in a fresh clone in sufficient number. (The chain itself runs, with
fewer steps, in tests/test_training_stage2.py's ``chain`` fixture.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from codsr.data.datasets import list_images
from codsr.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"training": ROOT / "docs" / "training.md", "stage2": ROOT / "docs" / "stage2.md"}


def recipe_block(doc: str) -> list[str]:
    """The bash block of the doc's tiny recipe, continuation lines joined."""
    text = DOCS[doc].read_text(encoding="utf-8")
    start = text.index("codsr make-tiny-model --out runs/tiny/base")
    block = text[text.rindex("```bash", 0, start) : text.index("```", start)]
    return [ln.strip() for ln in block.replace("\\\n", " ").splitlines()[1:] if ln.strip()]


def shell_vars(lines: list[str]) -> dict[str, str]:
    return {
        m.group(1): m.group(2).split("#")[0].strip() for ln in lines if (m := re.match(r"(\w+)=(\S+)", ln))
    }


def train_commands(lines: list[str]) -> list[tuple[str, dict[str, str], str]]:
    """(config name, --set overrides with $HR as last assigned before it, trailing comment)."""
    out, env = [], {}
    for ln in lines:
        if m := re.match(r"(\w+)=(\S+)", ln):
            env[m.group(1)] = m.group(2)
            continue
        if not ln.startswith("codsr train"):
            continue
        code, _, comment = ln.partition("#")
        words = shlex.split(code.replace("$HR", env.get("HR", "$HR")))
        name = words[words.index("--config") + 1]
        sets = dict(w.split("=", 1) for w in words[words.index("--set") + 1 :]) if "--set" in words else {}
        out.append((name, sets, comment))
    return out


@pytest.mark.parametrize("doc", ["training", "stage2"])
def test_recipe_steps_are_the_configs(doc):
    commands = train_commands(recipe_block(doc))
    assert commands, f"no `codsr train` line in the tiny recipe of {DOCS[doc]}"
    for name, sets, comment in commands:
        steps = re.search(r"(\d+) steps", comment)
        assert steps, f"{DOCS[doc].name}: say how many steps `--config {name}` runs"
        assert "max_steps" not in sets
        assert int(steps.group(1)) == load_config(name).max_steps, (doc, name)


@pytest.mark.parametrize("doc", ["training", "stage2"])
def test_recipe_data_is_in_the_repository_and_fills_a_batch(doc):
    text = DOCS[doc].read_text(encoding="utf-8")
    assert "../shared" not in text and "/path/to/hr" not in text
    for name, sets, _ in train_commands(recipe_block(doc)):
        hr = sets["data.train_hq"]
        folders = [f.strip() for f in hr.strip("[]").split(",")]
        assert all((ROOT / f).is_dir() for f in folders), folders
        images = list_images([ROOT / f for f in folders])
        cfg = load_config(name)
        assert len(images) >= cfg.train.batch_size, (name, len(images))


def test_stage1_and_stage2_share_one_base_and_chain_their_outputs():
    vae, s1, s2 = load_config("tiny/vae"), load_config("tiny/stage1"), load_config("tiny/stage2")
    assert s1.model.base_model == s2.model.base_model == f"{vae.output_dir}/model"
    assert s2.model.init_checkpoint == f"{s1.output_dir}/codsr_stage1.pkl"
    lines = recipe_block("stage2")
    masks = next(ln for ln in lines if ln.startswith("codsr masks"))
    words = shlex.split(masks.replace('"$HR"', shell_vars(lines)["HR"]))
    assert words[words.index("--out") + 1] == s2.masks.dir
    assert int(words[words.index("--crop") + 1]) == s2.data.crop_size
    assert words[words.index("--grounding-dino") + 1] == s2.masks.grounding_dino
    stage2_hr = train_commands(lines)[-1][1]["data.train_hq"]
    assert words[words.index("--data") + 1] == stage2_hr  # the one folder codsr masks saw
    # the printf'd captions name exactly the stage-2 images
    printf = next(ln for ln in lines if ln.startswith("printf"))
    named = set(re.findall(r"(?:'|\\n)([\w.]+\.png)\\t", printf))
    assert named == {p.name for p in list_images(ROOT / stage2_hr)}

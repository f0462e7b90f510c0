"""The numbers the docs cite for automatic tiling are the code's (codsr.pipeline.tiling constants).

Each entry: a file, a regular expression whose groups are the cited numbers, and the values the
code uses. A doc that changes its wording must keep citing the code's numbers (update the pattern
here with it); a constant that changes fails here until the docs say the new number.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from codsr.pipeline import latent_tiling
from codsr.pipeline.release_vae_tiling import (
    RELEASE_DECODER_PAD,
    RELEASE_DECODER_TILE,
    RELEASE_ENCODER_PAD,
    RELEASE_ENCODER_TILE,
)
from codsr.pipeline.tiling import (
    DEFAULT_LATENT_OVERLAP,
    DEFAULT_LATENT_TILE,
    DEFAULT_VAE_DECODER_TILE,
    DEFAULT_VAE_ENCODER_TILE,
    TilePlan,
)

ROOT = Path(__file__).resolve().parents[1]

CITED = [
    # (file, pattern, code values)
    ("docs/inference.md", r"`DEFAULT_LATENT_TILE` = (\d+)", (DEFAULT_LATENT_TILE,)),
    ("docs/inference.md", r"`DEFAULT_LATENT_OVERLAP` = (\d+)", (DEFAULT_LATENT_OVERLAP,)),
    ("docs/inference.md", r"`DEFAULT_VAE_ENCODER_TILE` = (\d+)", (DEFAULT_VAE_ENCODER_TILE,)),
    (
        "docs/inference.md",
        r"`DEFAULT_VAE_DECODER_TILE` = (\d+) \((\d+) latent px\)",
        (DEFAULT_VAE_DECODER_TILE, DEFAULT_VAE_DECODER_TILE // 8),
    ),
    ("docs/inference.md", r"at\s+most (\d+) latent px\)", (DEFAULT_LATENT_OVERLAP,)),
    (
        "README.md",
        r"VAE encoder tiles\s+when the output's longer side exceeds (\d+) px, the decoder above (\d+) px, "
        r"the UNet when the latent\s+area exceeds (\d+)² \(a (\d+)² px output\)",
        (DEFAULT_VAE_ENCODER_TILE, DEFAULT_VAE_DECODER_TILE, DEFAULT_LATENT_TILE, DEFAULT_LATENT_TILE * 8),
    ),
    (
        "docs/method.md",
        r"when h·w > T² \(T = (\d+) latent px, overlap O = (\d+)\)",
        (DEFAULT_LATENT_TILE, DEFAULT_LATENT_OVERLAP),
    ),
    (
        "docs/method.md",
        r"encoder tile (\d+) px, pad (\d+); decoder tile (\d+) latent\s+px, pad (\d+)",
        (RELEASE_ENCODER_TILE, RELEASE_ENCODER_PAD, RELEASE_DECODER_TILE, RELEASE_DECODER_PAD),
    ),
    (
        "docs/memory.md",
        r"default tiling: (\d+) / (\d+)-px VAE tiles",
        (DEFAULT_VAE_ENCODER_TILE, DEFAULT_VAE_DECODER_TILE),
    ),
    (
        "docs/memory.md",
        r"with the default (\d+)/(\d+) tiles",
        (DEFAULT_LATENT_TILE, DEFAULT_LATENT_OVERLAP),
    ),
]


@pytest.mark.parametrize(
    ("doc", "pattern", "values"), CITED, ids=[f"{c[0]}:{i}" for i, c in enumerate(CITED)]
)
def test_docs_cite_the_code_constants(doc, pattern, values):
    text = (ROOT / doc).read_text(encoding="utf-8")
    matches = re.findall(pattern, text)
    assert matches, (
        f"{doc} no longer says {pattern!r}: cite the code's numbers {values} (and update this test)"
    )
    for m in matches:
        cited = tuple(int(v) for v in (m if isinstance(m, tuple) else (m,)))
        assert cited == tuple(values), (
            f"{doc} cites {cited} where the code uses {tuple(values)} ({pattern!r})"
        )


def test_the_release_defaults_are_the_constants():
    # The release's tiles (docs/method.md#inference): UNet 150 latent px with overlap 50, VAE encoder
    # 1024 px and decoder 224 latent px; codsr's defaults are these (the decoder in output px).
    assert (DEFAULT_LATENT_TILE, DEFAULT_LATENT_OVERLAP) == (150, 50)
    assert DEFAULT_VAE_ENCODER_TILE == RELEASE_ENCODER_TILE == 1024
    assert DEFAULT_VAE_DECODER_TILE == RELEASE_DECODER_TILE * 8 == 1792


def test_the_thresholds_the_docs_describe_are_the_behaviour():
    # VAE: tiles only when the longer side exceeds the tile.
    edge = DEFAULT_VAE_ENCODER_TILE
    assert TilePlan.automatic(edge, edge).vae_encoder_tile is None
    assert TilePlan.automatic(edge, edge + 8).vae_encoder_tile == DEFAULT_VAE_ENCODER_TILE
    dec = DEFAULT_VAE_DECODER_TILE
    assert TilePlan.automatic(dec, 64).vae_decoder_tile is None
    assert TilePlan.automatic(dec + 8, 64).vae_decoder_tile == DEFAULT_VAE_DECODER_TILE
    # UNet: one call up to latent area tile², tiles above it.
    t = DEFAULT_LATENT_TILE
    calls: list[tuple[slice, slice]] = []

    def predict(ys, xs):
        calls.append((ys, xs))
        return torch.zeros(1, 4, ys.stop - ys.start, xs.stop - xs.start)

    latent_tiling.tiled_noise_prediction(predict, (1, 4, t, t), t, DEFAULT_LATENT_OVERLAP)
    assert len(calls) == 1
    calls.clear()
    latent_tiling.tiled_noise_prediction(predict, (1, 4, t, t + 1), t, DEFAULT_LATENT_OVERLAP)
    assert len(calls) == 2

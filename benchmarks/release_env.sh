#!/usr/bin/env bash
# Check out the authors' CODSR release at a pinned commit and give it its own virtual environment,
# for the side-by-side benchmark (benchmarks/release_compare.py). Nothing of the release is
# committed: both land in the git-ignored benchmarks/.release/.
#
#   bash benchmarks/release_env.sh            # checkout + venv (about 2 min, ~6 GB)
#   RELEASE_TORCH="torch==2.13.0" bash benchmarks/release_env.sh   # smaller CPU-only torch (1.5 GB)
#
# Environment:
#   RELEASE_DIR     where to put src/ and venv/          (default: benchmarks/.release)
#   RELEASE_MIRROR  a git directory holding the commit   (default: the search tool's mirror, else a
#                   clone of https://github.com/Chanson94/CODSR)
#   RELEASE_TORCH   the torch requirement(s)             (default: the same build as the project's
#                   venv, torch 2.14.1 + torchvision 0.29.1; its pin torch==2.0.1 has no wheel here)
#   PYTHON          the interpreter for the venv          (default: python3)
#
# The release's requirements.txt pins diffusers 0.25.0, transformers 4.28.1, peft 0.9.0,
# einops 0.7.0, Pillow 9.5.0 (kept) and torch 2.0.1 / xformers 0.0.20 (replaced: no wheel for
# Python 3.11 on this machine; xformers is a CUDA-only extra). open-clip, pyiqa, loralib,
# fairscale and basicsr are only used by its tagger, metrics and training: not installed.
# accelerate / huggingface_hub / numpy are pinned to versions of the release's time (diffusers
# 0.25 imports huggingface_hub.cached_download, removed in 0.26).
set -euo pipefail

RELEASE_REPO="Chanson94/CODSR"
RELEASE_COMMIT="68cad3cd1eee81f3f5e3e33e8d2cd24f0627375f"  # main on 2026-12-04 ("Fix formatting of FaithDiff citation in README")

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${RELEASE_DIR:-$here/.release}"
mirror="${RELEASE_MIRROR:-/work/.mirror/Chanson94+CODSR/repo}"
torch_req="${RELEASE_TORCH:-torch==2.14.1 torchvision==0.29.1}"
py="${PYTHON:-python3}"

mkdir -p "$dest"
# 1. the code, at the pinned commit, without its .git (git archive of the commit)
if [ ! -f "$dest/src/codsr.py" ]; then
    if ! git --git-dir="$mirror" cat-file -e "$RELEASE_COMMIT^{commit}" 2>/dev/null; then
        mirror="$dest/repo.git"
        [ -d "$mirror" ] || git clone --bare "https://github.com/$RELEASE_REPO" "$mirror"
    fi
    rm -rf "$dest/src.tmp" && mkdir -p "$dest/src.tmp"
    # preset/ (DAPE tagger weights, stored in LFS) and asserts/ (a figure) are not needed
    git --git-dir="$mirror" archive "$RELEASE_COMMIT" -- . ':(exclude)preset' ':(exclude)asserts' \
        | tar -x -C "$dest/src.tmp"
    find "$dest/src.tmp" -name __pycache__ -prune -exec rm -rf {} +
    mv "$dest/src.tmp" "$dest/src"
fi
echo "$RELEASE_COMMIT" > "$dest/COMMIT"

# 2. its own venv with its own pins
if [ ! -x "$dest/venv/bin/python" ]; then
    "$py" -m venv "$dest/venv"
fi
pip_() { "$dest/venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# shellcheck disable=SC2086
pip_ $torch_req
# shellcheck disable=SC2086
pip_ $torch_req \
    diffusers==0.25.0 transformers==4.28.1 peft==0.9.0 einops==0.7.0 Pillow==9.5.0 \
    accelerate==0.25.0 huggingface_hub==0.25.2 "numpy<2" safetensors tqdm
"$dest/venv/bin/python" - <<'EOF'
import diffusers, peft, torch, transformers
print(f"release venv ok: torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF
echo done > "$dest/READY"

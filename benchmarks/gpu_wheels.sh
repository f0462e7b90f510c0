#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_run.sh installs on a GPU machine that has python3 + torch +
# transformers 5 + peft + accelerate + huggingface_hub + safetensors but no diffusers and no network.
# Run here (with network), then carry the folder (git-ignored) to the device:
#
#   bash benchmarks/gpu_wheels.sh                 # -> .device_wheels/ for the device's Python 3.12
#   WHEELS=/tmp/w PYVER=3.11 bash benchmarks/gpu_wheels.sh   # for a CPU dry run here
#
# main/     codsr's side: diffusers (the version of the project's venv) + importlib_metadata
# release/  the release's side, installed into its own --target folder: its pins where a wheel for
#           the device's Python exists (diffusers 0.25.0, peft 0.9.0, accelerate 0.25.0,
#           huggingface_hub 0.25.2 for diffusers 0.25, einops 0.7.0), numpy<2; transformers 4.28.1 needs
#           tokenizers<0.14, which has no wheel for Python 3.12, so transformers 4.36.2 +
#           tokenizers 0.15.2 (abi3) stand in there (only the CLIP text encoder uses them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest="${WHEELS:-.device_wheels}"
pyver="${PYVER:-3.12}"
diffusers_version="${DIFFUSERS_VERSION:-$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')}"
bin=(--only-binary=:all: --python-version "$pyver" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

mkdir -p "$dest/main" "$dest/release"
dl -d "$dest/main" "${bin[@]}" "diffusers==$diffusers_version" "importlib_metadata==8.7.0"
dl -d "$dest/release" "${bin[@]}" diffusers==0.25.0 peft==0.9.0 accelerate==0.25.0 huggingface_hub==0.25.2 \
    transformers==4.36.2 tokenizers==0.15.2 numpy==1.26.4 einops==0.7.0
ls -la "$dest/main" "$dest/release"
du -sh "$dest"

#!/usr/bin/env bash
# Wheels for a GPU machine without internet that has torch, accelerate, transformers and peft installed:
# sdcluster itself and the rest of its dependencies, downloaded here and installed there from the folder.
#
#   bash benchmarks/gpu_wheels.sh download wheels     # here (PyPI reachable); GPU_PYTHON=3.12 if it differs
#   bash benchmarks/gpu_wheels.sh install wheels      # there, then: python -m benchmarks.gpu_table
#
# Binary wheels (pyarrow, numpy, ...) must fit the GPU machine's Python and platform: GPU_PYTHON (default: the
# Python running this) and manylinux x86_64. antlr4-python3-runtime (hydra-core's parser) is published only
# as a source archive, so it is built here into a pure-Python wheel that installs anywhere.
set -euo pipefail

mode=${1:?usage: gpu_wheels.sh download|install [FOLDER]}
dir=${2:-wheels}
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)

case "$mode" in
download)
    gpu_python=${GPU_PYTHON:-$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    mkdir -p "$dir"
    "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" "$repo" "antlr4-python3-runtime==4.9.3"
    # Everything sdcluster needs besides what the GPU machine has (none of these pulls torch in).
    "$py" -m pip download --quiet -d "$dir" --find-links "$dir" --only-binary=:all: \
        --python-version "$gpu_python" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        "diffusers>=0.30" "datasets>=2.18" "submitit>=1.5" "hydra-core>=1.3" "omegaconf>=2.3" \
        "safetensors>=0.4" "huggingface_hub>=2.4" "pillow>=12.2" numpy "matplotlib>=3.7"
    echo "wheels for Python $gpu_python in $dir ($(du -sh "$dir" | cut -f1)); copy the folder to the GPU machine"
    ;;
install)
    # --no-index: nothing is fetched; torch, accelerate, transformers and peft must already be there.
    "$py" -m pip install --no-index --find-links "$dir" sdcluster
    "$py" -m pip install --no-deps --no-build-isolation -e "$repo"  # the checkout itself, for benchmarks/
    ;;
*)
    echo "usage: gpu_wheels.sh download|install [FOLDER]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Make a wheel directory for a GPU machine with no package index (run once where pip works):
#   launch/gpu_wheels.sh [DIR] [PYTHON_VERSION]        (defaults: .whl, the target's Python 3.12)
# Then on the GPU machine, which already has torch (and transformers, tensorboard):
#   pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#   python launch/gpu_check.py
# Holds deepspeed (built here as a pure-Python wheel: its CUDA ops are JIT-compiled there, for the GPU's
# TORCH_CUDA_ARCH_LIST), webdataset and timm (the ViT), with the dependencies a stock CUDA/PyTorch image lacks.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dir"
binary=(--no-deps --only-binary=:all: --python-version "$py" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir")
DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -w "$dir" "deepspeed==$(python -m pip show deepspeed 2>/dev/null | sed -n "s/^Version: //p" || true)"
python -m pip download "${binary[@]}" webdataset braceexpand hjson py-cpuinfo pydantic pydantic-core \
    annotated-types typing-inspection timm
ls -la "$dir"

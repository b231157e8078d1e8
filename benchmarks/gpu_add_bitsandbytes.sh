#!/usr/bin/env bash
# After ../shared/tools/gpu-prepare.sh: put bitsandbytes (QLoRA's 4-bit base, 8-bit optimizer states)
# into .gpu/site/ for the GPU machine, whose image lacks it. Its wheel is 43 MB (libraries for every
# CUDA and ROCm release), too much beside the other wheels under the device tool's 64 MiB carry:
# only the CPU library and the CUDA 13 ones the image's torch (cu130) loads are kept (~6 MB).
# gpu_session.sh puts .gpu/site on PYTHONPATH when it exists.
set -euo pipefail
[ -f pyproject.toml ] && [ -d .gpu ] || { echo "run from the project root, after gpu-prepare.sh"; exit 1; }
version=$(python3 -c "import importlib.metadata as m; print(m.version('bitsandbytes'))" 2>/dev/null || echo 0.50.2)
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes==$version"
rm -rf .gpu/site/bitsandbytes .gpu/site/bitsandbytes-*.dist-info
mkdir -p .gpu/site
(cd .gpu/site && python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl .)
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
rm -rf "$tmp"
du -sh .gpu/site .gpu

#!/usr/bin/env bash
# After ../shared/tools/gpu-prepare.sh: put the four shared novels (1.9 MB) into .gpu/data/domain/
# for the GPU machine, where recipe_throughput.py's novel-domain run reads its `text` source
# (gpu-prepare.sh copies Alpaca and the tokenizer only).
set -euo pipefail
[ -f pyproject.toml ] && [ -d .gpu/data ] || { echo "run from the project root, after gpu-prepare.sh"; exit 1; }
SHARED=${SHARED:-../shared}
mkdir -p .gpu/data/domain
cp "$SHARED"/data/domain/*.txt .gpu/data/domain/
du -sh .gpu/data/domain .gpu

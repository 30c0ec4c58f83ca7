#!/usr/bin/env bash
# The GPU check, one short run on one GPU (about 5 minutes on an H100-class GPU; under 10):
#   1. the packed batches' FlexAttention kernel against the per-span loop, on the GPU: log-probs
#      and every gradient of a packed DPO and a packed SFT batch, in fp32 and bf16;
#   2. SFT and DPO of a SmolLM2-135M-shaped model in bf16, dalign against TRL's fastest GPU
#      settings (padding-free, flash-attention 2 and Liger where installed), same rows: tokens
#      per second, model FLOP utilisation and peak GPU memory.
# Run from the repository root on the GPU machine:  bash bench/gpu_check.sh [RESULTS_FOLDER]
# A GPU image with torch but not dalign's pins: first, on a machine with the registries,
# `make gpu-wheels` puts the missing packages in .gpu-wheels/ (about 25 MB), which travels with
# the tree (the device tool's `carry`) and is installed here without network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-python3}
if [ -d .gpu-wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$OUT"
timeout 540 "$PY" -m bench.gpu --out "$OUT/$(date +%F)-gpu.json"

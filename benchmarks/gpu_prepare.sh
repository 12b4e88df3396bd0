#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for a borrowed GPU machine, which sees only this checkout: a copy of the shared
# data and reference scripts, and a small checkpoint trained here on the CPU (for the portability check).
# Usage: bash benchmarks/gpu_prepare.sh [SHARED]   (default ../shared), then run on the GPU machine, carrying .gpu:
#   RNNGEN_SHARED=$PWD/.gpu/shared RNNGEN_CPU_CHECKPOINT=$PWD/.gpu/cpu_ckpt bash benchmarks/gpu_check.sh $OUT
set -eu
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
rm -rf .gpu && mkdir -p .gpu/shared
cp -r "$SHARED/bench" .gpu/shared/
mkdir -p .gpu/shared/data && cp "$SHARED/data/tinyshakespeare.txt" .gpu/shared/data/
rnngen train .gpu/shared/data/tinyshakespeare.txt --out .gpu/cpu_ckpt --device cpu --hidden 64 --layers 1 \
    --max-steps 60 --eval-every 30 --quiet
du -sh .gpu

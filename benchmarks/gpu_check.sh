#!/usr/bin/env bash
# Every GPU check in one run, for a borrowed CUDA machine (the project's CI has no GPU):
#   1. the test suite's CUDA paths (fast sampling, CUDA graphs, the Triton step, training on cuda),
#   2. batch-1 sampling speed vs ../shared/bench/ref_sample.py on the GPU (3x512 LSTM),
#   3. portability: a CPU-trained checkpoint samples on the GPU, a GPU-trained one on the CPU,
#   4. time to quality: best validation loss on tiny Shakespeare within 120 s of training (110 s + evaluations);
#      the first line of gpu_configs.txt, "auto-defaults", gives no option: what --preset auto chooses (issue 17).
# Usage: RNNGEN_SHARED=/path/to/shared bash benchmarks/gpu_check.sh [OUTDIR]
# Knobs (environment): RNNGEN_GPU_TEST_FILTER (pytest -k), RNNGEN_GPU_SAMPLE=0, RNNGEN_GPU_SWEEP=1 (Triton tilings),
# RNNGEN_GPU_PORTABILITY=0, RNNGEN_GPU_CONFIG_FILE (one "name args" line per training run).
# Needs torch with CUDA, click, rich, safetensors, sentencepiece, numpy and pytest already installed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/out/gpu}}
mkdir -p "$OUT_DIR"
SHARED=${RNNGEN_SHARED:-../shared}
export RNNGEN_SHARED=$SHARED PYTHONUNBUFFERED=1
log() { echo "=== $(date +%T) $*"; }

log install
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF

log "1. tests with CUDA available"
timeout "${RNNGEN_GPU_TEST_SECONDS:-90}" python3 -m pytest -q -x -p no:cacheprovider tests/test_fastpath.py \
    tests/test_model.py -k "${RNNGEN_GPU_TEST_FILTER:-}" 2>&1 | tail -n 15

if [ "${RNNGEN_GPU_SAMPLE:-1}" = 1 ]; then
    log "2. sampling speed, 3x512 LSTM, batch 1"
    timeout 120 python3 benchmarks/sample_speed.py --device cuda --layers 3 --hidden 512 2>&1 | tail -n 25
    cp benchmarks/out/sample_speed*.json "$OUT_DIR"/ 2>/dev/null
fi

if [ "${RNNGEN_GPU_SWEEP:-0}" = 1 ]; then
    log "2b. Triton tilings, 3x512 LSTM, batch 1"
    timeout 150 python3 benchmarks/triton_sweep.py 2>&1 | tail -n 25
    cp benchmarks/out/triton_sweep*.json "$OUT_DIR"/ 2>/dev/null
fi

if [ "${RNNGEN_GPU_PORTABILITY:-1}" = 1 ]; then
log "3. portability"
CPU_RUN=${RNNGEN_CPU_CHECKPOINT:-}
if [ -n "$CPU_RUN" ] && [ -d "$CPU_RUN" ]; then
    rnngen sample "$CPU_RUN" --device cuda --length 80 --seed 1 && echo "CPU-trained checkpoint sampled on cuda: ok"
fi
rm -rf /tmp/gpu_tiny
rnngen train "$SHARED/data/tinyshakespeare.txt" --out /tmp/gpu_tiny --device cuda --max-steps 60 --eval-every 30 \
    --hidden 64 --layers 1 --quiet && rnngen sample /tmp/gpu_tiny --device cpu --length 80 --seed 1 \
    && echo "GPU-trained checkpoint sampled on cpu: ok"
fi

log "4. tiny Shakespeare, 110 s of training on the GPU (the target: 120 s)"
# One line per configuration in shakespeare.jsonl, one metrics file each (a borrowed machine returns few files).
while read -r name args; do
    [ -z "$name" ] && continue
    rm -rf "/tmp/gpu_$name"
    timeout 200 rnngen train "$SHARED/data/tinyshakespeare.txt" --out "/tmp/gpu_$name" --device cuda --max-time 110 \
        --json --quiet $args > "/tmp/gpu_$name.json"
    python3 - "/tmp/gpu_$name.json" "$name" "$args" "$OUT_DIR/shakespeare.jsonl" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"{sys.argv[2]}: best val {r['best']['nats_per_char']:.4f} nats/char, final train loss {r.get('train_loss')}, "
      f"{r['steps']} steps in {r['seconds']} s, {r['parameters']:,} params; args: {sys.argv[3]}")
with open(sys.argv[4], "a") as f:
    f.write(json.dumps({"name": sys.argv[2], "args": sys.argv[3], **r}) + "\n")
EOF
    cp "/tmp/gpu_$name/metrics.jsonl" "$OUT_DIR/metrics_$name.jsonl" 2>/dev/null
done < "${RNNGEN_GPU_CONFIG_FILE:-benchmarks/gpu_configs.txt}"
log done

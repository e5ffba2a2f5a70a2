#!/usr/bin/env bash
# The GPU benchmarks, one script, one results file. Run it whenever a GPU machine is at hand:
#
#     bash benchmarks/gpu_suite.sh [RESULTS_DIR]        # default runs/gpu_suite; parts capped at 5 + 3 minutes
#
# Writes RESULTS_DIR/results.txt (every benchmark's printed table, in order) and one JSON per benchmark.
# Needs only this repository and its install: the probe folder is generated; the ResNet-50 and a CLIP of
# ViT-B's embedding width have random weights, announced (timing only). No network.
#
# Parts:
#   1. dissection at scale: 5 layers of a ResNet-50, 50,000 ImageNet-sized (224 px) probe images, 20k concepts,
#      CLIP in bf16 with DataLoader workers. Target: the whole labeling after the CLIP cache in <= 1 minute.
#   2. soft-WPMI alone at N=50,000, K=2,048, M=20,000 against CLIP-Dissect's dense formulation (same inputs).
# The LWTA overhead benchmarks (eager/compiled, fp32/bf16, ResNet-18 and ViT-Tiny) join this script with the
# LWTA speed issue.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_suite}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/results.txt"
WORKERS="$(( $(nproc) > 8 ? 8 : $(nproc) ))"

echo "== 1. dissection at scale (ResNet-50, 5 layers, 50k x 224 px, 20k concepts)" | tee -a "$OUT/results.txt"
timeout 300 "$PY" benchmarks/dissect_at_scale.py --images 50000 --image-size 224 --device cuda \
    --clip-precision bf16 --num-workers "$WORKERS" --batch-size 256 --folder "$OUT/probe" \
    --out "$OUT/dissect_at_scale.json" 2>&1 | tee -a "$OUT/results.txt" || echo "part 1 failed or timed out" | tee -a "$OUT/results.txt"

echo "== 2. soft-WPMI alone, CPU side by side (the GPU run of part 1 covers the device)" | tee -a "$OUT/results.txt"
timeout 180 "$PY" benchmarks/soft_wpmi_scale.py --sizes 50000x2048x20000 --threads "$(nproc)" 2>&1 \
    | tee -a "$OUT/results.txt" || echo "part 2 failed or timed out" | tee -a "$OUT/results.txt"
echo "results: $OUT/results.txt"

#!/usr/bin/env bash
# The GPU benchmarks, one script, one results file. Run it whenever a GPU machine is at hand:
#
#     bash benchmarks/gpu_suite.sh [RESULTS_DIR]        # default runs/gpu_suite; every part capped, 7 minutes in all
#
# Writes RESULTS_DIR/results.txt (every benchmark's printed table, in order) and one JSON per benchmark.
# Needs only this repository and its install: the probe folder is generated; the ResNet-50 and the CLIPs have
# random weights, announced (timing only). No network.
#
# Parts (cap in seconds):
#   1. (100) epoch-end dissection at scale: 5 layers of a ResNet-50, 10,000 ImageNet-sized (224 px) probe images,
#      20k concepts, CLIP in bf16 with DataLoader workers. Target: the labeling after the CLIP cache <= 1 minute,
#      and dissection against one eval forward pass over the probe set.
#   2. (30) soft-WPMI alone against CLIP-Dissect's dense formulation (same inputs), on this machine's CPU.
#   3. (120) LWTA training-step overhead on CUDA, fp32: ResNet-18 (CIFAR) and ViT-Tiny, ReLU vs LWTA U=2, 16,
#      eager and compiled, with peak memory (max_memory_allocated).
#   4. (120) the same in bf16 (autocast) and channels-last (tensor cores' layout); part 3 is contiguous.
#   5. (45) CLIP image-encoding throughput, ViT-B/16 at 224 px: fp32, bf16, fp16.
# A part that fails or runs past its cap is marked in results.txt and the next one runs; the LWTA benchmark writes
# its JSON after each network, so a part cut short keeps the networks it finished (ResNet-18 first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_suite}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
PY="${PYTHON:-python}"
RES="$OUT/results.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES"
WORKERS="$(( $(nproc) > 8 ? 8 : $(nproc) ))"

part() {  # part CAP TITLE -- command...
  local cap="$1" title="$2"
  shift 3
  echo "== $title" | tee -a "$RES"
  timeout -k 15 "$cap" "$@" 2>&1 | tee -a "$RES"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "part '$title' failed or timed out (exit $rc, cap ${cap}s)" | tee -a "$RES"
}

part 100 "1. dissection at scale (ResNet-50, 5 layers, 10k x 224 px, 20k concepts)" -- \
  "$PY" benchmarks/dissect_at_scale.py --images 10000 --image-size 224 --device cuda --clip-precision bf16 \
  --num-workers "$WORKERS" --batch-size 256 --folder "$OUT/probe" --out "$OUT/dissect_at_scale.json"
part 30 "2. soft-WPMI alone, CPU side by side" -- \
  "$PY" benchmarks/soft_wpmi_scale.py --sizes 20000x2048x20000 --threads "$(nproc)"
part 120 "3. LWTA overhead, CUDA fp32 (ResNet-18, ViT-Tiny; eager and compiled)" -- \
  "$PY" benchmarks/lwta_overhead.py --device cuda --precision fp32 --models resnet18 vit_tiny --rounds 9 --layouts contiguous \
  --out "$OUT/lwta_overhead_fp32.json"
part 120 "4. LWTA overhead, CUDA bf16 autocast (ResNet-18, ViT-Tiny; eager and compiled)" -- \
  "$PY" benchmarks/lwta_overhead.py --device cuda --precision bf16 --models resnet18 vit_tiny --rounds 9 --layouts channels-last \
  --out "$OUT/lwta_overhead_bf16.json"
part 45 "5. CLIP image-encoding throughput (ViT-B/16, 224 px)" -- \
  "$PY" benchmarks/clip_throughput.py --device cuda --model ViT-B-16 --images 4096 --batch-size 256 \
  --out "$OUT/clip_throughput.json"
echo "results: $RES"

#!/usr/bin/env bash
# The GPU benchmark, on one card:
#  1. steps: each runner's forward step at Llama-3.2-1B / Llama-3.1-8B shapes (random weights, bf16) beside its
#     memory floor (weight bytes / the copy bandwidth measured in the same run);
#  2. two-cards: the schedules in latency-model mode at the native runner's step times from run 1: what a draft
#     and a verifier on two cards would give;
#  3. one-card: the trace backend doing real compute at those shapes with the native runner, draft and verify as
#     separate processes sharing the card under CUDA MPS (started here when they share it, stopped at the end);
#  4. load: the same deployment under closed-loop load at each of LOAD concurrencies, batched ar against async.
# Decisions come from a recorded trace of the real Qwen pair, so every strategy's output is checked exactly, and
# every strategy is warmed up on the first prompt before timing.
# Usage: scripts/gpu_bench.sh   (env: TRACE, PROMPTS, SHAPES, DEVICE, DTYPE, OUT, LOAD, REQUESTS)
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE=${TRACE:-data/qwen-humaneval-trace.json}
PROMPTS=${PROMPTS:-10}
SHAPES=${SHAPES:-llama-3.2-1b,llama-3.1-8b}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
LOAD=${LOAD:-1,4,16,32}
REQUESTS=${REQUESTS:-32}
COMMON=(--backend trace --trace "$TRACE" --prompts "$PROMPTS" --max-new-tokens 128 --dtype "$DTYPE"
        --draft-device "$DEVICE" --verify-device "$DEVICE" --max-context 1024 --runner native)

python -m amusd_mq.bench.steps --models "$SHAPES" --runners native,hf --device "$DEVICE" --dtype "$DTYPE" \
    --out "$OUT/steps"
python -m amusd_mq bench "${COMMON[@]}" --strategies ar,sd,async,amusd-policy \
    --trace-compute "latency:$OUT/steps/native-profile.json" --out "$OUT/two-cards"

if [[ "$DEVICE" == cuda* ]] && command -v nvidia-cuda-mps-control >/dev/null; then
    # Without MPS two processes time-slice the card and each runs about twice as slow; with it their kernels
    # share the card at once.
    nvidia-cuda-mps-control -d
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
python -m amusd_mq bench "${COMMON[@]}" --strategies ar,sd,async --gammas 4 --trace-compute "shape:$SHAPES" \
    --out "$OUT/one-card"
python -m amusd_mq bench "${COMMON[@]}" --concurrency "$LOAD" --requests "$REQUESTS" --max-batch 32 \
    --trace-compute "shape:$SHAPES" --out "$OUT/load"

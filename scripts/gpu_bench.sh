#!/usr/bin/env bash
# The GPU benchmark of issue 3, on one card:
#  1. shared-card: the trace backend doing real compute at Llama-3.2-1B / Llama-3.1-8B shapes (random weights,
#     bf16), draft and verify as separate processes sharing the card;
#  2. two-cards: the same schedules in latency-model mode, with the step times measured on this card in run 1
#     while nothing else ran on it: what two cards would give.
# Decisions come from a recorded trace of the real Qwen pair, so every strategy's output is checked exactly.
# Usage: scripts/gpu_bench.sh   (env: TRACE, PROMPTS, SHAPES, DEVICE, DTYPE, OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE=${TRACE:-bench/qwen-humaneval-trace.json}
PROMPTS=${PROMPTS:-10}
SHAPES=${SHAPES:-llama-3.2-1b,llama-3.1-8b}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
COMMON=(--backend trace --trace "$TRACE" --prompts "$PROMPTS" --max-new-tokens 128 --dtype "$DTYPE"
        --draft-device "$DEVICE" --verify-device "$DEVICE" --strategies ar,sd,async,amusd-policy)
python -m amusd_mq bench "${COMMON[@]}" --trace-compute "shape:$SHAPES" --out "$OUT/shared-card"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
profile = json.load(open(f"{out}/shared-card/results.json"))["profiles"]["workers"]
json.dump(profile, open(f"{out}/profile.json", "w"))
print("step times on this card:", profile)
PY
python -m amusd_mq bench "${COMMON[@]}" --trace-compute "latency:$OUT/profile.json" --out "$OUT/two-cards"

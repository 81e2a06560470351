#!/usr/bin/env bash
# The GPU half of issue 7 in one call: profile the step-time model on this GPU, report its prediction
# error on held-out batches, then a real long-prompt-plus-chats run under LARS + adaptive chunking and
# FCFS + fixed:2048, each next to the simulator's prediction for the same trace.
#   device: bash benchmarks/sim/gpu_run.sh      (carry .whl; the profile, logs and JSON land in $OUT)
set -uo pipefail
. benchmarks/device_env.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]*' | tr 'H' 'h')
profile="$out/profile-${gpu:-gpu}-llama-3.1-8b.json"
echo "== profile + check"
python3 -m mnemosyne profile dummy:llama-3.1-8b --device cuda -o "$profile" --check 2>&1 | tr '\r' '\n' \
  | grep -v 'step/s\]$\|s/step\]$\|tensor/s\]$' | tee "$out/profile.log" | tail -9
echo "== long prompt + chats, measured and predicted"
python3 benchmarks/sim/gpu_mixed.py --profile "$profile" --out "$out" 2>&1 | tee "$out/gpu_mixed.log" | tail -8

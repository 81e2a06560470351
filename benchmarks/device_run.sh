#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, run the GPU tests, time the attention
# kernels, and run `mnemosyne bench latency` against floors and HF transformers.
#   device: bash benchmarks/device_run.sh [quick]      (carry .whl; logs and plots land in $OUT)
set -uo pipefail
. benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== GPU tests"
python3 -m pytest -q -m "gpu or triton" tests/attention/test_gpu.py tests/attention/test_triton_chunk.py \
  tests/layers/test_triton_ops.py tests/runner/test_gpu_numerics.py -p no:cacheprovider 2>&1 \
  | tee "$out/gpu_tests.log" | tail -15
echo "== attention kernels"
python3 benchmarks/gpu_kernels.py 2>&1 | tee "$out/kernels.log"
if [ "${1:-}" = quick ]; then exit 0; fi
echo "== profile"
python3 benchmarks/profile_step.py 2>&1 | tee "$out/profile.log" | grep -v "^-" | cut -c1-150 | head -60
echo "== bench latency"
python3 -m mnemosyne bench latency -o "$out/latency" 2>&1 | tee "$out/bench.log" | tail -30

#!/usr/bin/env bash
# One call on a multi-GPU machine: a jobs file (benchmarks/jobs/*.txt) packed onto its GPUs by
# benchmarks/gpu_jobs.py; every job's log and JSON come back in $OUT/results.tgz.
#   device: bash benchmarks/device_jobs.sh call1.txt [deadline_s]      (carry .whl)
set -uo pipefail
. benchmarks/device_env.sh
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
python3 benchmarks/gpu_jobs.py "benchmarks/jobs/$1" --deadline "${2:-560}" --out "$out/run"
# Few files come back from a call: everything travels as one archive.
tar -czf "$out/results.tgz" -C "$out/run" . && rm -rf "$out/run"

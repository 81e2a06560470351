#!/usr/bin/env bash
# One call on a multi-GPU machine: a jobs file (benchmarks/jobs/*.txt) packed onto its GPUs by
# benchmarks/gpu_jobs.py; every job's log and JSON come back in $OUT/results.tgz.
#   device: bash benchmarks/device_jobs.sh call1.txt [deadline_s]      (carry .whl)
set -uo pipefail
. benchmarks/device_env.sh
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
python3 benchmarks/gpu_jobs.py "benchmarks/jobs/$1" --deadline "${2:-560}" --out "$out/run"
# The headline lines of every job on stdout too: the archive below may fail to come back (call67's
# did, for want of disk on the receiving side), the call's output does not.
for log in "$out"/run/logs/*.log; do
  echo "== $(basename "$log" .log)"; grep -v -e '^\s*$' -e 'it/s\]' -e 's/it\]' "$log" | tail -n "${TAIL_LINES:-12}"
done
# Few files come back from a call, each at most 16 MiB: everything travels as one archive, less any
# file over 4 MiB (named here), and in 15 MiB parts should it still be larger (cat results.tgz.* | tar -xz).
find "$out/run" -type f -size +4M -printf 'dropped (over 4 MiB): %p %s bytes\n' -delete
tar -czf "$out/results.tgz" -C "$out/run" . && rm -rf "$out/run"
if [ "$(stat -c %s "$out/results.tgz")" -gt 15000000 ]; then
  split -b 15000000 -d "$out/results.tgz" "$out/results.tgz." && rm "$out/results.tgz"
fi

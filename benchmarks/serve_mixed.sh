#!/usr/bin/env bash
# Mixed serving (issue 9): Poisson chat traffic plus long prompts, replayed over streaming HTTP by
# `mnemosyne bench serve` against a launched `mnemosyne serve`: LARS + adaptive chunking, then FCFS +
# fixed:2048, on the same trace. The table, serve.json, serve.png and the server logs land in $OUT.
#   device: bash benchmarks/serve_mixed.sh [1gpu|kvp4|pp4]   (carry .whl; at most ~3.5 min per configuration)
#   here:   PYTHON=.venv/bin/python bash benchmarks/serve_mixed.sh cpu   (smoke test: dummy:tiny, ~1 min)
# Environment: TBT_MS (50) and TTFT_MS (2000), the SLOs given to the servers and judged by the bench;
# RUN_S (150), after which a configuration's replay stops and what has not finished counts as failed;
# RUNS (lars,fcfs): lars alone skips the FCFS baseline;
# PROFILE, the step-time profile the servers schedule with (default on an H200: the serving one, taken
# with `mnemosyne profile --tbt-slo-ms 50`, so with the same kernel routing as these servers);
# ENGINE_FLAGS, more engine flags for every server (for example "--rho-max 0.9"; a --tbt-slo-ms there
# gives the servers another budget than the one the bench judges by); TAG, a suffix of the result folder;
# COLD=1, an empty Triton cache for the servers, as on a fresh machine (kernels compile at start-up, and
# any the warm-up missed compile mid-run: the workers log each as a warning).
set -uo pipefail
. benchmarks/device_env.sh
python="${PYTHON:-python3}"
layout="${1:-1gpu}"
tbt_ms="${TBT_MS:-50}"
ttft_ms="${TTFT_MS:-2000}"
run_s="${RUN_S:-150}"
case "$layout" in
  cpu)
    model=dummy:tiny
    engine="--device cpu --kv-cache-memory 0.1"
    tbt_ms="${TBT_MS:-500}"
    fixed=256
    trace="--num-requests 40 --rate 4 --long-fraction 0 --long-at-s 2,6 --long-prompt-tokens 3000,3500
           --short-prompt-tokens 16,256 --output-tokens 8,32 --long-threshold 1024 --long-ttft-slo-ms-per-ktok 2000"
    ;;
  1gpu|kvp4|pp4)
    model=dummy:llama-3-8b
    engine="--device cuda --max-model-len 200000"
    [ "$layout" = kvp4 ] && engine="$engine -kvp 4 --kvp-group-max-tokens 65536"  # a long prompt spans 2-3 groups
    [ "$layout" = pp4 ] && engine="$engine -pp 4"
    fixed=2048
    # 75 s of chat at 3 requests/s; long prompts of 128K-192K tokens arrive at 10 s and 40 s.
    trace="--num-requests 225 --rate 3 --long-fraction 0 --long-at-s 10,40 --long-prompt-tokens 131072,196608
           --short-prompt-tokens 128,2048 --output-tokens 64,256"
    if [ -n "${PROFILE:-}" ]; then
      engine="$engine --latency-profile $PROFILE"
    elif nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q H200; then
      engine="$engine --latency-profile benchmarks/profiles/h200-llama-3-8b-serving.json"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
  *) echo "usage: $0 [1gpu|kvp4|pp4|cpu]" >&2; exit 2 ;;
esac
"$python" -c "import httpx" || { echo "bench serve needs httpx: carry its wheels (httpx, httpcore, h11) in .whl" >&2; exit 1; }
compare=("--scheduler lars --chunking adaptive --max-num-batched-tokens 16384")
[ "${RUNS:-lars,fcfs}" = lars ] || compare+=("--scheduler fcfs --chunking fixed:$fixed --max-num-batched-tokens $fixed")
dest="$out/serve-$layout${TAG:+-$TAG}"  # TAG: runs side by side in one $OUT
mkdir -p "$dest"
if [ "${COLD:-0}" = 1 ]; then
  TRITON_CACHE_DIR=$(mktemp -d) && export TRITON_CACHE_DIR
fi
echo "== bench serve: $layout, $model"
start=$(date +%s)
# shellcheck disable=SC2086  # $trace is a list of flags
"$python" -m mnemosyne bench serve \
  --launch "$model $engine --tbt-slo-ms $tbt_ms --ttft-slo-ms $ttft_ms ${ENGINE_FLAGS:-}" \
  --compare "${compare[@]}" \
  $trace --tbt-slo-ms "$tbt_ms" --ttft-slo-ms "$ttft_ms" --trace-timeout-s "$run_s" \
  --save-trace "$dest/trace.jsonl" -o "$dest" \
  > "$dest/bench.log" 2>&1
status=$?
tr '\r' '\n' < "$dest/bench.log" | grep -v -e '%|' -e '^$' | tail -30
echo "== exit $status after $(( $(date +%s) - start )) s; results in $dest"
exit $status

#!/usr/bin/env bash
# Mixed prefill/decode batches and the KV admission policy, A/B at max load on one GPU, each config
# its own server in the same device call (cap 512): off (the defaults: prefills apart, max_utilization
# admission), on (--mixed-batches), reserve (mixed + guaranteed_no_evict), reserve-off
# (guaranteed_no_evict alone), stepsN (--max-decode-steps N).
#   OUT=bench/results/NAME PRESETS="2048/128|inf|256" CONFIGS="off on" bench/run_mixed_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/mixed-ab-$(date +%Y%m%d-%H%M%S)}
PRESETS=${PRESETS:-2048/128|inf|256}
CONFIGS=${CONFIGS:-off on reserve}
export PYTHONUNBUFFERED=1
TOK=$(realpath .bench-tokenizer) OUTABS=$(realpath -m "$OUT")
mkdir -p "$OUTABS"
for cfg in $CONFIGS; do
  case $cfg in
    off) extra="" ;;
    on) extra="--mixed-batches" ;;
    reserve) extra="--mixed-batches --scheduler-policy guaranteed_no_evict" ;;
    reserve-off) extra="--scheduler-policy guaranteed_no_evict" ;;
    steps[0-9]*) extra="--max-decode-steps ${cfg#steps}" ;;  # e.g. steps8: decode steps per call
    *) echo "unknown config $cfg"; exit 2 ;;
  esac
  ML="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16 --tokenizer-name $TOK"
  ML+=" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192"
  ML+=" --max-concurrent-requests 1024 --max-batch-size 512 $extra"
  echo "=== $cfg ($extra)"
  # shellcheck disable=SC2086
  timeout -k 30 400 python3 -m bench.serve_bench --launch="$ML" --tokenizer "$TOK" --warmup-requests 4 \
    --plan $PRESETS --out "$OUTABS/maxload-$cfg.json" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' | tail -n 4
done
python3 - "$OUTABS" $CONFIGS <<'PY'
import json, sys
out, cfgs = sys.argv[1], sys.argv[2:]
for cfg in cfgs:
    try:
        levels = json.load(open(f"{out}/maxload-{cfg}.json"))["levels"]
    except (OSError, KeyError, ValueError):
        print(cfg, "no result"); continue
    for lv in levels:
        c = lv.get("server_counters", {})
        print(f"{cfg:8s} {lv['preset']:10s} {lv['output_throughput']:8.0f} tok/s  "
              f"prefill calls {c.get('tgi_batch_inference_count/prefill', 0):.0f} "
              f"({c.get('tgi_batch_inference_duration_sum/prefill', 0):.1f} s)  "
              f"decode calls {c.get('tgi_batch_inference_count/decode', 0):.0f} "
              f"({c.get('tgi_batch_inference_duration_sum/decode', 0):.1f} s)  "
              f"ttft p50 {lv['ttft_ms']['p50']:.0f} ms  itl p99 {lv['itl_ms']['p99']:.0f} ms")
PY

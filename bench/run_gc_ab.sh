#!/usr/bin/env bash
# Router GC tuning A/B on one GPU, one device call: max load 128/128 (1,024 prompts, cap 512) with
# ROUTER_GC_TUNING=0 then on; the equal-load stage (gc on) and its HTTP half again with gc off.
#   OUT=bench/results/NAME bench/run_gc_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gc-ab-$(date +%Y%m%d-%H%M%S)}
S=bench/run_gpu_checks.sh; R=$OUT
ROUTER_GC_TUNING=0 STAGES=maxload MAXLOAD_BATCH=512 MAXLOAD_MORE=0 OUT=$R/gc-off $S 2>&1 | tail -4
STAGES="maxload equal" MAXLOAD_BATCH=512 MAXLOAD_MORE=0 OUT=$R/gc-on $S 2>&1 | tail -12
EQ="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16 --tokenizer-name .bench-tokenizer --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192 --max-batch-size 256 --max-concurrent-requests 1024"
ROUTER_GC_TUNING=0 timeout -k 30 200 python3 -m bench.serve_bench --launch="$EQ" --tokenizer .bench-tokenizer --warmup-requests 4 --plan "128/128|1|3" "128/128|inf|64" "128/128|inf|256" --out $R/gc-off/equal-http.json 2>&1 | grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' | tail -n 5
python3 -m bench.equal_load $R/gc-on/equal-engine.json $R/gc-off/equal-http.json | tee $R/gc-off/equal.txt

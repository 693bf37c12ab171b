#!/usr/bin/env bash
# HTTP against the scheduler without HTTP, on one GPU, in one device call: for each launcher flag
# set in CONFIGS, one launched stack serves the PLAN through HTTP RUNS times (4 client processes,
# each run its own prompt seed), then bench.sched_bench runs the same plan once. The printed
# lines give each level's output tok/s; bench.plots' summary gives HTTP / no-HTTP per level.
#
#   OUT=/tmp/out bench/run_http_vs_sched.sh
#   CONFIGS="off=--burst-hold-ms 0|hold50=" RUNS=2 OUT=$OUT bench/run_http_vs_sched.sh
#
# CONFIGS: "name=launcher flags" items separated by "|" (default: the defaults alone).
# PLAN: serve_bench plans (default 128/128 at concurrency 64 with 128 prompts, unlimited with 512).
# TREE: a checkout to run instead of this one (a baseline: git archive REV | tar -x -C .base,
# with its stubs generated); its name goes into the result files.
# MODEL (a config name from shard/native/configs), DTYPE: what the shards build with dummy weights
# (MODEL=llama-tiny DTYPE=float32 runs on a CPU machine, to try the script).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
OUT=${OUT:-bench/results/http-vs-sched-$(date +%Y%m%d-%H%M%S)}
CONFIGS=${CONFIGS:-"defaults="}
RUNS=${RUNS:-2}
PLAN=${PLAN:-"128/128|64,inf|128,512"}
TREE=${TREE:-.}
TOK=$(realpath "${TOKENIZER:-.bench-tokenizer}")
PORT=${PORT:-8090}
MODEL=${MODEL:-llama-3.1-8b}
DTYPE=${DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
LIMITS="--max-input-tokens 2048 --max-total-tokens 4096"
SERVE="--max-batch-prefill-tokens 8192 --max-concurrent-requests 1024 --max-batch-size 512"
FILTER='^ *[0-9]*/[0-9]* c='
tag=$(basename "$(realpath "$TREE")")
cd "$TREE"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
seed=100
IFS='|' read -ra items <<< "$CONFIGS"
for item in "${items[@]}"; do
  name=${item%%=*}
  flags=${item#*=}
  # shellcheck disable=SC2086
  $PY -m launcher --model-id "shard/native/configs/$MODEL.json" --load-format dummy --dtype "$DTYPE" \
    --tokenizer-name "$TOK" $LIMITS $SERVE $flags --hostname 127.0.0.1 --port "$PORT" \
    --shard-uds-path "/tmp/hvs-$name" > "$OUT/stack-$tag-$name.log" 2>&1 &
  for i in $(seq 180); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 1; done
  echo "=== $tag $name ($flags): stack up after $i s"
  for r in $(seq "$RUNS"); do
    seed=$((seed + 1))
    timeout 120 $PY -m bench.serve_bench --base-url "http://127.0.0.1:$PORT" --tokenizer "$TOK" --warmup-requests 8 \
      --seed $seed --client-procs 4 --plan "$PLAN" --out "$OUT/http-$tag-$name-s$seed.json" 2>&1 | grep "$FILTER"
  done
  pkill -f "python3? -m launcher" ; sleep 5; pkill -9 -f "python3? -m (shard|router)"
done
echo "=== sched_bench"
seed=$((seed + 1))
# shellcheck disable=SC2086
timeout 180 $PY -m bench.sched_bench --launch --num-shard 1 \
  --shard-args "--model-id $MODEL --load-format dummy --dtype $DTYPE $LIMITS" \
  --router-args "--tokenizer-name $TOK $LIMITS $SERVE" --warmup-requests 8 --seed $seed --plan "$PLAN" \
  --out "$OUT/sched-$tag.json" 2>&1 | grep "$FILTER"

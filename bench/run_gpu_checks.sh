#!/usr/bin/env bash
# GPU correctness and multi-GPU scaling in one device call (the device keeps a machine only ~30 s
# between calls, so everything that belongs together runs here):
#   bench   engine micro-benchmark over gRPC at batch 1 and 64, Llama-3.1-8B shapes, bf16, dummy
#           weights: TP=1 with 1, 4 and 8 decode steps per call; TP=2 and TP=4 when the GPUs are there
#   profile where a batch-1 step goes in-process (bench/profile_decode.py: bare graph replay)
#   serve   HTTP serving, TP=1: 128/128 at concurrency 1, 64 and all at once (1,024 prompts), and
#           1024/128 at concurrency 1 (TTFT of a 1k prompt on an idle server)
#   tests  kernels, engine vs transformers, TP NCCL logits, and the whole stack vs transformers at
#          TP=1/2/4 and PP=2 (tests/test_gpu_stack.py; needs TOKENIZER); one pytest per file, each
#          under TESTS_TIMEOUT seconds (default 300), logs tests-<file>.log
#   router  the router's own limit on this host's CPU (bench/router_bench.py, counting test engine)
#   equal   HTTP vs engine at the same load: one wave of B prompts (128 in, 128 out) through HTTP
#           (serve_bench, all at once) and over gRPC (engine_bench, the same prefill chunks, 127 decode
#           steps at the router's 4 per call), B = 1, 64, 256; prints HTTP tok/s / engine tok/s
#   fused   TP=FUSED_TP (default 2) with the decode reduces fused into the norms (fast_allreduce.py)
#           beside NCCL + norm (SHARD_FUSED_ALLREDUCE=0) and TP=1, engine bench on the same host; the
#           kernel alone first (bench/allreduce_bench.py: any hang shows there, under a timeout), then
#           the TP unit tests and the whole-stack fused-vs-NCCL test at that TP
#   maxload max-load HTTP serving, TP=1, --max-batch-size 256: 128/128 with 1,024 prompts at once
#           (first from the checkout in BASE, if set, for a same-machine baseline), then 2048/128 and
#           1000/1000 (MAXLOAD_MORE=0 skips those; MAXLOAD_BATCH=512 raises the cap; with
#           MAXLOAD_BATCH2 set, 128/128 runs once more at that cap, name "cap<N>"; MAXLOAD_128=0 skips
#           128/128; with BASE set, the checkout there runs every preset first, as "baseline*";
#           MAXLOAD_EXTRA: more launcher flags, e.g. "--scheduler-policy guaranteed_no_evict")
#
#   longctx decode at 1,000-token contexts (engine_bench, batch 1 to 192) against the memory floor
#           (weights + every sequence's K/V over the copy bandwidth measured first: bench/batch_ceiling.py)
#
#   bench/run_gpu_checks.sh            # STAGES="bench profile serve tests" (default), OUT=results folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu-checks-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-bench profile serve tests}
export TOKENIZER=${TOKENIZER:-.bench-tokenizer}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi -L
has() { [[ " $STAGES " == *" $1 "* ]]; }
engine() {  # engine NAME NUM_SHARD STEPS_PER_CALL [env...]
  local name=$1 n=$2 spc=$3
  shift 3
  echo "=== engine $name"
  env "$@" timeout -k 30 200 $PY -m bench.engine_bench --launch --model-id llama-3.1-8b --num-shard "$n" \
    --shard-args "--load-format dummy --dtype bfloat16" --batch-sizes 1,64 --input-len 128 --decode-steps 64 \
    --prefill-lens 1024 --runs 2 --steps-per-call "$spc" --out "$OUT/engine-$name.json" --shard-log "$OUT/shards-$name.log" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING' | tail -n 8
}
if has bench; then
  engine tp1 1 1,4,8
  [ "$GPUS" -ge 2 ] && engine tp2 2 4,8
  [ "$GPUS" -ge 4 ] && engine tp4 4 4,8
fi
if has profile; then
  echo "=== profile"
  timeout -k 30 150 $PY -m bench.profile_decode --batch 1 2>&1 | tee "$OUT/profile-b1.log" | grep -E "graphs=|bare" | head
fi
if has serve; then
  echo "=== serve"
  LAUNCH="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16"
  LAUNCH+=" --tokenizer-name $TOKENIZER --max-input-tokens 2048 --max-total-tokens 4096"
  LAUNCH+=" --max-batch-prefill-tokens 8192 --max-concurrent-requests 1024"
  timeout -k 30 300 $PY -m bench.serve_bench --launch="$LAUNCH" --tokenizer "$TOKENIZER" \
    --plan "128/128|1,64,inf|8,256,1024" "1024/128|1|4" --out "$OUT/serve-tp1.json" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' | tail -n 7
fi
if has router; then
  echo "=== router"
  timeout -k 30 200 $PY -m bench.router_bench --tokenizer "$TOKENIZER" --concurrency 256,1024 --out "$OUT/router.json" 2>&1 | tail -n 5
fi
if has fused && [ "$GPUS" -ge "${FUSED_TP:=2}" ]; then
  echo "=== fused at TP=$FUSED_TP: kernel alone"
  if timeout -k 10 150 $PY -m bench.allreduce_bench --world "$FUSED_TP" --out "$OUT/allreduce-$FUSED_TP.json" \
      > "$OUT/allreduce-$FUSED_TP.log" 2>&1; then
    tail -n 9 "$OUT/allreduce-$FUSED_TP.log"
    engine tp1-same-host 1 4
    engine "tp$FUSED_TP-nccl" "$FUSED_TP" 4 SHARD_FUSED_ALLREDUCE=0
    engine "tp$FUSED_TP-fused" "$FUSED_TP" 4 SHARD_FUSED_ALLREDUCE=1
    timeout -k 30 ${FUSED_TESTS_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider "tests/test_native_tp.py" \
      "tests/test_gpu_stack.py::test_stack_bf16_fused_allreduce_equals_nccl[$FUSED_TP]" ${FUSED_TESTS:-} -rs 2>&1 \
      | tee "$OUT/tests-fused.log" | tail -n 6
  else
    echo "allreduce_bench failed or hung:"; tail -n 30 "$OUT/allreduce-$FUSED_TP.log"
  fi
fi
if has maxload; then
  echo "=== maxload"
  TOK=$(realpath "$TOKENIZER") OUTABS=$(realpath -m "$OUT")
  ML="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16 --tokenizer-name $TOK"
  ML+=" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192"
  ML+=" --max-concurrent-requests 1024 --max-batch-size ${MAXLOAD_BATCH:-256} ${MAXLOAD_EXTRA:-}"
  maxload() {  # maxload DIR NAME PLAN...
    local dir=$1 name=$2
    shift 2
    (cd "$dir" && timeout -k 30 280 $PY -m bench.serve_bench --launch="$ML" --tokenizer "$TOK" --warmup-requests 4 \
      --plan "$@" --out "$OUTABS/maxload-$name.json" 2>&1 \
      | grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' | tail -n 5)
  }
  if [ "${MAXLOAD_128:-1}" = 1 ]; then
    [ -n "${BASE:-}" ] && maxload "$BASE" baseline "128/128|inf|1024"
    maxload . new "128/128|inf|1024"
  fi
  if [ -n "${MAXLOAD_BATCH2:-}" ]; then
    ML=${ML/--max-batch-size ${MAXLOAD_BATCH:-256}/--max-batch-size $MAXLOAD_BATCH2}
    maxload . "cap$MAXLOAD_BATCH2" "128/128|inf|1024"
  fi
  if [ "${MAXLOAD_MORE:-1}" = 1 ]; then
    [ -n "${BASE:-}" ] && maxload "$BASE" baseline-more "2048/128|inf|256" "1000/1000|inf|384"
    maxload . more "2048/128|inf|256" "1000/1000|inf|384"
  fi
fi
if has equal; then
  echo "=== equal"
  timeout -k 30 200 $PY -m bench.engine_bench --launch --model-id llama-3.1-8b --num-shard 1 \
    --shard-args "--load-format dummy --dtype bfloat16" --batch-sizes 1,64,256 --input-len 128 \
    --decode-steps 127 --prefill-lens "" --runs 2 --steps-per-call 4 --out "$OUT/equal-engine.json" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING' | tail -n 4
  EQ="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16 --tokenizer-name $TOKENIZER"
  EQ+=" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192 --max-batch-size 256"
  EQ+=" --max-concurrent-requests 1024"
  timeout -k 30 250 $PY -m bench.serve_bench --launch="$EQ" --tokenizer "$TOKENIZER" --warmup-requests 4 \
    --plan "128/128|1|3" "128/128|inf|64" "128/128|inf|256" --out "$OUT/equal-http.json" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' | tail -n 5
  $PY -m bench.equal_load "$OUT/equal-engine.json" "$OUT/equal-http.json" | tee "$OUT/equal.txt"
fi
if has longctx; then
  echo "=== longctx"
  $PY -m bench.bandwidth --config llama-3.1-8b --dtype bfloat16 --context 0,1024 --out "$OUT/bandwidth.json" 2>&1 | tail -n 3
  timeout -k 30 250 $PY -m bench.engine_bench --launch --model-id llama-3.1-8b --num-shard 1 \
    --shard-args "--load-format dummy --dtype bfloat16" --batch-sizes 1,32,64,128,192 --input-len 1000 \
    --decode-steps 32 --prefill-lens "" --runs 2 --steps-per-call 4 --out "$OUT/engine-longctx.json" 2>&1 \
    | grep -v '^\[shard\|^INFO\|^WARNING' | tail -n 7
  $PY -m bench.batch_ceiling "$OUT/engine-longctx.json" "$OUT/bandwidth.json" | tee "$OUT/longctx.txt"
fi
if has tests; then
  # One pytest (and one log, one time limit) per file: a run cut by its limit loses one file's
  # result, not all of them (the eleventh session's 4-GPU run outgrew a single 520 s limit).
  for t in tests/test_kernels_gpu.py tests/test_gpu_engine.py tests/test_gpu_stack.py \
      "tests/test_native_tp.py::test_tp2_nccl_matches_tp1_cuda"; do
    name=$(basename "${t%%::*}" .py)
    echo "=== tests: $t"
    timeout -k 30 "${TESTS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider "$t" -rs 2>&1 \
      | tee "$OUT/tests-$name.log" | tail -n 6
  done
fi

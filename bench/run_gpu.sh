#!/usr/bin/env bash
# The GPU benchmark in one command (one device call, ~9 minutes on one H100 in quick mode):
#   bandwidth ceiling -> engine micro-benchmark over gRPC -> HTTP serving presets -> the same plan
#   through the router's scheduler without HTTP (sched) -> HF baseline -> plots -> a compact summary
#   table (printed last).
#
#   bench/run_gpu.sh [quick|full|matrix|smoke]
#
# matrix: the whole serving matrix (4 presets x concurrency 1, 16, 64, unlimited) through HTTP and
# through the scheduler alone, ~8 min on one H100; STAGES="serve sched" for those two only (the
# other stages then fit a second call).
#
# Environment (all optional):
#   OUT        where results go (the device tool sets it; default bench/results/gpu-<date>)
#   NUM_SHARD  tensor-parallel ranks for the engine and serving runs (default 1)
#   MODEL      shard --model-id: bundled config name or config .json (dummy weights) or a folder
#              (default llama-3.1-8b: Llama-3.1-8B shapes, bf16, the engine's dummy weights)
#   TOKENIZER  tokenizer folder for the router (default .bench-tokenizer); make it here with
#              `.venv/bin/python -m bench.serve_bench --save-tokenizer .bench-tokenizer` (SmolLM2's
#              tokenizer: its 49152 ids are all valid for a 128256-token model) and carry it
#   DTYPE      bfloat16 (default) | float16 | float32
#   STAGES     subset of "bw engine serve sched hf" (default all but sched); PY (default python3)
#   CLIENT_PROCS  serve_bench client processes per level (default 4)
# Needs on the device: generated stubs (make stubs here, carried), and the wheels the router needs
# (fastapi, uvicorn, pydantic, starlette, gguf) on PYTHONPATH. Each stage has its own time limit and
# writes its JSON as it goes, so a stage cut short still leaves what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-quick}
PY=${PY:-python3}
NUM_SHARD=${NUM_SHARD:-1}
MODEL=${MODEL:-llama-3.1-8b}
DTYPE=${DTYPE:-bfloat16}
TOKENIZER=${TOKENIZER:-.bench-tokenizer}
STAGES=${STAGES:-bw engine serve hf}
# The launcher takes paths (or Hub ids), not the shard's bundled config names: resolve the name.
MODEL_PATH=$MODEL
[ -f "shard/native/configs/$MODEL.json" ] && MODEL_PATH=shard/native/configs/$MODEL.json
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG=$OUT/run.log
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

case $MODE in
  quick)
    T_BW=40 T_ENGINE=150 T_SERVE=210 T_HF=120
    ENGINE_ARGS=(--batch-sizes 1,2,4,8,16,32,64,128,256 --input-len 128 --decode-steps 64 --prefill-lens 1024 --runs 2)
    # one serve_bench call per line: presets | concurrency levels | prompts per level
    SERVE_PLAN=("128/128|1,16,64,inf|8,32,128,256" "1024/128|64|64" "2048/128|inf|64" "1000/1000|inf|64")
    HF_ARGS=(--batch-sizes 1,16,64 --input-len 128 --output-len 128 --presets 1024/128 --preset-batches 64 --runs 2)
    ;;
  full)
    T_BW=60 T_ENGINE=400 T_SERVE=1500 T_HF=600
    ENGINE_ARGS=(--batch-sizes 1,2,4,8,16,32,64,128,256 --input-len 128 --decode-steps 128 --prefill-lens 128,1024,2048 --runs 3)
    SERVE_PLAN=("128/128,1024/128,2048/128|1,16,64,inf|16,64,256,512" "1000/1000|1,16,64,inf|4,32,128,256")
    HF_ARGS=(--batch-sizes 1,4,16,64,128 --input-len 128 --output-len 128 --presets 128/128,1024/128,2048/128,1000/1000 --preset-batches 1,16,64 --runs 3)
    ;;
  matrix)
    T_BW=40 T_ENGINE=150 T_SERVE=290 T_HF=150
    ENGINE_ARGS=(--batch-sizes 1,16,64,256 --input-len 128 --decode-steps 64 --prefill-lens 1024 --runs 2)
    SERVE_PLAN=("128/128|1,16,64,inf|4,32,128,512" "1024/128,2048/128|1,16,64,inf|4,32,128,256"
                "1000/1000|1,16,64,inf|2,16,64,256")
    HF_ARGS=(--batch-sizes 1,16,64 --input-len 128 --output-len 128 --presets 1024/128,2048/128 --preset-batches 16 --runs 2)
    ;;
  smoke)  # seconds on a CPU with MODEL=llama-tiny DTYPE=float32: checks this script, measures nothing
    T_BW=60 T_ENGINE=120 T_SERVE=240 T_HF=120
    ENGINE_ARGS=(--batch-sizes 1,4 --input-len 16 --decode-steps 8 --prefill-lens 64 --runs 1)
    SERVE_PLAN=("32/8|1,inf|2,4")
    HF_ARGS=(--batch-sizes 1,2 --input-len 16 --output-len 8 --presets 32/8 --preset-batches 2 --runs 1)
    ;;
  *) echo "usage: $0 [quick|full|smoke]" >&2; exit 2 ;;
esac

has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME LIMIT_S CMD... : runs CMD under a time limit, output to the log and stdout
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout -k 60 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v '^\[shard\|^INFO\|^WARNING' | tail -n 15
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c 'from bench.common import machine_facts; print(machine_facts())' 2>&1 | tee -a "$LOG"

has bw && stage bandwidth "$T_BW" $PY -m bench.bandwidth --config "$MODEL" --dtype "$DTYPE" \
  --context 0,1024,2048 --tp-size "$NUM_SHARD" --out "$OUT/bandwidth.json"

has engine && stage engine "$T_ENGINE" $PY -m bench.engine_bench --launch --model-id "$MODEL" \
  --num-shard "$NUM_SHARD" --shard-args "--load-format dummy --dtype $DTYPE" "${ENGINE_ARGS[@]}" \
  --out "$OUT/engine.json"

if has serve; then
  if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
    echo "=== serve: skipped, no tokenizer at $TOKENIZER (see the header of $0)" | tee -a "$LOG"
  else
    LAUNCH="--model-id $MODEL_PATH --load-format dummy --dtype $DTYPE --tokenizer-name $TOKENIZER --num-shard $NUM_SHARD"
    LAUNCH+=" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192"
    LAUNCH+=" --max-concurrent-requests 1024"
    # All serving levels share one launched stack: serve_bench runs the plan lines in one process.
    # CLIENT_PROCS client processes (default 4; at most each level's concurrency): one Python
    # client paced the 128/128 levels with hundreds of requests at once (BENCHMARKS.md, tenth session)
    stage serve "$T_SERVE" $PY -m bench.serve_bench --launch="$LAUNCH" --tokenizer "$TOKENIZER" \
      --client-procs "${CLIENT_PROCS:-4}" --plan "${SERVE_PLAN[@]}" --out "$OUT/serve.json"
  fi
fi

# the serving plan again, through the router's scheduler in-process (no HTTP); its shards' log is
# kept (with SHARD_GPU_GAPS=1 in the environment it holds where the GPU idled, by transition)
if has sched; then
  stage sched "$T_SERVE" $PY -m bench.sched_bench --launch --num-shard "$NUM_SHARD" \
    --shard-args "--model-id $MODEL --load-format dummy --dtype $DTYPE --max-input-tokens 2048 --max-total-tokens 4096" \
    --router-args "--tokenizer-name $TOKENIZER --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192 --max-concurrent-requests 1024 ${ROUTER_ARGS:-}" \
    --plan "${SERVE_PLAN[@]}" --out "$OUT/sched.json" --shard-log "$OUT/sched-shards.log"
fi

has hf && stage hf "$T_HF" $PY -m bench.hf_baseline --model "$MODEL" --dtype "$DTYPE" "${HF_ARGS[@]}" --out "$OUT/hf.json"

$PY -m bench.plots "$OUT"/*.json --out-dir "$OUT" >>"$LOG" 2>&1
echo "=== summary ($MODE, NUM_SHARD=$NUM_SHARD, MODEL=$MODEL; files in $OUT)"
$PY -m bench.plots --summary "$OUT"/*.json

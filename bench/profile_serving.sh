#!/usr/bin/env bash
# py-spy profiles of the router and of shard rank 0 while a max-load serving benchmark runs, one GPU,
# Llama-3.1-8B shapes, dummy bf16 weights (carry py-spy's wheel in .whl; it lands in /tmp/site/bin):
#   PLAN="1000/1000|inf|384" OUT=bench/results/NAME bench/profile_serving.sh
# Recording starts once the running batch holds at least MIN_BATCH sequences (the warmup requests
# are done by then) and lasts SPY_SECONDS. Outputs: serve.json (the benchmark), router.txt and
# shard.txt (py-spy raw stacks: "frame;frame;... count" per line), summarised with
# bench/spy_summary.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SPY=${SPY:-$(command -v py-spy || echo /tmp/site/bin/py-spy)}
OUT=${OUT:-bench/results/profile-serving-$(date +%Y%m%d-%H%M%S)}
PLAN=${PLAN:-1000/1000|inf|384}
MIN_BATCH=${MIN_BATCH:-64}
SPY_SECONDS=${SPY_SECONDS:-15}
TOK=$(realpath "${TOKENIZER:-.bench-tokenizer}")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
L="--model-id shard/native/configs/llama-3.1-8b.json --load-format dummy --dtype bfloat16 --tokenizer-name $TOK"
L+=" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens 8192"
L+=" --max-concurrent-requests 1024 --max-batch-size ${MAXLOAD_BATCH:-512}"
timeout -k 30 300 $PY -m bench.serve_bench --launch="$L" --tokenizer "$TOK" --warmup-requests 4 --plan "$PLAN" \
  --out "$OUT/serve.json" > "$OUT/serve.log" 2>&1 &
bench=$!
batch() {  # the router's running batch size, from its /metrics (the stack picks a free port)
  local pid port
  pid=$(pgrep -f '^\S*python\S* -m router' | head -n 1); [ -n "$pid" ] || return
  port=$(tr '\0' ' ' < "/proc/$pid/cmdline" | sed -n 's/.*--port \([0-9]*\).*/\1/p')
  $PY -c "import re,urllib.request as u; t=u.urlopen('http://127.0.0.1:$port/metrics',timeout=2).read().decode(); print(int(float(re.search(r'^tgi_batch_current_size (\S+)',t,re.M).group(1))))" 2>/dev/null
}
for _ in $(seq 280); do
  b=$(batch); [ -n "$b" ] && [ "$b" -ge "$MIN_BATCH" ] && break
  kill -0 $bench 2>/dev/null || break
  sleep 1
done
echo "recording at batch ${b:-?}"
router=$(pgrep -f '^\S*python\S* -m router' | head -n 1)
shard=$(pgrep -f '^\S*python\S* -m shard' | head -n 1)
$SPY record -p "$router" -d "$SPY_SECONDS" -r 200 -f raw -o "$OUT/router.txt" --nonblocking > "$OUT/spy-router.log" 2>&1 &
$SPY record -p "$shard" -d "$SPY_SECONDS" -r 200 -f raw -o "$OUT/shard.txt" --nonblocking --threads > "$OUT/spy-shard.log" 2>&1 &
wait $bench
wait
grep -v '^\[shard\|^INFO\|^WARNING\|^\[router\|^\[launcher' "$OUT/serve.log" | tail -n 4
for f in router shard; do echo "--- $f"; $PY bench/spy_summary.py "$OUT/$f.txt" 22; done

"""Engine + scheduler, no HTTP: the router's own Scheduler runs in this process against a shard
world over real gRPC; requests go in as token ids and their tokens are only counted (no
tokenizing, detokenizing, JSON or HTTP).

    python -m bench.sched_bench --launch --shard-args "--model-id llama-3.1-8b --load-format dummy" \
        --router-args "--tokenizer-name .bench-tokenizer --max-batch-size 512" --plan "128/128|inf|1024"

Why: this is the side of "HTTP against the engine at the same load" that the one-wave engine bench
cannot give -- the same continuous batching, arrivals and concurrency levels as `serve_bench`, minus
the HTTP server and the per-token text work. It is also what TensorRT-LLM's published max-load
figures measure (trtllm-bench: the engine and its in-flight batcher in one process, no HTTP).
Running both with one plan on one machine splits a serving figure into engine + scheduling, and
the HTTP/text layer on top. Output: the same per-level JSON as serve_bench ("benchmark": "sched").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shlex
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    GpuBusy,
    RequestRecord,
    exit_on_sigterm,
    machine_facts,
    results_path,
    write_results,
)
from bench.engine_bench import launched_shards
from bench.serve_bench import level_result, levels_table, num_prompts_for, parse_counters, plan
from router import gc_policy
from router.backend import Backend
from router.config import parse_args as parse_router_args
from router.errors import OverloadedError
from router.scheduler import Scheduler
from router.types import GenerateRequest, SamplingParams


def counters() -> dict[str, float]:
    """This process's router metrics (the same counters serve_bench reads from /metrics)."""
    from prometheus_client import REGISTRY, generate_latest

    return parse_counters(generate_latest(REGISTRY).decode())


async def one(
    scheduler: Scheduler, ids: tuple[int, ...], out_len: int, sem: asyncio.Semaphore
) -> RequestRecord:
    """One request as a streaming client would see it: a chunk time per token as the scheduler
    hands it over (tokens of one multi-step call arrive together, as joined SSE events do)."""
    async with sem:
        rec = RequestRecord(start=time.perf_counter(), input_tokens=len(ids))
        request = GenerateRequest(
            input_ids=ids, sampling=SamplingParams(), max_new_tokens=out_len, ignore_eos_token=True
        )
        try:
            handle = scheduler.submit(request)
            async for tok in handle:
                rec.chunk_times.append(time.perf_counter())
                if tok.finish_reason is not None:
                    rec.finish_reason = tok.finish_reason.value
            rec.end = time.perf_counter()
            rec.output_tokens = len(rec.chunk_times)
        except OverloadedError as e:  # --max-concurrent-requests, as a 429 would be
            rec.error = f"overloaded: {e}"
        except Exception as e:  # a benchmark reports failed requests, it does not stop on them
            rec.error = f"{type(e).__name__}: {e}"[:200]
        return rec


async def run_level(
    scheduler: Scheduler, prompts: list[tuple[int, ...]], *, out_len: int, concurrency: int | None
) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(concurrency or len(prompts))
    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(scheduler, p, out_len, sem) for p in prompts))
    return list(records), time.perf_counter() - t0


async def run_benchmark(
    url: str, args: argparse.Namespace, save: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config = parse_router_args([*shlex.split(args.router_args), "--master-shard-uds-path", url], env={})
    backend = Backend(config)
    await backend.start()
    assert backend.scheduler is not None and backend.tokenizer is not None and backend.info is not None
    info = {"shard": repr(backend.info), "limits": repr(backend.limits), "router_config": repr(config)}
    # Prompt ids: ordinary tokens of the router's tokenizer (any id below the model's vocabulary
    # would do; these keep the prompts comparable with serve_bench's).
    tok = backend.tokenizer
    vocab = [i for i in range(min(tok.vocab_size, backend.info.vocab_size)) if not tok.is_special(i)]
    rng = random.Random(args.seed)
    results: list[dict[str, Any]] = []
    # The router's garbage-collector policy, as router/__main__.py applies it after start-up:
    # without it, full collections over this process's heap stalled the scheduler's event loop
    # ~250 ms twice in a 9 s run at 128/128 (bench/call_trace.py, ninth session), which the
    # router serving HTTP does not suffer.
    gc_policy.tune_after_startup()
    try:
        for preset, levels, counts in plan(args):
            in_len, out_len = (int(x) for x in preset.split("/"))
            if args.warmup_requests:
                warm = [tuple(rng.choices(vocab, k=in_len)) for _ in range(args.warmup_requests)]
                await run_level(backend.scheduler, warm, out_len=min(out_len, 16), concurrency=None)
            for k, conc in enumerate(levels):
                prompts = [
                    tuple(rng.choices(vocab, k=in_len)) for _ in range(num_prompts_for(conc, counts, k))
                ]
                before = counters()
                with GpuBusy() as busy:
                    records, duration = await run_level(
                        backend.scheduler, prompts, out_len=out_len, concurrency=conc
                    )
                after = counters()
                res = level_result(records, duration, preset=preset, concurrency=conc, max_new_tokens=out_len)
                res["server_counters"] = {key: after[key] - before.get(key, 0.0) for key in after}
                res["gpu_busy_pct"] = busy.result()
                res["exact_input_fraction"] = 1.0  # ids go in as given
                results.append(res)
                save(results, info)
                print(
                    f"{preset:>9} c={res['concurrency']!s:>4} n={len(prompts):4d}: "
                    f"{res['output_throughput']:9.1f} out tok/s  TTFT p50 {res['ttft_ms']['p50']:8.1f} ms  "
                    f"TPOT p50 {res['tpot_ms']['p50']:7.2f} ms  failed {res['failed']}",
                    flush=True,
                )
    finally:
        await backend.stop()
    return results, info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sched_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="", help="a running master shard (unix:///path or host:port)")
    p.add_argument("--launch", action="store_true", help="start the shard world (mpiexec) for this run")
    p.add_argument("--num-shard", type=int, default=1, help="with --launch: ranks (tensor parallel)")
    p.add_argument("--shard-args", default="", help="with --launch: the shard's flags")
    p.add_argument("--shard-log", default="", help="with --launch: keep the ranks' log in this file")
    p.add_argument(
        "--router-args",
        default="",
        help="the router's flags (python -m router --help); its tokenizer is loaded",
    )
    p.add_argument("--plan", nargs="+", required=True, metavar="PRESETS|LEVELS|COUNTS",
                   help="as serve_bench's --plan, e.g. '128/128|1,16,64,inf|8,32,128,256'")  # fmt: skip
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="results JSON (default bench/results/sched-<card>-<date>.json)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.launch and not args.url:
        raise SystemExit("give --url of a running shard, or --launch")
    exit_on_sigterm()
    facts = machine_facts()
    out = args.out or str(results_path("sched", facts))

    def save(levels: list[dict[str, Any]], info: dict[str, Any]) -> Any:
        payload = {
            "benchmark": "sched",
            "machine": facts,
            "params": vars(args),
            "server_info": info,
            "levels": levels,
        }
        return write_results(payload, name="sched", out=out)

    with contextlib.ExitStack() as stack:
        url = args.url
        if args.launch:
            url = stack.enter_context(
                launched_shards(
                    num_shard=args.num_shard, shard_args=shlex.split(args.shard_args), keep_log=args.shard_log
                )
            )
        results, info = asyncio.run(run_benchmark(url, args, save))
    path = save(results, info)
    print(levels_table(results))
    print(f"latencies in ms; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

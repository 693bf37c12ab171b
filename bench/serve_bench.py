"""HTTP serving benchmark (like `vllm bench serve`) against /generate_stream (TGI's SSE).

    python -m bench.serve_bench --base-url http://127.0.0.1:3000 --presets 128/128 --concurrency 1,16
    python -m bench.serve_bench --launch "--max-input-tokens 2048 --max-total-tokens 4096"

Prompts: random token ids decoded with the model's tokenizer, re-encoded, then trimmed or padded
and re-checked until the text encodes (as the router encodes it, special tokens included) to
exactly the preset's input length; the length actually reached is recorded per request. Output
length: `parameters.max_new_tokens` plus an ignore-EOS field (--ignore-eos-field; dropped silently
by a router that does not know it); the tokens actually generated (details.generated_tokens) are
what every throughput counts, and `exact_output_fraction` says how many requests reached the
preset's length. Greedy decoding.

Per level (preset x concurrency): TTFT, TPOT = (e2e - ttft)/(out - 1), ITL (every gap between
token events) and e2e latency at mean/p50/p90/p99, request and output-token throughput.
Concurrency "inf" sends all prompts of the level at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    GpuBusy,
    RequestRecord,
    aggregate,
    exit_on_sigterm,
    format_table,
    machine_facts,
    results_path,
    write_results,
)

PRESETS = ("128/128", "1000/1000", "2048/128", "1024/128")
SAMPLES_PER_LEVEL = 5000  # ITL samples kept per level for CDF plots


# ----------------------------------------------------------------------------------- prompts


def exact_prompt(
    tok: Any, length: int, rng: random.Random, *, vocab: Sequence[int], tries: int = 20
) -> tuple[str, int]:
    """(text, n) where tok.encode(text) has n tokens, n == length unless `tries` rounds of
    trim/pad did not converge (then the closest seen). `tok` has encode(text, add_special_tokens)
    and decode(ids) (router.tokenizer.Tokenizer)."""
    n_special = len(tok.encode("", add_special_tokens=True))  # BOS etc. the router adds
    if length <= n_special:
        raise ValueError(
            f"a prompt of {length} tokens has no room for text beside {n_special} special token(s)"
        )
    ids = [rng.choice(vocab) for _ in range(length - n_special)]
    best: tuple[str, int] | None = None
    for _ in range(tries):
        text = tok.decode(ids)
        n = len(tok.encode(text, add_special_tokens=True))
        if best is None or abs(n - length) < abs(best[1] - length):
            best = (text, n)
        if n == length:
            break
        core = tok.encode(text, add_special_tokens=False)
        want = length - n_special
        ids = core[:want] if len(core) > want else core + [rng.choice(vocab) for _ in range(want - len(core))]
    assert best is not None
    return best


def plain_vocab(tok: Any) -> list[int]:
    """Ids of ordinary tokens (not special), the alphabet random prompts are drawn from."""
    return [i for i in range(tok.vocab_size) if not tok.is_special(i)]


# ----------------------------------------------------------------------------------- one request


async def stream_one(
    session: Any,
    url: str,
    *,
    prompt: str,
    input_tokens: int,
    max_new_tokens: int,
    extra_params: dict[str, Any],
) -> RequestRecord:
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": max_new_tokens, "details": True, "do_sample": False, **extra_params},
    }
    rec = RequestRecord(start=time.perf_counter(), input_tokens=input_tokens)
    try:
        async with session.post(url + "/generate_stream", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[5:])
                if "error" in event and event.get("token") is None:
                    rec.error = f"{event.get('error_type')}: {event['error']}"[:200]
                    return rec
                if event.get("token") is not None:
                    rec.chunk_times.append(now)
                details = event.get("details")
                if details:
                    rec.output_tokens = int(details.get("generated_tokens", 0))
                    rec.finish_reason = details.get("finish_reason")
        rec.end = time.perf_counter()
        if not rec.output_tokens:
            rec.output_tokens = len(rec.chunk_times)
    except Exception as e:  # a benchmark reports failed requests, it does not stop on them
        rec.error = f"{type(e).__name__}: {e}"[:200]
    return rec


async def run_level(
    base_url: str,
    prompts: list[tuple[str, int]],
    *,
    max_new_tokens: int,
    concurrency: int | None,
    extra_params: dict[str, Any],
    trace: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Sends every prompt, at most `concurrency` in flight (None: all at once); returns the records
    and the wall time from the first send to the last completion."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency or len(prompts))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(p: tuple[str, int]) -> RequestRecord:
            async with sem:
                return await stream_one(
                    session,
                    base_url,
                    prompt=p[0],
                    input_tokens=p[1],
                    max_new_tokens=max_new_tokens,
                    extra_params=extra_params,
                )

        t0 = time.perf_counter()
        if trace:
            _trace_level_start(t0, len(prompts))
        records = await asyncio.gather(*(one(p) for p in prompts))
        return list(records), time.perf_counter() - t0


def _warm_process(hold: float) -> None:
    """Runs once in each client process before a level: its imports done, then held long enough
    that every process of the pool gets one of these (ProcessPoolExecutor starts one per idle
    slot)."""
    import aiohttp  # noqa: F401

    time.sleep(hold)


def _level_in_process(
    base_url: str, prompts: list[tuple[str, int]], max_new_tokens: int, concurrency: int | None,
    extra_params: dict[str, Any], start_at: float,
) -> tuple[list[RequestRecord], float]:
    """One client process's share of a level (run in a spawned process): starts at `start_at`
    (time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process), returns its
    records and its CPU seconds."""
    time.sleep(max(0.0, start_at - time.perf_counter()))
    cpu0 = time.process_time()
    records, _ = asyncio.run(
        run_level(base_url, prompts, max_new_tokens=max_new_tokens, concurrency=concurrency,
                  extra_params=extra_params, trace=False)
    )  # fmt: skip
    return records, time.process_time() - cpu0


async def run_level_procs(
    base_url: str,
    prompts: list[tuple[str, int]],
    *,
    procs: int,
    max_new_tokens: int,
    concurrency: int | None,
    extra_params: dict[str, Any],
) -> tuple[list[RequestRecord], float, float]:
    """run_level over `procs` client processes (at most `concurrency` of them; prompts dealt
    round-robin, the concurrency split so that the shares add up to it), so that one Python
    process's CPU does not pace the level. Returns the records, the wall time from the common start
    to the last completion, and the busiest process's CPU share of that wall time."""
    shares = concurrency_shares(concurrency, procs)
    procs = len(shares)
    if procs <= 1:
        cpu0 = time.process_time()
        records, duration = await run_level(
            base_url, prompts, max_new_tokens=max_new_tokens, concurrency=concurrency, extra_params=extra_params
        )
        return records, duration, (time.process_time() - cpu0) / duration if duration > 0 else 0.0
    import concurrent.futures
    import multiprocessing

    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        # Start every process and its imports (this module, aiohttp) before the clock does: a
        # process importing after the start sent its share late, so the first prefills went out
        # part-filled (eleventh session, concurrency 16: TTFT p50 182 ms from 4 processes, 94 from one).
        await asyncio.gather(*(loop.run_in_executor(pool, _warm_process, 0.3) for _ in range(procs)))
        start_at = time.perf_counter() + 0.5
        _trace_level_start(start_at, len(prompts))
        done = await asyncio.gather(*(
            loop.run_in_executor(pool, _level_in_process, base_url, prompts[i::procs], max_new_tokens, shares[i],
                                 extra_params, start_at)
            for i in range(procs)
        ))  # fmt: skip
    records = [r for recs, _ in done for r in recs]
    duration = max((r.end or r.start) for r in records) - start_at
    return records, duration, max(cpu for _, cpu in done) / duration if duration > 0 else 0.0


def concurrency_shares(concurrency: int | None, procs: int) -> list[int | None]:
    """Each client process's concurrency: at most `concurrency` processes, shares adding up to it
    (None: no limit in any of `procs` processes)."""
    if concurrency is None:
        return [None] * max(1, procs)
    n = max(1, min(procs, concurrency))
    return [concurrency // n + (i < concurrency % n) for i in range(n)]


def _trace_level_start(t0: float, n: int) -> None:
    """With TGI_CALL_TRACE=PREFIX (as for the router and shards): the level's start on the same
    host clock, so bench/call_trace.py can tell how long the requests took to reach the router."""
    prefix = os.environ.get("TGI_CALL_TRACE", "")
    if prefix:
        with open(f"{prefix}.client.{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(["level_start", str(n), t0]) + "\n")


def level_result(
    records: list[RequestRecord],
    duration: float,
    *,
    preset: str,
    concurrency: int | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    itls = [g * 1e3 for r in ok for g in r.itls]
    stride = max(1, math.ceil(len(itls) / SAMPLES_PER_LEVEL))
    return {
        "preset": preset,
        "concurrency": "inf" if concurrency is None else concurrency,
        **aggregate(records, duration),
        "exact_output_fraction": sum(r.output_tokens == max_new_tokens for r in ok) / len(ok) if ok else 0.0,
        "exact_input_fraction": None,  # filled by the caller, which knows the target
        "finish_reasons": {f: sum(r.finish_reason == f for r in ok) for f in {r.finish_reason for r in ok}},
        "samples": {
            "ttft_ms": [r.ttft * 1e3 for r in ok],
            "itl_ms": itls[::stride],
            "e2e_ms": [r.e2e * 1e3 for r in ok],
        },
    }


# ----------------------------------------------------------------------------------- the benchmark


def _levels(text: str) -> list[int | None]:
    return [None if c == "inf" else int(c) for c in text.split(",")]


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def plan(args: argparse.Namespace) -> list[tuple[str, list[int | None], list[int]]]:
    """(preset, concurrency levels, prompt counts) in run order: from --plan entries
    "PRESETS|LEVELS|COUNTS" (e.g. "128/128,1024/128|1,16,inf|8,32,64"), else from --presets,
    --concurrency and --num-prompts."""
    if not args.plan:
        return [(p, args.concurrency, args.num_prompts) for p in args.presets]
    out = []
    for entry in args.plan:
        presets, levels, counts = [*entry.split("|"), "", ""][:3]
        out += [(p, _levels(levels or "1,16,64,inf"), _counts(counts)) for p in presets.split(",")]
    return out


def input_lengths(in_len: int, n: int, rng: random.Random, *, spread: float) -> list[int]:
    """Each prompt's input length: the preset's, or with --input-range R drawn uniformly from
    [in_len * (1 - R), in_len * (1 + R)] (vllm bench serve's random range ratio, on the input
    side only: the output length stays the preset's, so levels compare by output tok/s). R = 0
    draws nothing, so a seed gives the same prompts as before the flag."""
    if spread <= 0:
        return [in_len] * n
    lo, hi = max(2, round(in_len * (1 - spread))), round(in_len * (1 + spread))
    return [rng.randint(lo, hi) for _ in range(n)]


def num_prompts_for(concurrency: int | None, override: list[int], index: int) -> int:
    """--num-prompts: one number for every level, one per level, or none: max(32, 4 x concurrency)
    (256 for "inf")."""
    if override:
        return override[index] if len(override) > 1 else override[0]
    return 256 if concurrency is None else max(32, 4 * concurrency)


async def run_benchmark(
    base_url: str, tok: Any, args: argparse.Namespace, save: Callable[[list[dict[str, Any]]], Any]
) -> list[dict[str, Any]]:
    """Every preset x concurrency level; `save` gets the levels so far after each one."""
    rng = random.Random(args.seed)
    vocab = plain_vocab(tok)
    extra = {args.ignore_eos_field: True} if args.ignore_eos_field else {}
    results = []
    for preset, levels, counts in plan(args):
        in_len, out_len = (int(x) for x in preset.split("/"))
        warm = [exact_prompt(tok, in_len, rng, vocab=vocab) for _ in range(args.warmup_requests)]
        if warm:
            await run_level(
                base_url, warm, max_new_tokens=min(out_len, 16), concurrency=None, extra_params=extra
            )
        for k, conc in enumerate(levels):
            targets = input_lengths(in_len, num_prompts_for(conc, counts, k), rng, spread=args.input_range)
            prompts = [exact_prompt(tok, n, rng, vocab=vocab) for n in targets]
            before = server_counters(base_url)
            with GpuBusy() as busy:
                records, duration, client_cpu = await run_level_procs(
                    base_url, prompts, procs=args.client_procs, max_new_tokens=out_len, concurrency=conc,
                    extra_params=extra,
                )  # fmt: skip
            after = server_counters(base_url)
            res = level_result(records, duration, preset=preset, concurrency=conc, max_new_tokens=out_len)
            res["server_counters"] = {k: after[k] - before.get(k, 0.0) for k in after}
            # from the first request on: several client processes start (spawn, imports) first
            res["gpu_busy_pct"] = busy.result(since=min((r.start for r in records), default=None))
            # The (busiest) client process's CPU over the level's wall time: near 1.0, the client
            # (aiohttp, SSE parsing in one Python process) and not the server set the pace.
            res["client_cpu_fraction"] = client_cpu
            res["client_procs"] = len(concurrency_shares(conc, args.client_procs))
            res["exact_input_fraction"] = sum(n == want for (_, n), want in zip(prompts, targets, strict=True)) / len(prompts)
            res["input_range"] = args.input_range
            results.append(res)
            save(results)
            print(
                f"{preset:>9} c={res['concurrency']!s:>4} n={len(prompts):4d}: "
                f"{res['output_throughput']:9.1f} out tok/s  TTFT p50 {res['ttft_ms']['p50']:8.1f} ms  "
                f"TPOT p50 {res['tpot_ms']['p50']:7.2f} ms  ITL p99 {res['itl_ms']['p99']:7.2f} ms  "
                f"failed {res['failed']}  client CPU {res['client_cpu_fraction'] or 0:.0%}",
                flush=True,
            )
    return results


def tokenizer_name(args: argparse.Namespace) -> str:
    """--tokenizer, else the launch's --tokenizer-name or --model-id, else the embedded model."""
    if args.tokenizer:
        return args.tokenizer
    launch = shlex.split(args.launch or "")
    for flag in ("--tokenizer-name", "--model-id"):
        if flag in launch and launch.index(flag) + 1 < len(launch):
            return launch[launch.index(flag) + 1]
    from launcher.embedded import embedded_model_path

    return embedded_model_path()


SERVER_COUNTERS = (
    "tgi_batch_inference_duration_sum",
    "tgi_batch_shard_duration_sum",
    "tgi_batch_forward_duration_sum",
    "tgi_batch_inference_count",
)
PLAIN_COUNTERS = ("tgi_batch_mixed_count",)


def server_counters(base_url: str) -> dict[str, float]:
    """The router's batch counters from /metrics (e.g. "tgi_batch_forward_duration_sum/decode"):
    their change over a level splits its wall time into engine time, RPC time and the rest
    (the router's own serial work). Empty when the server has no such metrics."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:
        return {}
    return parse_counters(text)


def parse_counters(text: str) -> dict[str, float]:
    """server_counters' values from a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in SERVER_COUNTERS and 'method="' in rest:
            method = rest.split('method="', 1)[1].split('"', 1)[0]
            out[f"{name}/{method}"] = float(line.rsplit(" ", 1)[1])
        elif line.split(" ", 1)[0] in PLAIN_COUNTERS:
            out["tgi_batch_mixed_count"] = float(line.rsplit(" ", 1)[1])
    return out


def server_info(base_url: str) -> dict[str, Any]:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/info", timeout=10) as r:
            return json.loads(r.read())
    except Exception as e:
        return {"error": repr(e)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:3000")
    p.add_argument(
        "--launch",
        default=None,
        metavar="ARGS",
        help="start the stack (tests/stack.py running_stack) with these launcher flags ('' = defaults)",
    )
    p.add_argument("--tokenizer", default="", help="tokenizer folder or .gguf (default: see tokenizer_name)")
    p.add_argument("--presets", type=lambda s: s.split(","), default=list(PRESETS), help="IN/OUT,IN/OUT,...")
    p.add_argument(
        "--concurrency", type=_levels, default=[1, 16, 64, None], help="levels, 'inf' = all at once"
    )
    p.add_argument(
        "--num-prompts",
        type=_counts,
        default=[],
        help="per level (one number, or one per concurrency level); default max(32, 4*c), 256 for inf",
    )
    p.add_argument(
        "--plan",
        nargs="+",
        default=[],
        metavar="PRESETS|LEVELS|COUNTS",
        help="instead of the three flags above: several entries, e.g. '128/128|1,16,inf|8,32,64'",
    )
    p.add_argument(
        "--input-range",
        type=float,
        default=0.0,
        metavar="R",
        help="input lengths uniform in [IN*(1-R), IN*(1+R)] instead of exactly IN (0 <= R < 1)",
    )
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes per level, at most its concurrency (prompts dealt among them, concurrency split)",
    )
    p.add_argument(
        "--ignore-eos-field",
        default="ignore_eos_token",
        help="parameters field asking the server to ignore EOS ('' to send none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument(
        "--save-tokenizer",
        default=None,
        metavar="DIR",
        help="only save the tokenizer (see --tokenizer) as a Hugging Face folder to DIR and exit",
    )
    p.add_argument(
        "--out", default=None, help="results JSON (default bench/results/serve-<card>-<date>.json)"
    )
    args = p.parse_args(argv)
    if not 0 <= args.input_range < 1:
        p.error(f"--input-range must be in [0, 1), got {args.input_range}")
    return args


def levels_table(results: list[dict[str, Any]]) -> str:
    """The per-level summary table (serve_bench's and sched_bench's)."""
    headers = ["preset", "conc", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50", "ITL p99"]
    rows = [
        [r["preset"], r["concurrency"], r["request_throughput"], r["output_throughput"], r["ttft_ms"]["p50"],
         r["ttft_ms"]["p99"], r["tpot_ms"]["p50"], r["itl_ms"]["p50"], r["itl_ms"]["p99"], r["exact_output_fraction"],
         "/".join(f"{x:g}" for x in r.get("gpu_busy_pct") or []) or "-"]
        for r in results
    ]  # fmt: skip
    return format_table([*headers, "exact out", "GPU busy %"], rows)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from router.tokenizer import load_tokenizer

    args = parse_args(argv)
    exit_on_sigterm()
    tok = load_tokenizer(tokenizer_name(args))
    if args.save_tokenizer:
        tok.hf.save_pretrained(args.save_tokenizer)
        print(f"saved {tok.name} to {args.save_tokenizer}")
        return 0
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if args.launch is not None:
            from tests.stack import running_stack

            base_url = stack.enter_context(
                running_stack(shlex.split(args.launch), timeout=args.startup_timeout)
            ).base_url
        info = server_info(base_url)
        facts = machine_facts()
        out = args.out or str(results_path("serve", facts))
        params = {
            **vars(args),
            "concurrency": ["inf" if c is None else c for c in args.concurrency],
            "tokenizer": tok.name,
        }

        def save(levels: list[dict[str, Any]]) -> Path:
            return write_results(
                {
                    "benchmark": "serve",
                    "machine": facts,
                    "params": params,
                    "server_info": info,
                    "levels": levels,
                },
                name="serve",
                out=out,
            )

        results = asyncio.run(run_benchmark(base_url, tok, args, save))
    path = save(results)
    print(levels_table(results))
    print(f"latencies in ms; wrote {path}")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

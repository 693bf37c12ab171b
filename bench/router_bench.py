"""Router overhead benchmark: how many output tokens per second the router can stream over HTTP
when the engine costs nothing, and how much of the router's CPU each token takes.

    python -m bench.router_bench --concurrency 64,128,256 --num-prompts 512

The whole stack runs for real (launcher, mpiexec, gRPC, router, HTTP/SSE, the bench's aiohttp
client), but the shard hosts the counting test double (tests/shard_test_engine.py): every token is
free, so the throughput measured is the serving path's own limit. The key figure is the router
process's CPU time per output token (user + system, from /proc, over the level): at max load the
router is a single Python event loop, so 1 / (CPU seconds per token) bounds its output tok/s on
one core of that machine, whatever the GPU does. The load generator shares the machine, so on a
small VM the wall-clock throughput understates what the router alone would reach.

With short outputs the router's cost per request dominates (HTTP, validation, tokenization,
starting the stream): e.g. `--output-len 4 --concurrency 512,512,512 --num-prompts 512` sends
bursts of 512 requests at once and reports the router's CPU microseconds per request;
`--profile FILE` records the router with py-spy (raw stacks, bench/spy_summary.py) meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import exit_on_sigterm, format_table, machine_facts, parse_int_list, write_results
from bench.serve_bench import exact_prompt, level_result, plain_vocab, run_level

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of one process (its threads included), from /proc/PID/stat; with
    `tid`, of that one thread only (tid == pid: the main thread, the router's event loop)."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def find_process(needle: str, marker: str) -> int:
    """The pid whose command line holds both strings (e.g. "router" and the stack's port)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and marker in cmd:
            return int(entry.name)
    raise RuntimeError(f"no process with {needle!r} and {marker!r} in its command line")


async def measure(
    base_url: str, pids: dict[str, int], prompts: list[tuple[str, int]], *, out_len: int, concurrency: int
) -> dict[str, Any]:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    loop_before = cpu_seconds(pids["router"], pids["router"])
    records, duration = await run_level(
        base_url,
        prompts,
        max_new_tokens=out_len,
        concurrency=concurrency,
        extra_params={"ignore_eos_token": True},
    )
    cpu = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    # The event loop's thread alone; the rest of the router's CPU is its other threads
    # (tokenizer pool, gRPC's).
    cpu["router_loop"] = cpu_seconds(pids["router"], pids["router"]) - loop_before
    res = level_result(
        records,
        duration,
        preset=f"{prompts[0][1]}/{out_len}",
        concurrency=concurrency,
        max_new_tokens=out_len,
    )
    tokens = sum(r.output_tokens for r in records if r.ok)
    res.pop("samples")
    res["cpu_seconds"] = cpu
    res["router_cpu_us_per_token"] = cpu["router"] / max(tokens, 1) * 1e6
    # /proc counts in clock ticks (10 ms): a level of 512 short requests takes ~0.5 s of CPU,
    # so this figure is good to ~2%; run-to-run spread on a small VM is far larger.
    res["router_cpu_us_per_request"] = cpu["router"] / max(len(records), 1) * 1e6
    res["router_loop_cpu_us_per_request"] = cpu["router_loop"] / max(len(records), 1) * 1e6
    res["router_cpu_utilization"] = cpu["router"] / duration
    res["router_bound_tok_s"] = tokens / cpu["router"] if cpu["router"] else None
    return res


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.router_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--concurrency",
        type=parse_int_list,
        default=[64, 256, 1024],
        help="levels; 1024 = all prompts at once",
    )
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--max-batch-size", type=int, default=256, help="as in the GPU max-load runs")
    p.add_argument("--input-len", type=int, default=64, help="the test double accepts at most 100")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-decode-steps", type=int, default=4)
    p.add_argument(
        "--num-blocks",
        type=int,
        default=0,
        help="KV blocks of the test double (default: every request fits); fewer makes the router preempt",
    )
    p.add_argument("--launch", default="", help="more launcher flags")
    p.add_argument(
        "--tokenizer", default="", help="tokenizer folder or .gguf (default: the embedded model's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--simulate", default="",
        help="the test engine sleeps as a GPU would: 'decode_ms,decode_ms_per_row,prefill_ms,prefill_ms_per_token' "
        f"(e.g. {H100_8B!r}, Llama-3.1-8B on one H100 as measured); then compare with bench.sched_bench "
        "on the same engine (--print-sched-command)",
    )  # fmt: skip
    p.add_argument(
        "--print-sched-command", action="store_true", help="print the matching no-HTTP run and exit"
    )
    p.add_argument(
        "--profile", default="",
        help="record the router with py-spy (raw stacks, 200 Hz) over the measured levels into this file",
    )  # fmt: skip
    p.add_argument("--profile-flags", default="", help="more py-spy record flags, e.g. '--threads --gil'")
    p.add_argument(
        "--submit-span", action="store_true",
        help="per level, the time from the first request reaching the router to the last Scheduler.submit "
        "(the router's TGI_CALL_TRACE marks, which cost CPU of their own: time CPU without this)",
    )  # fmt: skip
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def submit_span_ms(trace_prefix: str, *, since: float) -> float | None:
    """From the first request reaching the router's app to the last Scheduler.submit, among the
    router's call-trace marks after `since` (router/calltrace.py: time.perf_counter(), one clock
    for every process of the host). None without marks."""
    events = []
    for path in Path(trace_prefix).parent.glob(f"{Path(trace_prefix).name}.router.*.jsonl"):
        events += [json.loads(line) for line in path.read_text().splitlines() if line]
    arrivals = [t for event, _, t in events if event == "http" and t >= since]
    submits = [t for event, _, t in events if event == "submit" and t >= since]
    if not arrivals or not submits:
        return None
    return (max(submits) - min(arrivals)) * 1e3


@contextlib.contextmanager
def py_spy(pid: int, out: str, flags: str = "") -> Iterator[None]:
    """py-spy recording `pid` while the block runs (nothing when `out` is empty). Sampling costs
    the router CPU of its own: time a level without it."""
    if not out:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen(
        [spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", out, *shlex.split(flags)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the first request
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
        proc.wait(timeout=30)


# Llama-3.1-8B, bf16, one H100 (BENCHMARKS.md): a decode step ~6 ms + ~0.035 ms per row (24 ms
# at 512 rows), a prefill ~5 ms + 0.025 ms per token (~40k tokens/s).
H100_8B = "6,0.035,5,0.025"


def sched_command(args: argparse.Namespace, env: dict[str, str]) -> str:
    """The same engine and load through the router's scheduler without HTTP (bench/sched_bench.py)."""
    tokenizer = args.tokenizer or "<embedded model>"
    shard = f"--engine tests.shard_test_engine:create --model-id {tokenizer} --max-batch-size {args.max_batch_size}"
    router = (
        f"--tokenizer-name {tokenizer} --max-batch-size {args.max_batch_size} "
        f"--max-concurrent-requests {max(*args.concurrency, args.num_prompts)} --max-decode-steps {args.max_decode_steps}"
    )
    levels = ",".join("inf" if c >= args.num_prompts else str(c) for c in args.concurrency)
    return " ".join([
        *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
        "python -m bench.sched_bench --launch --num-shard 1",
        f"--shard-args {shlex.quote(shard)} --router-args {shlex.quote(router)}",
        f"--plan {shlex.quote(f'{args.input_len}/{args.output_len}|{levels}|{args.num_prompts}')}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from launcher.embedded import embedded_model_path
    from router.tokenizer import load_tokenizer
    from tests.stack import running_stack

    args = parse_args(argv)
    exit_on_sigterm()
    tok = load_tokenizer(args.tokenizer or embedded_model_path())
    top = args.max_batch_size
    env = {
        # Ordinary tokens of the real tokenizer (the double counts up from the prompt's last id),
        # and KV blocks for every request in flight.
        "TEST_ENGINE_VOCAB_SIZE": str(tok.vocab_size),
        "TEST_ENGINE_NUM_BLOCKS": str(args.num_blocks or top * (args.input_len + args.output_len + 32)),
        "TEST_ENGINE_MAX_TOTAL_TOKENS": str(max(200, args.input_len + args.output_len)),
        "TEST_ENGINE_SIMULATE": args.simulate,
    }
    if args.print_sched_command:
        print(sched_command(args, env))
        return 0
    trace_dir = tempfile.mkdtemp(prefix="router-bench-trace-") if args.submit_span else ""
    if trace_dir:
        env["TGI_CALL_TRACE"] = f"{trace_dir}/calls"
    launch = [
        "--engine",
        "tests.shard_test_engine:create",
        *(["--model-id", args.tokenizer] if args.tokenizer else []),
        "--max-batch-size",
        str(top),
        "--max-concurrent-requests",
        str(max(*args.concurrency, args.num_prompts)),
        "--max-decode-steps",
        str(args.max_decode_steps),
        *shlex.split(args.launch),
    ]
    rng = random.Random(args.seed)
    vocab = plain_vocab(tok)
    facts = machine_facts()
    levels: list[dict[str, Any]] = []
    with running_stack(launch, env=env) as stack:
        port = stack.base_url.rsplit(":", 1)[1]
        pids = {"router": find_process("-m router", f"--port {port}"), "shard": find_process("-m shard", "")}
        warm = [exact_prompt(tok, args.input_len, rng, vocab=vocab) for _ in range(8)]
        asyncio.run(run_level(stack.base_url, warm, max_new_tokens=16, concurrency=None, extra_params={}))
        all_prompts = [
            [exact_prompt(tok, args.input_len, rng, vocab=vocab) for _ in range(args.num_prompts)]
            for _ in args.concurrency
        ]  # made before any level: the profile then holds the levels only
        with py_spy(pids["router"], args.profile, args.profile_flags):
            for conc, prompts in zip(args.concurrency, all_prompts, strict=True):
                t0 = time.perf_counter()
                res = asyncio.run(
                    measure(stack.base_url, pids, prompts, out_len=args.output_len, concurrency=conc)
                )
                if trace_dir:
                    res["submit_span_ms"] = submit_span_ms(f"{trace_dir}/calls", since=t0)
                levels.append(res)
                print(
                    f"c={conc:4d}: {res['output_throughput']:8.1f} out tok/s, router "
                    f"{res['router_cpu_us_per_token']:6.1f} CPU us/token, "
                    f"{res['router_cpu_us_per_request']:6.0f} us/request (event loop "
                    f"{res['router_loop_cpu_us_per_request']:.0f}; {res['router_cpu_utilization']:.0%} "
                    f"of a core), failed {res['failed']}, {time.perf_counter() - t0:.1f} s"
                    + (
                        f", last submit {res['submit_span_ms']:.0f} ms after the first arrival"
                        if trace_dir
                        else ""
                    ),
                    flush=True,
                )
    if trace_dir:
        shutil.rmtree(trace_dir, ignore_errors=True)
    path = write_results(
        {"benchmark": "router", "machine": facts, "params": vars(args), "levels": levels},
        name="router",
        out=args.out,
    )
    print(
        format_table(
            [
                "conc",
                "out tok/s",
                "router us/tok",
                "router us/req",
                "router core",
                "router-bound tok/s",
                "ITL p50",
                "failed",
            ],
            [
                [
                    r["concurrency"],
                    r["output_throughput"],
                    r["router_cpu_us_per_token"],
                    r["router_cpu_us_per_request"],
                    r["router_cpu_utilization"],
                    r["router_bound_tok_s"],
                    r["itl_ms"]["p50"],
                    r["failed"],
                ]
                for r in levels
            ],
        )
    )
    print(f"wrote {path}")
    return 0 if all(r["failed"] == 0 for r in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())

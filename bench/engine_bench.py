"""Engine micro-benchmark over gRPC, bypassing HTTP (like TGI's text-generation-benchmark).

    python -m bench.engine_bench --shard-url unix:///tmp/tgi-trtllm-shard-0
    python -m bench.engine_bench --launch --model-id llama-3.1-8b --num-shard 1   # starts the shards

For each batch size B: Prefill B requests of --input-len random tokens, then --decode-steps
decode steps (Decode calls of --steps-per-call steps), then FilterBatch. Every call fans out to
every rank, as the router does. The bench allocates KV blocks itself (request j of a batch owns
blocks [j*n, (j+1)*n), n covering input + output + 1 tokens), so batch sizes whose blocks exceed
the cache Warmup reported are skipped. Latencies are client-side (gRPC included); the shard's own
forward time is reported beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    REPO,
    exit_on_sigterm,
    format_table,
    machine_facts,
    parse_int_list,
    percentile,
    results_path,
    summarize,
    write_results,
)
from router.pb import generate_pb2 as pb
from router.pb import generate_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class FanOut:
    """Sends every call to every rank concurrently and returns rank 0's answer."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self._channels = [grpc.aio.insecure_channel(u, options=_OPTIONS) for u in self.urls]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]

    @classmethod
    async def connect(cls, master_url: str) -> FanOut:
        async with grpc.aio.insecure_channel(master_url, options=_OPTIONS) as ch:
            resp = await pb_grpc.TextGenerationServiceStub(ch).ServiceDiscovery(
                pb.ServiceDiscoveryRequest(), timeout=30
            )
        return cls(list(resp.urls) or [master_url])

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        results = await asyncio.gather(*(getattr(s, method)(request, timeout=timeout) for s in self._stubs))
        return results[0]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))


# ----------------------------------------------------------------------------------- one batch


def make_requests(
    *,
    first_id: int,
    batch: int,
    input_len: int,
    max_new_tokens: int,
    blocks_per_req: int,
    vocab: int,
    rng: random.Random,
) -> list[pb.Request]:
    return [
        pb.Request(
            id=first_id + j,
            input_ids=[rng.randrange(vocab) for _ in range(input_len)],
            sampling=pb.SamplingParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
            stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens, ignore_eos_token=True),
            blocks=range(j * blocks_per_req, (j + 1) * blocks_per_req),
        )
        for j in range(batch)
    ]


def prefill_chunks(requests: list[pb.Request], max_tokens: int) -> list[list[pb.Request]]:
    """Consecutive groups of at most `max_tokens` prompt tokens (at least one request each)."""
    chunks: list[list[pb.Request]] = [[]]
    used = 0
    for r in requests:
        if chunks[-1] and used + len(r.input_ids) > max_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(r)
        used += len(r.input_ids)
    return chunks


async def run_once(
    client: FanOut, requests: list[pb.Request], *, decode_steps: int, steps_per_call: int, prefill_tokens: int
) -> dict[str, Any]:
    """One prefill + decode run; returns its timings in seconds."""
    t0 = time.perf_counter()
    prefill_fwd = 0
    for chunk in prefill_chunks(requests, prefill_tokens):
        resp = await client.call("Prefill", pb.PrefillRequest(requests=chunk))
        prefill_fwd += resp.timings.forward_ns
    prefill_s = time.perf_counter() - t0
    step_s, step_fwd_s, short_steps = [], [], 0
    done = 0
    while done < decode_steps:
        want = min(steps_per_call, decode_steps - done)
        t = time.perf_counter()
        resp = await client.call("Decode", pb.DecodeRequest(max_steps=want))
        dt = time.perf_counter() - t
        steps = max(resp.steps, 1)
        step_s += [dt / steps] * steps
        step_fwd_s += [resp.timings.forward_ns / 1e9 / steps] * steps
        short_steps += len(requests) * steps - len(resp.tokens.request_ids)
        done += steps
    wave_s = time.perf_counter() - t0  # prompts in -> last token out: what one HTTP wave of them costs
    await client.call("FilterBatch", pb.FilterBatchRequest(remove_ids=[r.id for r in requests]))
    return {
        "wave_s": wave_s,
        "prefill_s": prefill_s,
        "prefill_forward_s": prefill_fwd / 1e9,
        "step_s": step_s,
        "step_forward_s": step_fwd_s,
        "missing_generations": short_steps,
    }


async def bench_batch(
    client: FanOut,
    *,
    batch: int,
    input_len: int,
    decode_steps: int,
    runs: int,
    warmup_runs: int,
    steps_per_call: int,
    prefill_tokens: int,
    block_size: int,
    vocab: int,
    next_id: list[int],
    rng: random.Random,
) -> dict[str, Any]:
    blocks_per_req = math.ceil((input_len + decode_steps + 2) / block_size)
    prefill, prefill_fwd, steps, steps_fwd, waves, missing = [], [], [], [], [], 0
    for run in range(warmup_runs + runs):
        warm = run < warmup_runs
        reqs = make_requests(
            first_id=next_id[0],
            batch=batch,
            input_len=input_len,
            max_new_tokens=decode_steps + 1,
            blocks_per_req=blocks_per_req,
            vocab=vocab,
            rng=rng,
        )
        next_id[0] += batch
        r = await run_once(
            client,
            reqs,
            decode_steps=min(decode_steps, 8) if warm else decode_steps,
            steps_per_call=steps_per_call,
            prefill_tokens=prefill_tokens,
        )
        if warm:
            continue
        prefill.append(r["prefill_s"])
        waves.append(r["wave_s"])
        prefill_fwd.append(r["prefill_forward_s"])
        steps += r["step_s"]
        steps_fwd += r["step_forward_s"]
        missing += r["missing_generations"]
    step = summarize(steps, scale=1e3)
    return {
        "batch": batch,
        "input_len": input_len,
        "decode_steps": decode_steps,
        "runs": runs,
        "prefill_ms": summarize(prefill, scale=1e3),
        "prefill_forward_ms": summarize(prefill_fwd, scale=1e3),
        "prefill_tok_s": batch * input_len / percentile(prefill, 50),
        "decode_step_ms": step,
        "decode_step_forward_ms": summarize(steps_fwd, scale=1e3),
        "decode_tok_s": batch / (step["p50"] / 1e3),
        # The whole run as one wave: `batch` prompts in at once, decode_steps + 1 tokens out of each
        # (Prefill gives the first). The engine-only side of "HTTP vs engine at the same load":
        # serve_bench with the same prompts all at once and max_new_tokens = decode_steps + 1.
        "wave_ms": summarize(waves, scale=1e3),
        "wave_tok_s": batch * (decode_steps + 1) / percentile(waves, 50),
        "missing_generations": missing,  # > 0: requests ended early (they should not: ignore_eos)
    }


async def bench_prefill(
    client: FanOut,
    *,
    length: int,
    runs: int,
    block_size: int,
    vocab: int,
    next_id: list[int],
    rng: random.Random,
) -> dict[str, Any]:
    """Batch-1 prefill of `length` tokens (the TTFT floor): max_new_tokens 1, so it ends in Prefill."""
    times, fwd = [], []
    for run in range(runs + 1):
        (req,) = make_requests(
            first_id=next_id[0],
            batch=1,
            input_len=length,
            max_new_tokens=1,
            blocks_per_req=math.ceil((length + 2) / block_size),
            vocab=vocab,
            rng=rng,
        )
        next_id[0] += 1
        t = time.perf_counter()
        resp = await client.call("Prefill", pb.PrefillRequest(requests=[req]))
        if run:  # the first is a warm-up
            times.append(time.perf_counter() - t)
            fwd.append(resp.timings.forward_ns / 1e9)
        await client.call("FilterBatch", pb.FilterBatchRequest(remove_ids=[req.id]))
    return {
        "input_len": length,
        "prefill_ms": summarize(times, scale=1e3),
        "prefill_forward_ms": summarize(fwd, scale=1e3),
    }


async def run_bench(
    master_url: str, args: argparse.Namespace, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Runs everything; calls `save` with the results so far after each step (a run cut short by a
    timeout still leaves its finished batch sizes on disk)."""
    client = await FanOut.connect(master_url)
    try:
        info = await client.call("Info", pb.InfoRequest(), timeout=60)
        max_input = max([args.input_len, *args.prefill_lens])
        warm = await client.call(
            "Warmup",
            pb.WarmupRequest(
                max_input_tokens=max_input,
                max_total_tokens=max_input + args.decode_steps + 2,
                max_batch_prefill_tokens=args.max_batch_prefill_tokens or max(8192, max_input),
                max_batch_size=max(args.batch_sizes),
            ),
            timeout=3600,
        )
        block_size = warm.block_size or info.block_size
        blocks_per_req = math.ceil((args.input_len + args.decode_steps + 2) / block_size)
        cap = warm.num_blocks // blocks_per_req
        if info.max_batch_size:
            cap = min(cap, info.max_batch_size)
        sizes = [b for b in args.batch_sizes if b <= cap]
        rng, next_id = random.Random(args.seed), [1]
        common = {"block_size": block_size, "vocab": info.vocab_size, "next_id": next_id, "rng": rng}
        result: dict[str, Any] = {
            "info": {
                "model_id": info.model_id,
                "dtype": info.dtype,
                "device_type": info.device_type,
                "world_size": info.world_size,
                "tp_size": info.tp_size,
                "engine_version": info.engine_version,
            },
            "warmup": {
                "num_blocks": warm.num_blocks,
                "block_size": block_size,
                "max_supported_total_tokens": warm.max_supported_total_tokens,
            },
            "skipped_batch_sizes": [b for b in args.batch_sizes if b > cap],
            "prefill": [],
            "batches": [],
        }
        for n in args.prefill_lens:
            result["prefill"].append(await bench_prefill(client, length=n, runs=args.runs, **common))
            save(result)
        for b, spc in ((b, spc) for spc in args.steps_per_call for b in sizes):
            r = await bench_batch(
                client,
                batch=b,
                input_len=args.input_len,
                decode_steps=args.decode_steps,
                runs=args.runs,
                warmup_runs=args.warmup_runs,
                steps_per_call=spc,
                prefill_tokens=args.max_batch_prefill_tokens or max(8192, max_input),
                **common,
            )
            r["steps_per_call"] = spc
            result["batches"].append(r)
            save(result)
            print(
                f"batch {b:4d} x{spc} steps/call: prefill {r['prefill_ms']['p50']:9.2f} ms  decode step p50 "
                f"{r['decode_step_ms']['p50']:8.2f} ms  p99 {r['decode_step_ms']['p99']:8.2f} ms  "
                f"{r['decode_tok_s']:9.1f} tok/s",
                flush=True,
            )
        return result
    finally:
        await client.close()


# ----------------------------------------------------------------------------------- launching


def find_mpiexec() -> list[str]:
    """The venv's mpiexec (mpich wheel), else the system's; Open MPI as root needs --allow-run-as-root."""
    exe = os.environ.get("MPIEXEC") or str(Path(sys.executable).parent / "mpiexec")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("mpiexec") or ""
    if not exe:
        raise RuntimeError("no mpiexec found: install mpich (pip) or Open MPI, or set MPIEXEC")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        extra = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [exe, *extra, "--bind-to", "none"]
    return [exe]


@contextlib.contextmanager
def launched_shards(
    *, num_shard: int, shard_args: Sequence[str], timeout: float = 900.0, keep_log: str = ""
) -> Iterator[str]:
    """Starts `mpiexec -n num_shard python -m shard ...`, yields rank 0's url once it answers Health,
    and stops the world (SIGTERM, then SIGKILL) on exit; keep_log: copy the ranks' log there."""
    tmp = Path(tempfile.mkdtemp(prefix="eb-"))
    log_path = tmp / "shards.log"
    cmd = [
        *find_mpiexec(),
        "-n",
        str(num_shard),
        sys.executable,
        "-m",
        "shard",
        "--uds-path",
        str(tmp / "s"),
        *shard_args,
    ]
    print("launching:", shlex.join(cmd), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"unix://{tmp}/s-0"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shards not ready (exit {proc.poll()}):\n{log_path.read_text()[-6000:]}")
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if keep_log:
            shutil.copyfile(log_path, keep_log)
        shutil.rmtree(tmp, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with grpc.insecure_channel(url) as ch:
            pb_grpc.TextGenerationServiceStub(ch).Health(pb.HealthRequest(), timeout=2)
        return True
    except grpc.RpcError:
        return False


# ----------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shard-url", default="unix:///tmp/tgi-trtllm-shard-0", help="rank 0 of a running shard world"
    )
    p.add_argument("--launch", action="store_true", help="start the shard world (mpiexec) for this run")
    p.add_argument("--shard-log", default="", help="with --launch: keep the ranks' log in this file")
    p.add_argument("--model-id", default="llama-3.1-8b", help="with --launch: the shard's --model-id")
    p.add_argument("--num-shard", type=int, default=1, help="with --launch: ranks (tensor parallel)")
    p.add_argument(
        "--shard-args", default="", help="with --launch: extra shard flags, e.g. '--dtype bfloat16'"
    )
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument(
        "--steps-per-call", type=parse_int_list, default=[1], help="Decode max_steps per call (list: each in turn)"
    )
    p.add_argument(
        "--prefill-lens",
        type=parse_int_list,
        default=[1024],
        help="batch-1 prefill lengths timed on their own (TTFT floor); '' for none",
    )
    p.add_argument("--max-batch-prefill-tokens", type=int, default=0, help="0 = max(8192, longest input)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch size")
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs per batch size (<= 8 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="results JSON (default bench/results/engine-<card>-<date>.json)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        url = args.shard_url
        if args.launch:
            shard_args = ["--model-id", args.model_id, *shlex.split(args.shard_args)]
            url = stack.enter_context(
                launched_shards(num_shard=args.num_shard, shard_args=shard_args, keep_log=args.shard_log)
            )
        facts = machine_facts()
        out = args.out or str(results_path("engine", facts))

        def save(partial: dict[str, Any]) -> Path:
            return write_results(
                {"benchmark": "engine", "machine": facts, "params": vars(args), **partial},
                name="engine",
                out=out,
            )

        result = asyncio.run(run_bench(url, args, save))
    path = save(result)
    print(
        format_table(
            ["batch", "steps/call", "prefill ms", "step p50 ms", "step p99 ms", "fwd p50 ms", "decode tok/s"],
            [
                [
                    b["batch"],
                    b["steps_per_call"],
                    b["prefill_ms"]["p50"],
                    b["decode_step_ms"]["p50"],
                    b["decode_step_ms"]["p99"],
                    b["decode_step_forward_ms"]["p50"],
                    b["decode_tok_s"],
                ]
                for b in result["batches"]
            ],
        )
    )
    for p in result["prefill"]:
        print(f"batch-1 prefill of {p['input_len']} tokens: {p['prefill_ms']['p50']:.2f} ms p50")
    if result["skipped_batch_sizes"]:
        print(f"skipped (KV cache too small): {result['skipped_batch_sizes']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

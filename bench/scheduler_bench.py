"""The router scheduler's own serial cost per token, on this CPU.

    python -m bench.scheduler_bench --prompts 1024 --max-batch-size 512

The router's Scheduler runs in-process against a shard double that answers at once: its answers
are real protobuf bytes (built outside the timed part), parsed by the router's client code; each
request's tokens are drained by a consumer task as an HTTP stream would. What is left is the
scheduler's work between shard calls (planning, delivering tokens, handing them to streams) --
the part of a serving step that neither the GPU nor HTTP overlaps at max load. Reported:
microseconds of scheduler time per generated token.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from bench.common import machine_facts, write_results
from router.client import token_rows
from router.pb import generate_pb2 as pb
from router.scheduler import Scheduler
from router.types import GenerateRequest, Limits, SamplingParams, ShardInfo


class InstantShard:
    """Every request emits token 1234 until max_new_tokens; `build_s` is the time spent making
    the answers (the double's cost, not the router's)."""

    def __init__(self) -> None:
        self.left: dict[int, int] = {}
        self.calls = 0
        self.build_s = 0.0

    def _token(self, rid: int) -> tuple[int, int]:
        self.left[rid] -= 1
        if self.left[rid] == 0:
            del self.left[rid]
            return rid, pb.FINISH_REASON_LENGTH
        return rid, pb.FINISH_REASON_UNSPECIFIED

    async def prefill(self, requests, *, decode_running=False, extensions=()):  # noqa: ANN001, ANN201
        await asyncio.sleep(0)
        t = time.perf_counter()
        gens = []
        for r in requests:
            self.left[r.id] = r.stopping.max_new_tokens - r.generated_before
            rid, fin = self._token(r.id)
            gens.append(pb.Generation(request_id=rid, token_id=1234, logprob=-0.25, finish_reason=fin))
        data = pb.PrefillResponse(generations=gens).SerializeToString()
        self.build_s += time.perf_counter() - t
        return list(pb.PrefillResponse.FromString(data).generations), [], 0

    async def decode(self, extensions, steps):  # noqa: ANN001, ANN201
        await asyncio.sleep(0)
        self.calls += 1
        t = time.perf_counter()
        rows: list[tuple[int, int]] = []
        for _ in range(steps):
            rows += [self._token(rid) for rid in list(self.left)]
            if any(fin for _, fin in rows):
                break  # the native engine's call ends at the first finish too (its riders aside)
        cols = pb.TokenColumns(
            request_ids=[r for r, _ in rows], token_ids=[1234] * len(rows), logprobs=[-0.25] * len(rows),
            finish_reasons=[f for _, f in rows], generated_tokens=[1] * len(rows), seeds=[0] * len(rows),
        )  # fmt: skip
        data = pb.DecodeResponse(tokens=cols).SerializeToString()
        self.build_s += time.perf_counter() - t
        return token_rows(pb.DecodeResponse.FromString(data).tokens), 0

    async def filter(self, ids) -> None:  # noqa: ANN001
        for rid in ids:
            self.left.pop(rid, None)

    async def clear(self) -> None:
        self.left.clear()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    info = ShardInfo(
        model_id="instant", dtype="bfloat16", device_type="cuda", world_size=1, tp_size=1, pp_size=1,
        engine="native", block_size=16, manages_kv_cache=False, vocab_size=128256, eos_token_ids=(0,),
        max_batch_size=0, max_input_tokens=2048, max_total_tokens=4096, max_batch_prefill_tokens=8192,
        supports_prefix_caching=True, supports_prefill_logprobs=True, max_top_n_tokens=5, num_blocks=40000,
        supports_mixed_batches=False,
    )  # fmt: skip
    limits = Limits(
        max_input_tokens=2048, max_total_tokens=4096, max_batch_prefill_tokens=8192, max_batch_total_tokens=600000,
        max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4,
        max_concurrent_requests=args.prompts,
    )  # fmt: skip
    shard = InstantShard()
    sched = Scheduler(
        client=shard, info=info, limits=limits, max_batch_size=args.max_batch_size, waiting_served_ratio=1.2,
        max_waiting_tokens=20, max_decode_steps=args.max_decode_steps, prefix_caching=True, mixed_batches=False,
        reserve_kv=False,
    )  # fmt: skip
    rng = random.Random(args.seed)
    sched.start()
    try:
        handles = [
            sched.submit(
                GenerateRequest(
                    input_ids=tuple(rng.randrange(100_000) for _ in range(args.input_len)),
                    sampling=SamplingParams(),
                    max_new_tokens=args.output_len,
                )
            )
            for _ in range(args.prompts)
        ]

        async def drain(handle) -> int:  # noqa: ANN001
            return len([t async for t in handle])

        start = time.perf_counter()
        counts = await asyncio.gather(*(drain(h) for h in handles))
        wall = time.perf_counter() - start
    finally:
        await sched.stop()
    tokens = sum(counts)
    assert tokens == args.prompts * args.output_len, tokens
    router_s = wall - shard.build_s
    return {
        "prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
        "max_batch_size": args.max_batch_size, "max_decode_steps": args.max_decode_steps,
        "decode_calls": shard.calls, "tokens": tokens, "wall_s": wall, "shard_double_s": shard.build_s,
        "scheduler_s": router_s, "scheduler_us_per_token": 1e6 * router_s / tokens,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-decode-steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    runs = []
    for _ in range(args.runs):
        res = asyncio.run(run(args))
        runs.append(res)
        print(
            f"{res['tokens']} tokens in {res['decode_calls']} decode calls: scheduler {res['scheduler_s']:.2f} s "
            f"= {res['scheduler_us_per_token']:.1f} us/token (shard double {res['shard_double_s']:.2f} s)",
            flush=True,
        )
    path = write_results(
        {"benchmark": "scheduler", "machine": machine_facts(), "params": vars(args), "runs": runs},
        name="scheduler",
        out=args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

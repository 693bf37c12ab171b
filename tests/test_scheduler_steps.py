"""How many steps the scheduler asks per Decode call (router/scheduler.py): one while a waiting
request could join, max_decode_steps while nobody waits or nobody waiting could join anyway; and
mixed batches (a Prefill that carries the running batch's step) with the KV admission policies."""

from __future__ import annotations

import asyncio

from router.client import token_out
from router.handle import RequestHandle
from router.pb import generate_pb2 as pb
from router.scheduler import Scheduler
from router.types import GenerateRequest, Limits, SamplingParams, ShardInfo, TokenOut

BLOCK = 4


def rows(gens: list[pb.Generation]) -> list[tuple[int, TokenOut]]:
    """Decode-step tokens as ShardedClient returns them (router/client.py: token_rows)."""
    return [(g.request_id, token_out(g)) for g in gens]


class CountingClient:
    """A shard world in-process: every request emits token 7 until max_new_tokens (LENGTH); a
    multi-step call ends at the first finish, as the native engine's does."""

    def __init__(self) -> None:
        self.decode_steps: list[int] = []
        self.left: dict[int, int] = {}  # request id -> tokens still to emit

    async def prefill(self, requests, *, decode_running=False, extensions=()):
        assert not decode_running and not extensions  # the plain client reports no mixed batches
        out = []
        for r in requests:
            self.left[r.id] = r.stopping.max_new_tokens - r.generated_before
            out.append(self._emit(r.id))
        return out, [], 0

    async def decode(self, extensions, steps):
        await asyncio.sleep(0)  # a real call yields to the event loop: requests arrive meanwhile
        self.decode_steps.append(steps)
        out: list[pb.Generation] = []
        for _ in range(steps):
            out += [self._emit(rid) for rid in list(self.left)]
            if any(g.finish_reason for g in out):
                break
        return rows(out), 0

    def _emit(self, rid: int) -> pb.Generation:
        self.left[rid] -= 1
        done = self.left[rid] == 0
        if done:
            del self.left[rid]
        return pb.Generation(request_id=rid, token_id=7, finish_reason=pb.FINISH_REASON_LENGTH if done else 0)

    async def filter(self, ids) -> None:
        for rid in ids:
            self.left.pop(rid, None)

    async def clear(self) -> None:
        self.left.clear()


def scheduler(
    client: CountingClient, *, num_blocks: int, max_batch_size: int | None, ratio: float = 0.3, max_waiting: int = 20,
    mixed: bool = False, reserve: bool = False,
) -> Scheduler:
    info = ShardInfo(
        model_id="m", dtype="float32", device_type="cpu", world_size=1, tp_size=1, pp_size=1, engine="native",
        block_size=BLOCK, manages_kv_cache=False, vocab_size=64, eos_token_ids=(0,), max_batch_size=0,
        max_input_tokens=0, max_total_tokens=0, max_batch_prefill_tokens=0, supports_prefix_caching=True,
        supports_prefill_logprobs=True, max_top_n_tokens=5, num_blocks=num_blocks, supports_mixed_batches=mixed,
    )  # fmt: skip
    limits = Limits(
        max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=256, max_batch_total_tokens=10_000,
        max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, max_concurrent_requests=8,
    )  # fmt: skip
    return Scheduler(client=client, info=info, limits=limits, max_batch_size=max_batch_size, waiting_served_ratio=ratio,
                     max_waiting_tokens=max_waiting, max_decode_steps=4, prefix_caching=True,
                     mixed_batches=mixed, reserve_kv=reserve)  # fmt: skip


PROMPT = 12  # tokens: a prompt takes 4 blocks at admission, a whole request (12 + 9 + 1) 6


def request(first: int, new_tokens: int) -> GenerateRequest:
    return GenerateRequest(input_ids=tuple(range(first, first + PROMPT)), sampling=SamplingParams(),
                           max_new_tokens=new_tokens)  # fmt: skip


async def drain(handle: RequestHandle) -> int:
    return len([t async for t in handle])


def run(num_blocks: int, max_batch_size: int | None, new_tokens: tuple[int, int]) -> list[int]:
    async def main() -> list[int]:
        client = CountingClient()
        sched = scheduler(client, num_blocks=num_blocks, max_batch_size=max_batch_size)
        sched.start()
        try:
            handles = [sched.submit(request(10 * i + 1, n)) for i, n in enumerate(new_tokens)]
            counts = await asyncio.wait_for(asyncio.gather(*(drain(h) for h in handles)), 30)
        finally:
            await sched.stop()
        assert counts == list(new_tokens)
        return client.decode_steps

    return asyncio.run(main())


def run_late_join(client: CountingClient, *, mixed: bool = False) -> None:
    """A 30-token request, then a 3-token one once the first decode call ran, under a queue rule
    (TGI's) that keeps the late one waiting until 12 tokens have been generated since the last
    prefill (waiting/running never reaches the ratio 10)."""

    async def main() -> list[int]:
        sched = scheduler(client, num_blocks=100, max_batch_size=None, ratio=10.0, max_waiting=12, mixed=mixed)
        sched.start()
        try:
            long = sched.submit(request(1, 30))
            await asyncio.sleep(0)  # the loop picks it up and decodes
            while not client.decode_steps:
                await asyncio.sleep(0)
            late = sched.submit(request(100, 3))
            return await asyncio.wait_for(asyncio.gather(drain(long), drain(late)), 30)
        finally:
            await sched.stop()

    assert asyncio.run(main()) == [30, 3]


def test_a_full_batch_keeps_multi_step_calls() -> None:
    # Batch of one: the second request waits for the first to finish, so single steps would gain
    # nothing. 9 tokens = 1 from prefill + 8 from two 4-step calls, for each request in turn.
    assert run(num_blocks=100, max_batch_size=1, new_tokens=(9, 9)) == [4, 4, 4, 4]
    # 7 KV blocks: while the first request holds 4-6 of them, the second's prompt (4) never fits,
    # so it cannot join before a finish either: the calls stay multi-step.
    assert run(num_blocks=7, max_batch_size=None, new_tokens=(9, 9)) == [4, 4, 4, 4]


def test_a_waiting_request_that_could_join_gets_single_steps() -> None:
    # Room for any number. The queue rule (TGI's) lets a late request wait until 12 tokens have been
    # generated since the last prefill (waiting/running never reaches the ratio 10): the calls while
    # it waits are single steps, so it joins as soon as the rule allows.
    client = CountingClient()
    run_late_join(client)
    steps = client.decode_steps
    first_single = steps.index(1)
    assert steps[0] == 4 and first_single <= 2, steps  # alone: 4 steps per call
    singles = steps[first_single:].index(2) if 2 in steps[first_single:] else steps[first_single:].index(4)
    # waiting: one step per call until 12 tokens since the prefill (4 or 8 came from 4-step calls)
    assert 4 <= singles <= 8 and sum(steps[: first_single + singles]) == 12, steps
    assert steps[-1] in (2, 4), steps  # alone again after the late one finished


def test_a_nearly_full_batch_keeps_multi_step_calls() -> None:
    # At --max-batch-size 16 a waiting request shortens the calls only while more than 16 // 8 = 2
    # slots are free: at full load every finish frees a slot, and one-step calls there cost the most.
    async def main() -> list[bool]:
        sched = scheduler(CountingClient(), num_blocks=100, max_batch_size=16)
        sched.submit(request(1, 5))
        out = []
        for running in (16, 14, 13, 0):
            sched.running = [object()] * running  # type: ignore[list-item]
            out.append(sched._nobody_can_join())
        sched.waiting.pop()
        out.append(sched._nobody_can_join())
        return out

    assert asyncio.run(main()) == [True, True, False, False, True]


def test_the_next_call_is_sent_before_the_streams_get_the_last_calls_tokens() -> None:
    # The streams' per-token work must run while the engine computes: each call starts before the
    # tokens of the call before it reach their stream (asyncio runs ready tasks in order).
    async def main() -> tuple[list[int], int]:
        seen = 0
        seen_at_call: list[int] = []

        class Recording(CountingClient):
            async def decode(self, extensions, steps):  # noqa: ANN001, ANN202
                seen_at_call.append(seen)  # the call's first step: when a real one sends its request
                return await super().decode(extensions, steps)

        sched = scheduler(Recording(), num_blocks=100, max_batch_size=None)
        sched.start()
        try:
            handle = sched.submit(request(1, 9))  # 1 token from prefill, then two 4-step calls
            async for _ in handle:
                seen += 1
        finally:
            await sched.stop()
        return seen_at_call, seen

    seen_at_call, total = asyncio.run(main())
    assert total == 9
    assert seen_at_call == [0, 1], seen_at_call  # with tokens pushed first: [1, 5]


class MixedClient(CountingClient):
    """CountingClient that runs mixed batches and checks block room as a paged engine does: a
    request that emits its n-th token must hold blocks for prompt + n tokens, plus the slot of
    the pending one (ceil((tokens + 1) / BLOCK))."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, bool]] = []  # (rpc, new requests or steps, decode_running)
        self.blocks: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.filtered: list[int] = []
        self.peak = 0  # most requests running at once
        self.on_prefill = lambda: None  # runs inside each Prefill (a request arriving meanwhile)

    def _extend(self, extensions) -> None:  # noqa: ANN001
        for rid, blocks in extensions:
            assert rid in self.left, f"extension for {rid}, which is not running"
            self.blocks[rid] += len(blocks)

    def _emit(self, rid: int) -> pb.Generation:
        assert self.blocks[rid] * BLOCK >= self.tokens[rid] + 1, f"request {rid} has no room for its next token"
        self.tokens[rid] += 1
        return super()._emit(rid)

    async def prefill(self, requests, *, decode_running=False, extensions=()):
        await asyncio.sleep(0)
        self.calls.append(("prefill", len(requests), decode_running))
        self.on_prefill()
        stepped = []
        if decode_running:
            self._extend(extensions)
            stepped = [self._emit(rid) for rid in list(self.left)]
        out = []
        for r in requests:
            self.left[r.id] = r.stopping.max_new_tokens - r.generated_before
            self.blocks[r.id], self.tokens[r.id] = len(r.blocks), len(r.input_ids)
            out.append(self._emit(r.id))
        self.peak = max(self.peak, len(self.left) + sum(1 for g in out if g.finish_reason))
        return out, rows(stepped), 0

    async def decode(self, extensions, steps):
        self.calls.append(("decode", steps, False))
        self._extend(extensions)
        return await super().decode((), steps)

    async def filter(self, ids) -> None:
        self.filtered += ids
        await super().filter(ids)


def run_mixed(client: MixedClient, new_tokens: tuple[int, ...], **kw) -> None:  # noqa: ANN003
    async def main() -> list[int]:
        sched = scheduler(client, mixed=True, **kw)
        sched.start()
        try:
            handles = [sched.submit(request(10 * i + 1, n)) for i, n in enumerate(new_tokens)]
            return await asyncio.wait_for(asyncio.gather(*(drain(h) for h in handles)), 30)
        finally:
            await sched.stop()

    assert asyncio.run(main()) == list(new_tokens)


def test_a_late_request_joins_through_a_mixed_prefill() -> None:
    # TGI's queue rule would keep the late request waiting for 12 tokens (ratio 10, max_waiting 12,
    # as in the single-step test above). A mixed prefill stalls nobody, so it joins at the next call,
    # and the running request's step rides in it: no single-step calls at all.
    client = MixedClient()
    run_late_join(client, mixed=True)
    assert client.calls[0] == ("prefill", 1, False)  # nothing ran yet: a plain prefill
    assert ("prefill", 1, True) in client.calls, client.calls
    late_at = client.calls.index(("prefill", 1, True))
    assert late_at <= 2, client.calls  # at most one 4-step call went by before it joined
    assert all(n > 1 for rpc, n, _ in client.calls if rpc == "decode") or client.calls[-1][1] < 4, client.calls


def test_back_to_back_mixed_prefills_grow_the_running_batch_each_time() -> None:
    # A request arrives during every prefill, so mixed prefills follow each other with no decode
    # call between them: each must grow the running requests for its own step (MixedClient checks
    # the room), beyond the one spare slot a multi-step call leaves.
    async def main() -> tuple[MixedClient, list[int]]:
        client = MixedClient()
        sched = scheduler(client, num_blocks=200, max_batch_size=None, mixed=True)
        late: list[RequestHandle] = []
        client.on_prefill = lambda: late.append(sched.submit(request(100 + 20 * len(late), 9))) if len(late) < 6 else None
        sched.start()
        try:
            first = sched.submit(request(1, 30))
            while len(late) < 6:  # they arrive one per prefill, while the first one generates
                await asyncio.sleep(0)
            counts = await asyncio.wait_for(asyncio.gather(drain(first), *(drain(h) for h in late)), 30)
        finally:
            await sched.stop()
        return client, counts

    client, counts = asyncio.run(main())
    assert counts == [30] + [9] * 6, counts
    # The plain prefill (nobody ran) is followed by its iteration's decode call; then back to back:
    assert client.calls[2:8] == [("prefill", 1, True)] * 6, client.calls


def test_mixed_batches_under_kv_pressure_grow_the_running_ones_first() -> None:
    # 14 blocks for five requests of 6 blocks each: mixed prefills, growth, preemption and
    # re-admission interleave; every token still arrives, and no step lacks room (MixedClient).
    client = MixedClient()
    run_mixed(client, (9, 9, 9, 9, 9), num_blocks=14, max_batch_size=None)
    assert any(m for _, _, m in client.calls), client.calls
    assert client.filtered, "the pressure should have preempted someone"
    assert client.peak >= 3, client.peak


def test_guaranteed_no_evict_never_preempts() -> None:
    # The same load under guaranteed_no_evict: a request joins only when every running request
    # can reach its full length (7 blocks each with the overshoot block), so two at a time, and
    # nobody is ever preempted (no FilterBatch calls).
    client = MixedClient()
    run_mixed(client, (9, 9, 9, 9, 9), num_blocks=14, max_batch_size=None, reserve=True)
    assert not client.filtered, client.filtered
    assert client.peak == 2, client.peak


# ---------------------------------------------------------------- --burst-hold-ms (router/arrivals.py)
class PrefillLog(CountingClient):
    """Records each prefill's request ids and when it went out (loop time)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefills: list[tuple[float, list[int]]] = []

    async def prefill(self, requests, *, decode_running=False, extensions=()):
        self.prefills.append((asyncio.get_running_loop().time(), [r.id for r in requests]))
        return await super().prefill(requests, decode_running=decode_running, extensions=extensions)


def held_scheduler(client: CountingClient, arrivals, hold_s: float) -> Scheduler:
    sched = scheduler(client, num_blocks=200, max_batch_size=None)
    sched.arrivals, sched.burst_hold_s = arrivals, hold_s
    return sched


async def arrive(sched: Scheduler, arrivals, first: int, delay: float) -> RequestHandle:
    """One request: `delay` seconds in validation (counted by `arrivals`), then submitted."""
    with arrivals.track():
        await asyncio.sleep(delay)
    return sched.submit(request(first, 3))


def burst_prefills(hold_s: float) -> list[list[int]]:
    """Four requests reach an idle scheduler, the first at once, the others 10-30 ms later (time
    spent in validation); the request ids of each prefill."""
    from router.arrivals import Arrivals

    async def main() -> list[list[int]]:
        client, arrivals = PrefillLog(), Arrivals()
        sched = held_scheduler(client, arrivals, hold_s=hold_s)
        sched.start()
        try:
            tasks = [asyncio.ensure_future(arrive(sched, arrivals, 1 + 20 * i, 0.01 * i)) for i in range(4)]
            handles = await asyncio.gather(*tasks)
            assert await asyncio.wait_for(asyncio.gather(*(drain(h) for h in handles)), 30) == [3] * 4
        finally:
            await sched.stop()
        return [ids for _, ids in client.prefills]

    return asyncio.run(main())


def test_an_idle_servers_first_prefill_waits_for_requests_still_in_validation() -> None:
    assert burst_prefills(hold_s=5.0) == [[1, 2, 3, 4]]  # one prefill takes all four


def test_without_the_hold_the_first_request_goes_alone() -> None:
    """The hold off (the default, TGI's behaviour): the first request is prefilled before the
    others are in the queue."""
    assert burst_prefills(hold_s=0.0)[0] == [1]


def test_the_hold_ends_at_its_deadline_a_full_prefill_or_a_failed_validation() -> None:
    from router.arrivals import Arrivals

    async def main() -> tuple[float, list[list[int]], float, list[list[int]]]:
        loop = asyncio.get_running_loop()
        # 1) somebody stays in validation for 10 s: the hold gives up after its 50 ms
        client, arrivals = PrefillLog(), Arrivals()
        sched = held_scheduler(client, arrivals, hold_s=0.05)
        sched.start()
        slow = asyncio.ensure_future(arrive(sched, arrivals, 100, 10.0))
        await asyncio.sleep(0.001)  # it is in validation now
        try:
            t0 = loop.time()
            first = sched.submit(request(1, 3))
            await asyncio.wait_for(drain(first), 5)
            waited = client.prefills[0][0] - t0
            got = [ids for _, ids in client.prefills]
        finally:
            slow.cancel()
            await asyncio.gather(slow, return_exceptions=True)
            await sched.stop()
        # 2) a validation that fails (leaves without a submit) ends the hold at once
        client2, arrivals2 = PrefillLog(), Arrivals()
        sched2 = held_scheduler(client2, arrivals2, hold_s=5.0)
        sched2.start()

        async def rejected() -> None:
            with arrivals2.track():
                await asyncio.sleep(0.02)
                raise ValueError("invalid request")

        bad = asyncio.ensure_future(rejected())
        await asyncio.sleep(0.001)
        try:
            t0 = loop.time()
            h = sched2.submit(request(1, 3))
            await asyncio.wait_for(drain(h), 5)
            waited2 = client2.prefills[0][0] - t0
        finally:
            await asyncio.gather(bad, return_exceptions=True)
            await sched2.stop()
        return waited, got, waited2, [ids for _, ids in client2.prefills]

    waited, got, waited2, got2 = asyncio.run(main())
    assert 0.04 <= waited < 1.0 and got == [[1]]
    assert 0.015 <= waited2 < 1.0 and got2 == [[1]]


def test_a_waiting_set_that_fills_a_prefill_is_not_held() -> None:
    """Waiting prompts that already fill --max-batch-prefill-tokens (30 here, 12 a prompt) go at
    once, whoever is still in validation."""
    from dataclasses import replace

    from router.arrivals import Arrivals

    async def main() -> float:
        loop = asyncio.get_running_loop()
        client, arrivals = PrefillLog(), Arrivals()
        sched = held_scheduler(client, arrivals, hold_s=5.0)
        sched.limits = replace(sched.limits, max_batch_prefill_tokens=30)
        slow = asyncio.ensure_future(arrive(sched, arrivals, 1000, 10.0))
        await asyncio.sleep(0.001)
        handles = [sched.submit(request(1 + 20 * i, 3)) for i in range(3)]  # 36 tokens waiting
        t0 = loop.time()
        sched.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(drain(h) for h in handles)), 5)
            return client.prefills[0][0] - t0
        finally:
            slow.cancel()
            await asyncio.gather(slow, return_exceptions=True)
            await sched.stop()

    assert asyncio.run(main()) < 0.5

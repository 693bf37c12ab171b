"""Continuous batching: one asyncio task loops over small policy pieces.

Each iteration: drop cancelled requests, maybe prefill newly admitted ones (they join the running
batch), then run a decode call over the running batch. Prefill and decode are one loop (as in
vLLM): a request's first token comes from Prefill, the rest from Decode. While nobody waits, one
Decode call runs several steps (max_decode_steps) to amortize the RPC; as soon as a request waits
that could join now, calls go back to one step so it joins within one token -- unless the batch is
(nearly) at --max-batch-size, where one-step calls would buy little and cost the most (see
_nobody_can_join). The native shard keeps a sequence that ends mid-call in its batch until the call
ends, so every sequence is grown by the call's full step count.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from router import calltrace, metrics
from router.arrivals import Arrivals
from router.batch_policy import admit, nobody_can_join, plan_growth
from router.client import ShardedClient, TokenRow, prefill_out, to_pb_request, token_out
from router.errors import GenerationError, OverloadedError
from router.handle import Entry, RequestHandle, State
from router.kv_planner import KvPlanner
from router.queue import WaitingQueue, should_prefill
from router.types import GenerateRequest, Limits, ShardInfo, TokenOut

log = logging.getLogger(__name__)
T = TypeVar("T")



class Scheduler:
    def __init__(
        self,
        *,
        client: ShardedClient,
        info: ShardInfo,
        limits: Limits,
        max_batch_size: int | None,
        waiting_served_ratio: float,
        max_waiting_tokens: int,
        max_decode_steps: int,
        prefix_caching: bool,
        mixed_batches: bool = False,
        reserve_kv: bool = False,
        arrivals: Arrivals | None = None,
        burst_hold_s: float = 0.0,
    ) -> None:
        self.client = client
        self.info = info
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.waiting_served_ratio = waiting_served_ratio
        self.max_waiting_tokens = max_waiting_tokens
        self.max_decode_steps = max(1, max_decode_steps)
        self.paged = not info.manages_kv_cache
        # Prefill calls carry the running batch's next step (PrefillRequest.decode_running).
        self.mixed = mixed_batches and info.supports_mixed_batches
        self.reserve_kv = reserve_kv  # --scheduler-policy guaranteed_no_evict (batch_policy.admit)
        self.arrivals = arrivals  # requests still being validated (router/arrivals.py)
        self.burst_hold_s = burst_hold_s if arrivals is not None else 0.0  # --burst-hold-ms
        self.kv = (
            KvPlanner(
                # --max-batch-total-tokens caps the blocks handed out (as TGI v3 sizes its allocator)
                num_blocks=min(info.num_blocks, limits.max_batch_total_tokens // info.block_size),
                block_size=info.block_size,
                prefix_caching=prefix_caching and info.supports_prefix_caching,
            )
            if self.paged
            else None
        )
        self.waiting: WaitingQueue[Entry] = WaitingQueue()
        self.running: list[Entry] = []
        self._cancelled: list[Entry] = []
        self._ids = itertools.count(1)
        self._admissions = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._steps_since_prefill = 0
        self._head_blocked_by_kv = False  # the last admission stopped at a head without KV room
        # Block extensions planned but not yet sent (a mixed step's growth, planned before admission
        # when admission then took nobody): the next Decode sends them.
        self._unsent: list[tuple[int, list[int]]] = []
        # Tokens of the last call, waiting for the next call to be on its way (see _rpc).
        self._outbox: list[tuple[RequestHandle, TokenOut]] = []
        self._lookup_tokens = 0  # prompt tokens looked up in / found in the prefix cache
        self._hit_tokens = 0

    # -- HTTP side --------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> RequestHandle:
        if len(self.waiting) + len(self.running) >= self.limits.max_concurrent_requests:
            raise OverloadedError("Model is overloaded")
        request_id = next(self._ids)
        entry: Entry
        handle = RequestHandle(request_id, on_cancel=lambda: self._cancel(entry))
        entry = Entry(id=request_id, request=request, handle=handle)
        self.waiting.push(entry)
        metrics.QUEUE_SIZE.set(len(self.waiting))
        self._wakeup.set()
        calltrace.mark("submit", "")
        return handle

    def _cancel(self, entry: Entry) -> None:
        if entry.state is State.WAITING and self.waiting.remove(entry):
            entry.state = State.DONE
            metrics.QUEUE_SIZE.set(len(self.waiting))
        elif entry.state is State.RUNNING:
            self._cancelled.append(entry)  # leaves the batch before the next step
            self._wakeup.set()

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._flush()  # finished requests whose last tokens were still booked
        for entry in [*self.running, *self.waiting]:
            entry.handle.fail(GenerationError("server is shutting down"))

    async def _loop(self) -> None:
        while True:
            if not self.running and not self.waiting and not self._cancelled:
                self._flush()
                self._wakeup.clear()
                await self._wakeup.wait()
            try:
                await self._iteration()
            except GenerationError as e:
                await self._fail_all(e)
            except Exception as e:  # the loop must survive anything: fail the work, keep serving
                log.exception("scheduler iteration failed")
                await self._fail_all(GenerationError(f"internal error: {e!r}"))

    async def _iteration(self) -> None:
        if self.burst_hold_s and not self.running and self.waiting:
            await self._hold_for_burst()
        await self._drop_cancelled()
        self._head_blocked_by_kv = False  # set by _admit when it tries and the head does not fit
        # A mixed prefill costs the running batch nothing but a slower step, so it runs whenever
        # somebody can join; TGI's rule (should_prefill) spaces out prefills that stall decoding.
        room = self.max_batch_size is None or len(self.running) < self.max_batch_size
        mixed = self.mixed and bool(self.running) and room
        if self.waiting and (mixed or should_prefill(
            waiting=len(self.waiting),
            running=len(self.running),
            steps_since_prefill=self._steps_since_prefill,
            waiting_served_ratio=self.waiting_served_ratio,
            max_waiting_tokens=self.max_waiting_tokens,
        )):  # fmt: skip
            if mixed:
                # The running entries' room for the mixed step comes first: admission must not
                # take the blocks they need (that would preempt them for the newcomers).
                self._unsent.extend(self._plan_growth(1))
                await self._drop_cancelled()  # preemptions from planning
                mixed = bool(self.running)
            batch = self._admit()
            if batch:
                await self._prefill(batch, mixed=mixed)
                self._steps_since_prefill = 0
                if mixed:  # the running batch took its step in the prefill
                    self._update_gauges()
                    return
            elif not self.running:
                # Nothing runs and the head of the queue does not fit: it never will.
                head = self.waiting.pop()
                if head is not None:
                    head.state = State.DONE
                    head.handle.fail(GenerationError("request does not fit in the KV cache"))
        if self.running:
            steps = self.max_decode_steps if self._nobody_can_join() else 1
            await self._decode(steps)
            self._steps_since_prefill += steps  # TGI's waiting_tokens counts tokens, not calls
        self._update_gauges()

    async def _hold_for_burst(self) -> None:
        """An idle server's first prefill waits while requests are still being validated, until
        they are all in the queue, the waiting ones fill a prefill (--max-batch-prefill-tokens),
        or burst_hold_s has passed. Nothing runs, so the GPU loses nothing it had; a lone request
        (nobody else in validation) goes at once."""
        assert self.arrivals is not None
        deadline = time.monotonic() + self.burst_hold_s
        while self.arrivals.count and self._waiting_tokens_below(self.limits.max_batch_prefill_tokens):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.arrivals.next_change(), remaining)
            except TimeoutError:
                return

    def _waiting_tokens_below(self, budget: int) -> bool:
        total = 0
        for entry in self.waiting:
            total += len(entry.tokens)
            if total >= budget:
                return False
        return True

    # -- policy pieces (router/batch_policy.py) --------------------------------------------------
    def _nobody_can_join(self) -> bool:
        return nobody_can_join(
            waiting=len(self.waiting), running=len(self.running), max_batch_size=self.max_batch_size,
            head_blocked_by_kv=self._head_blocked_by_kv,
        )  # fmt: skip

    def _admit(self) -> list[tuple[Entry, list[int], int]]:
        admission = admit(
            self.waiting, self.running, kv=self.kv, limits=self.limits, max_batch_size=self.max_batch_size,
            reserve=self.reserve_kv,
        )  # fmt: skip
        self._head_blocked_by_kv = admission.head_blocked_by_kv
        metrics.QUEUE_SIZE.set(len(self.waiting))
        return admission.batch

    def _plan_growth(self, steps: int) -> list[tuple[int, list[int]]]:
        return [] if self.kv is None else plan_growth(self.running, self.kv, steps, self._preempt)

    def _preempt(self, entry: Entry) -> None:
        """Recompute-style preemption: free the blocks (cached for a cheap re-prefill), requeue first."""
        log.info("preempting request %d (%d tokens) for lack of KV blocks", entry.id, len(entry.tokens))
        assert self.kv is not None
        self.kv.release(entry, cache_it=True)
        entry.state = State.WAITING
        self.running.remove(entry)
        self._cancelled.append(entry)  # the shard must forget it too
        self.waiting.push_front(entry)

    # -- RPCs -------------------------------------------------------------------------------------
    async def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        gone, self._cancelled = self._cancelled, []
        await self._rpc(self.client.filter([e.id for e in gone]))
        for entry in gone:
            if entry.state is State.RUNNING:  # preempted entries are WAITING and keep their place
                self._finish(entry, cache_it=True)

    async def _prefill(self, batch: Sequence[tuple[Entry, list[int], int]], *, mixed: bool = False) -> None:
        """mixed: the entries running before this batch also take their next step in it."""
        stepping = list(self.running) if mixed else []
        extensions = self._take_unsent() if mixed else []
        requests = []
        for entry, blocks, prefix_len in batch:
            entry.blocks = blocks
            entry.state = State.RUNNING
            entry.admitted_at = next(self._admissions)
            if entry.handle.times.started is None:
                entry.handle.times.started = time.monotonic()
            requests.append(
                to_pb_request(
                    request_id=entry.id,
                    req=entry.request,
                    input_ids=entry.tokens,
                    blocks=blocks,
                    prefix_len=prefix_len,
                    generated_before=len(entry.generated),
                )
            )
            self.running.append(entry)
        looked_up, hit = sum(len(e.tokens) for e, _, _ in batch), sum(p for _, _, p in batch)
        self._lookup_tokens += looked_up
        self._hit_tokens += hit
        metrics.PREFIX_CACHE_LOOKUP_TOKENS.inc(looked_up)
        metrics.PREFIX_CACHE_HIT_TOKENS.inc(hit)
        start = time.monotonic()
        generations, stepped, forward_ns = await self._rpc(
            self.client.prefill(requests, decode_running=mixed, extensions=extensions)
        )
        metrics.BATCH_INFERENCE_DURATION.labels(method="prefill").observe(time.monotonic() - start)
        metrics.BATCH_FORWARD_DURATION.labels(method="prefill").observe(forward_ns / 1e9)
        metrics.BATCH_INFERENCE_COUNT.labels(method="prefill").inc()
        if mixed:
            metrics.BATCH_MIXED_COUNT.inc()
        self._deliver_steps(stepping, stepped)
        for (entry, _, _), gen in zip(batch, generations, strict=True):
            entry.kv_len = len(entry.tokens)
            if entry.handle.prefill is None:
                entry.handle.prefill = prefill_out(gen)
            self._deliver(entry, token_out(gen))
        calltrace.mark("delivered", "prefill")

    async def _decode(self, steps: int) -> None:
        self._unsent.extend(self._plan_growth(steps))
        await self._drop_cancelled()  # preemptions from planning
        extensions = self._take_unsent()
        if not self.running:
            return
        start = time.monotonic()
        generations, forward_ns = await self._rpc(self.client.decode(extensions, steps))
        metrics.BATCH_INFERENCE_DURATION.labels(method="decode").observe(time.monotonic() - start)
        metrics.BATCH_FORWARD_DURATION.labels(method="decode").observe(forward_ns / 1e9)
        metrics.BATCH_INFERENCE_COUNT.labels(method="decode").inc()
        self._deliver_steps(self.running, generations)
        calltrace.mark("delivered", "decode")

    def _take_unsent(self) -> list[tuple[int, list[int]]]:
        """Planned extensions of entries still running, one per entry (blocks in planning order:
        the shard takes a request's extension once)."""
        unsent, self._unsent = self._unsent, []
        running = {e.id for e in self.running if e.state is State.RUNNING}
        merged: dict[int, list[int]] = {}
        for rid, blocks in unsent:
            if rid in running:
                merged.setdefault(rid, []).extend(blocks)
        return list(merged.items())

    def _deliver_steps(self, entries: Sequence[Entry], rows: Sequence[TokenRow]) -> None:
        """Decode-step tokens (a Decode answer, or a mixed Prefill's running part) for `entries`."""
        by_id = {e.id: e for e in entries}
        running = State.RUNNING
        for rid, out in rows:
            entry = by_id.get(rid)
            if entry is None or entry.state is not running:
                continue  # cancelled or finished meanwhile: the shard's extra tokens are dropped
            entry.kv_len += 1  # this step wrote the previous token's K/V
            self._deliver(entry, out)

    async def _rpc(self, call: Awaitable[T]) -> T:
        """Runs one shard call, handing the previous call's tokens to their streams only once this
        call is on its way. The streams' work (detokenizing, JSON, HTTP writes: most of the
        router's time per token) then runs while the engine computes. Pushed first, they would
        run first -- asyncio runs ready tasks in order -- and the engine would wait for them
        (measured on an H100 at max load: the router's work and the engine's steps added up)."""
        calltrace.mark("call", "")
        task = asyncio.ensure_future(call)
        if self._outbox:
            await asyncio.sleep(0)  # the call's first step runs and queues its gRPC sends
            self._flush()
        return await task

    def _flush(self) -> None:
        box, self._outbox = self._outbox, []
        for handle, out in box:
            handle.push(out)

    def _deliver(self, entry: Entry, out: TokenOut) -> None:
        """Books a token now; its stream gets it at the next call (_rpc) or when the loop idles."""
        entry.generated.append(out.id)
        if entry.handle.closed:  # cancelled by the client or by a stop sequence
            if entry not in self._cancelled:
                self._cancelled.append(entry)
            return
        self._outbox.append((entry.handle, out))
        if out.finish_reason is not None:
            self._finish(entry, cache_it=True)  # the shard dropped it already

    def _finish(self, entry: Entry, *, cache_it: bool) -> None:
        entry.state = State.DONE
        if entry in self.running:
            self.running.remove(entry)
        if self.kv is not None:
            self.kv.release(entry, cache_it=cache_it)

    async def _fail_all(self, error: GenerationError) -> None:
        self._flush()  # tokens that came before the failure are real
        log.error("generation failed for %d running requests: %s", len(self.running), error)
        for entry in list(self.running):
            entry.handle.fail(error)
            self._finish(entry, cache_it=False)
        self._cancelled = []
        self._unsent = []
        try:
            await self.client.clear()
        except GenerationError:
            log.exception("ClearCache failed after a generation error")
        if self.kv is not None and self.kv.cache is not None:
            # The shard may have lost its KV state: cached prefixes are no longer trustworthy.
            self.kv.cache.evict(self.kv.cache.cached_blocks)

    def _update_gauges(self) -> None:
        metrics.BATCH_CURRENT_SIZE.set(len(self.running))
        metrics.BATCH_CURRENT_MAX_TOKENS.set(
            sum(len(e.request.input_ids) + e.request.max_new_tokens for e in self.running)
        )
        if self.kv is not None:
            metrics.KV_BLOCKS_USED.set(self.kv.allocator.used_count)
            metrics.KV_BLOCKS_FREE.set(self.kv.allocator.free_count)
            if self._lookup_tokens:
                metrics.PREFIX_CACHE_HIT_RATE.set(self._hit_tokens / self._lookup_tokens)

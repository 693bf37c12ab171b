"""The scheduler's policy pieces, I/O-free and torch-free: which waiting entries join the batch
(admission), whether the next decode call may run several steps, and the KV growth before it (with
preemption of the newest entries when blocks run short). router/scheduler.py calls them and does
the RPCs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.handle import Entry, State
from router.kv_planner import KvPlanner
from router.queue import WaitingQueue
from router.types import Limits

# Multi-step calls go on while at most 1/NEARLY_FULL of --max-batch-size is free (nobody_can_join).
NEARLY_FULL = 8


@dataclass
class Admission:
    batch: list[tuple[Entry, list[int], int]]  # (entry, block table, cached prefix length), FIFO order
    head_blocked_by_kv: bool  # admission stopped at a head the KV cache cannot place now


def admit(
    waiting: WaitingQueue[Entry],
    running: Sequence[Entry],
    *,
    kv: KvPlanner | None,
    limits: Limits,
    max_batch_size: int | None,
    reserve: bool = False,
) -> Admission:
    """Takes waiting entries (FIFO, no skipping) while they fit: the batch cap, the prefill token
    budget, and KV blocks (paged engines) or the total-token budget (engines that own their KV
    cache, kv None). Placed entries leave the queue with their blocks allocated.

    reserve (guaranteed_no_evict, TensorRT-LLM's default capacity policy): a paged entry joins only
    if every running entry and it can grow to their full length (prompt + max_new_tokens) at once,
    so growth never preempts. Without it (max_utilization) the prompt plus one token must fit now
    and growth preempts the newest entries when blocks run short."""
    batch: list[tuple[Entry, list[int], int]] = []
    prefill_tokens = 0
    budget_tokens = sum(e.request.max_new_tokens + len(e.request.input_ids) for e in running)
    reserved = sum(kv.lifetime_blocks(e) for e in running) if kv is not None and reserve else 0
    while (entry := waiting.peek()) is not None:
        if max_batch_size is not None and len(running) + len(batch) >= max_batch_size:
            break
        n = len(entry.tokens)
        if batch and prefill_tokens + n > limits.max_batch_prefill_tokens:
            break
        total = len(entry.request.input_ids) + entry.request.max_new_tokens
        if kv is None and budget_tokens + total > limits.max_batch_total_tokens:
            break  # engines that own their KV cache are admitted by token budget only
        blocks: list[int] = []
        prefix_len = 0
        if kv is not None:
            if reserve:
                need = kv.lifetime_blocks(entry)
                if reserved + need > kv.num_blocks:
                    return Admission(batch, head_blocked_by_kv=True)
                reserved += need
            placement = kv.place(entry)
            if placement is None:
                return Admission(batch, head_blocked_by_kv=True)
            blocks, prefix_len = placement.blocks, placement.prefix_len
        waiting.pop()
        prefill_tokens += n - prefix_len
        budget_tokens += total
        batch.append((entry, blocks, prefix_len))
    return Admission(batch, head_blocked_by_kv=False)


def nobody_can_join(*, waiting: int, running: int, max_batch_size: int | None, head_blocked_by_kv: bool) -> bool:
    """No waiting request needs to join within one token: none waits, or the batch is within
    1/NEARLY_FULL of --max-batch-size, or this iteration's admission found that the head of the
    queue does not fit in the KV cache. At full load every finish frees a slot, so the batch
    hovers just under the cap; requiring it exactly full made nearly every call one step long
    (1.2 steps per call, 1,024 requests queued at --max-batch-size 256), paying the RPC and the
    router's per-call work for each token. Near the cap a waiting request joins within
    max_decode_steps tokens instead. A head blocked by KV room waits for finishes, and those
    free blocks at any step: it joins within max_decode_steps tokens of one (H100, 1000/1000 at
    max load: 5,753 -> 6,185 output tok/s against single steps there). An earlier measurement
    favoured single steps under KV pressure: that was while every allocation short of blocks
    scanned the whole prefix cache, which multi-step growth made worse."""
    if not waiting or head_blocked_by_kv:
        return True
    if max_batch_size is None:
        return False
    return running >= max_batch_size - max_batch_size // NEARLY_FULL


def plan_growth(
    running: Sequence[Entry], kv: KvPlanner, steps: int, preempt: Callable[[Entry], None]
) -> list[tuple[int, list[int]]]:
    """Blocks for `steps` more tokens per running entry, oldest first; when short, `preempt` the
    newest running entry (it must take the entry out of `running`) until the entry fits or was
    itself preempted. Returns (request id, new blocks) of the entries still running."""
    extensions: list[tuple[int, list[int]]] = []
    for entry in sorted(running, key=lambda e: e.admitted_at):
        if entry.state is not State.RUNNING:
            continue  # preempted below while planning an older entry
        while (fresh := kv.grow(entry, steps)) is None:
            victim = max((e for e in running if e.state is State.RUNNING), key=lambda e: e.admitted_at)
            preempt(victim)
            if victim is entry:
                break
        if fresh:
            extensions.append((entry.id, fresh))
    still = {e.id for e in running}
    return [(i, b) for i, b in extensions if i in still]

"""Waiting queue of requests not yet admitted, and the two admission policy pieces the scheduler
calls each iteration: `should_prefill` (TGI's when-to-batch rule) and `admit` (how many of the
leading waiting entries fit the next prefill). Pure bookkeeping: no I/O, no clocks, no torch."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """FIFO of waiting entries. Preempted entries go back to the front so they run first again.
    Entries are compared by identity (two equal requests are still two requests)."""

    def __init__(self) -> None:
        self._entries: deque[T] = deque()

    def push(self, entry: T) -> None:
        self._entries.append(entry)

    def push_front(self, entry: T) -> None:
        self._entries.appendleft(entry)

    def peek(self) -> T | None:
        return self._entries[0] if self._entries else None

    def pop(self) -> T | None:
        return self._entries.popleft() if self._entries else None

    def remove(self, entry: T) -> bool:
        """Drops a queued entry (cancellation). False when it is not queued (already admitted)."""
        for i, e in enumerate(self._entries):
            if e is entry:
                del self._entries[i]
                return True
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        """Front to back, the order admission considers them."""
        return iter(self._entries)


def min_new_batch_size(
    *, running: int, steps_since_prefill: int, waiting_served_ratio: float, max_waiting_tokens: int
) -> int | None:
    """TGI's `min_size` for a new batch joining a running one (backends/v3/src/backend.rs,
    batching_task): None (any size) when the running batch is empty or has gone max_waiting_tokens
    steps without a prefill, else floor(running * waiting_served_ratio)."""
    if running == 0 or steps_since_prefill >= max_waiting_tokens:
        return None
    return math.floor(running * waiting_served_ratio)


def should_prefill(
    *,
    waiting: int,
    running: int,
    steps_since_prefill: int,
    waiting_served_ratio: float,
    max_waiting_tokens: int,
) -> bool:
    """Whether to run a prefill for waiting entries before the next decode step. TGI's rule
    (backends/v3/src/backend.rs batching_task with queue.rs next_batch):

    - nothing waiting: no;
    - nothing running: yes (the batching loop starts from an empty batch with no minimum size);
    - steps_since_prefill >= max_waiting_tokens: yes, whatever the size (waiting entries have
      waited long enough). steps_since_prefill is TGI's `waiting_tokens`: tokens the running batch
      generated since the last prefill, counting the token that prefill produced (1 right after it);
    - otherwise only when waiting >= floor(running * waiting_served_ratio): new entries join when
      the waiting set is large relative to the running batch (with ratio 0.3, a batch of 10 takes
      newcomers once 3 wait, a batch of 3 or fewer takes any). Below that the running batch keeps
      decoding undisturbed.

    TGI also drops the new batch when fewer than that minimum actually fit (budgets, blocks): the
    scheduler does not apply that half: whatever fits of the waiting FIFO joins.
    """
    if waiting == 0:
        return False
    min_size = min_new_batch_size(
        running=running,
        steps_since_prefill=steps_since_prefill,
        waiting_served_ratio=waiting_served_ratio,
        max_waiting_tokens=max_waiting_tokens,
    )
    return min_size is None or waiting >= min_size

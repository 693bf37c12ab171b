"""A request as the scheduler tracks it (Entry) and as the HTTP layer sees it (RequestHandle)."""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from router.errors import GenerationError
from router.types import GenerateRequest, PrefillOut, RequestTimes, TokenOut


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


# What a handle's queue carries: a token, an error to raise, or None (closed after a cancel).
_Item = TokenOut | GenerationError | None


class RequestHandle:
    """The HTTP layer's view: iterate TokenOut until one carries a finish_reason; cancel() any time."""

    def __init__(self, request_id: int, on_cancel: Callable[[], None]) -> None:
        self.id = request_id
        self.times = RequestTimes(queued=time.monotonic())
        self.prefill: PrefillOut | None = None
        # A deque and one waiter future rather than an asyncio.Queue: every token goes through
        # here on the router's one thread, and the Queue's bookkeeping (unfinished-task counts, an
        # Event, a getter deque, the loop check) cost more than the rest of the handoff.
        self._items: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits
        self._on_cancel = on_cancel
        self._closed = False

    def __aiter__(self) -> AsyncIterator[TokenOut]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenOut]:
        items = self._items
        while True:
            if not items:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
                continue
            item = items.popleft()
            if item is None:
                return
            if isinstance(item, GenerationError):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    @property
    def pending(self) -> bool:
        """Items are queued right now: the consumer will get the next one without waiting (a
        multi-step Decode call pushes several tokens at once; the SSE writer sends them together)."""
        return bool(self._items)

    def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            self._put(None)
            self._on_cancel()

    # -- scheduler side -------------------------------------------------------------------------
    def push(self, item: TokenOut) -> None:
        if not self._closed:
            if self.times.first_token is None:
                self.times.first_token = time.monotonic()
            if item.finish_reason is not None:
                self.times.finished = time.monotonic()
                self._closed = True
            self._put(item)

    def fail(self, error: GenerationError) -> None:
        if not self._closed:
            self._closed = True
            self.times.finished = time.monotonic()
            self._put(error)

    def _put(self, item: _Item) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: its consumer was cancelled meanwhile
            waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(eq=False)
class Entry:
    """Scheduler bookkeeping of one request. Invariant while RUNNING on a paged engine: the shard's
    KV cache holds `kv_len` tokens of `prompt + generated` in `blocks`, and the last generated
    token is pending (its K/V is written by the next decode step)."""

    id: int
    request: GenerateRequest
    handle: RequestHandle
    state: State = State.WAITING
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    kv_len: int = 0
    admitted_at: int = 0  # admission order; the newest running entry is preempted first

    @property
    def tokens(self) -> list[int]:
        """Everything the sequence holds: prompt, then generated tokens."""
        return [*self.request.input_ids, *self.generated]

    @property
    def remaining_new_tokens(self) -> int:
        return self.request.max_new_tokens - len(self.generated)

"""Requests inside the router that the scheduler has not seen yet: accepted by the HTTP layer and
being validated (parsed, tokenized), so each will reach Scheduler.submit -- or fail validation --
within its validation time.

Why the scheduler wants to know: a burst of requests reaches an idle server over some tens of
milliseconds (~1 ms of the router's loop each), and without this the first prefill goes out with
the first request or two; the rest of the burst then runs as a second prefill, a decode step later,
and the burst's last requests finish later than if one prefill had taken them all. With
--burst-hold-ms the scheduler of an idle server holds its first prefill while requests are still
arriving (Scheduler._hold_for_burst). Used from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class Arrivals:
    def __init__(self) -> None:
        self.count = 0  # requests being validated now
        self._waiters: list[asyncio.Future[None]] = []

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Around one request's validation: it counts until validated (or failed, or cancelled)."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def next_change(self) -> asyncio.Future[None]:
        """Resolves when the next request leaves validation. A request that validates is submitted
        in the same loop turn (the stream path) or the next task step, before the waiter runs."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

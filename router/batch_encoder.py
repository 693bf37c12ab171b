"""Prompt tokenization for requests that arrive together: one thread-pool call per event-loop turn.

A burst of requests (hundreds at once) reaches validation within a few loop turns. Encoding each
prompt in its own executor call costs a round trip per request on the event loop (future, wakeup,
callback) and a GIL handoff per request in the pool; the encodes themselves run in Rust with the
GIL released. Here the prompts asked for during one loop turn are encoded by one
Tokenizer.encode_batch call in the pool (the Rust tokenizer spreads it over its own threads), and
the results are handed back in one callback.

Contract: encode() returns exactly what tokenizer.encode(text, ...) returns (batching changes no
id), raises what encoding that one text raises, and a cancelled caller just drops its result.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.tokenizer import truncate_ids

if TYPE_CHECKING:
    from router.tokenizer import Tokenizer

# Prompts per pool call: a larger burst is split, so that its first requests reach the scheduler
# before the last ones are encoded and the pool's workers share the burst.
MAX_BATCH = 64


@dataclass
class _Pending:
    """Prompts waiting for the end of this loop turn, for one (tokenizer, add_special_tokens)."""

    tokenizer: Tokenizer
    add_special_tokens: bool
    texts: list[str] = field(default_factory=list)
    futures: list[asyncio.Future[list[int]]] = field(default_factory=list)


class BatchEncoder:
    """Encodes prompts in `pool`, batching those asked for in the same event-loop turn. Used
    from the event loop's thread only."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._pending: dict[tuple[int, bool], _Pending] = {}

    async def encode(
        self, tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = True, truncate: int | None = None
    ) -> list[int]:
        loop = asyncio.get_running_loop()
        if not self._pending:
            # call_soon runs after every callback already queued for this turn: the other
            # requests that arrived with this one have asked by then.
            loop.call_soon(self._flush)
        key = (id(tokenizer), add_special_tokens)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(tokenizer, add_special_tokens)
        fut: asyncio.Future[list[int]] = loop.create_future()
        pending.texts.append(text)
        pending.futures.append(fut)
        return truncate_ids(await fut, truncate)

    def _flush(self) -> None:
        groups, self._pending = list(self._pending.values()), {}
        loop = asyncio.get_running_loop()
        for g in groups:
            for start in range(0, len(g.texts), MAX_BATCH):
                texts = g.texts[start : start + MAX_BATCH]
                futures = g.futures[start : start + MAX_BATCH]
                try:
                    job = loop.run_in_executor(
                        self._pool, _encode_all, g.tokenizer, texts, g.add_special_tokens
                    )
                except RuntimeError as e:  # the pool is shut down: fail these requests, don't hang them
                    _fail(futures, e)
                    continue
                job.add_done_callback(functools.partial(_deliver, futures=futures))


def _encode_all(
    tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool
) -> list[list[int] | BaseException]:
    """In the pool: every text's ids, or the error encoding that text alone raised (a text the
    batch call fails on must not fail the others)."""
    try:
        return list(tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens))
    except Exception:
        if len(texts) == 1:
            raise
    results: list[list[int] | BaseException] = []
    for t in texts:
        try:
            results.append(tokenizer.encode_batch([t], add_special_tokens=add_special_tokens)[0])
        except Exception as e:
            results.append(e)
    return results


def _deliver(
    job: asyncio.Future[list[list[int] | BaseException]], *, futures: Sequence[asyncio.Future[list[int]]]
) -> None:
    if job.cancelled():  # the pool was shut down with the job still queued
        for f in futures:
            f.cancel()
        return
    error = job.exception()
    if error is not None:
        _fail(futures, error)
        return
    for f, r in zip(futures, job.result(), strict=True):
        if f.done():  # its caller was cancelled meanwhile
            continue
        if isinstance(r, BaseException):
            f.set_exception(r)
        else:
            f.set_result(r)


def _fail(futures: Sequence[asyncio.Future[list[int]]], error: BaseException) -> None:
    for f in futures:
        if not f.done():
            f.set_exception(error)

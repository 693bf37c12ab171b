"""The one thread that reads TensorRT-LLM's responses and hands tokens to the engine's calls.

TensorRT-LLM runs its own in-flight batching loop; results come back through
`executor.await_responses(timeout)`, which blocks (with the GIL released) until a response arrives
or the timeout passes. One thread calls it in a loop and routes each response to the request it
belongs to, as TokenEvents in a per-request queue; the engine's Prefill/Decode wait on one
condition variable until the tokens they need are there. Nothing polls in a tight loop: the thread
blocks in await_responses, the waiters block on the condition. Iteration statistics are fetched by
the same thread at most every `stats_interval_s` (get_latest_iteration_stats drains TensorRT-LLM's
queue of them), never in a loop of their own.

Locking: every Track field is guarded by the bridge's condition; the engine calls the methods
below, which take it. enqueue() holds it across executor.enqueue_request so that a response can
never arrive for an id the bridge does not know yet.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shard.engine.types import FinishReason

log = logging.getLogger(__name__)

# TensorRT-LLM FinishReason names -> ours. CANCELLED only reaches requests the router dropped.
_FINISH_BY_NAME = {
    "END_ID": FinishReason.EOS_TOKEN,
    "STOP_WORDS": FinishReason.EOS_TOKEN,
    "LENGTH": FinishReason.LENGTH,
    "TIMED_OUT": FinishReason.LENGTH,
    "CANCELLED": FinishReason.LENGTH,
}


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float  # NaN when TensorRT-LLM returned none
    finish: FinishReason | None  # set on the request's last token only


@dataclass
class Track:
    """What the response thread needs to turn one request's responses into TokenEvents."""

    request_id: int  # the router's id
    end_id: int  # -1 when EOS is ignored
    eos_id: int  # reported when a final response carries no token
    stop_ids: frozenset[int]
    max_tokens: int  # new tokens TensorRT-LLM may generate for this request
    received: int = 0
    pending: deque[TokenEvent] = field(default_factory=deque)
    finished: bool = False  # the finishing TokenEvent exists; later responses are ignored
    error: str | None = None


def _finish_of(result: Any) -> FinishReason | None:
    reasons = getattr(result, "finish_reasons", None) or []
    name = getattr(reasons[0], "name", str(reasons[0])).rsplit(".", 1)[-1] if reasons else ""
    return _FINISH_BY_NAME.get(name)


def _logprobs(result: Any, n: int) -> list[float]:
    """The logprobs of the last n tokens of beam 0. Some versions send the new tokens' logprobs in a
    streaming response, others all of them so far: the last n are right in both cases."""
    log_probs = getattr(result, "log_probs", None)
    beam = list(log_probs[0]) if log_probs else []
    tail = [float(x) for x in beam[-n:]] if n else []
    return [math.nan] * (n - len(tail)) + tail


def events_from_result(track: Track, result: Any) -> list[TokenEvent]:
    """Turns one streaming Result (new tokens of beam 0) into TokenEvents, updating `track`.

    The adapter decides EOS and LENGTH itself from the tokens (end_id, stop ids, max_tokens), so the
    finishing event sits on the right token whether or not is_final comes in the same response. A
    final response without any token (TensorRT-LLM may end on end_id without returning it) becomes
    one event carrying the model's EOS id and a NaN logprob.
    """
    events: list[TokenEvent] = []
    if track.finished:
        return events
    tokens = [int(t) for t in (result.output_token_ids[0] if result.output_token_ids else [])]
    for token, logprob in zip(tokens, _logprobs(result, len(tokens)), strict=True):
        track.received += 1
        finish = None
        if (track.end_id >= 0 and token == track.end_id) or token in track.stop_ids:
            finish = FinishReason.EOS_TOKEN
        elif track.received >= track.max_tokens:
            finish = FinishReason.LENGTH
        events.append(TokenEvent(token, logprob, finish))
        if finish is not None:
            track.finished = True
            return events
    if result.is_final:
        reason = _finish_of(result) or FinishReason.LENGTH
        if events:
            events[-1] = TokenEvent(events[-1].token_id, events[-1].logprob, reason)
        else:
            events.append(TokenEvent(track.eos_id, math.nan, reason))
        track.finished = True
    return events


class ResponseBridge:
    def __init__(self, executor: Any, *, poll_s: float = 0.25, stats_interval_s: float = 5.0) -> None:
        self._executor = executor
        self._poll = datetime.timedelta(seconds=poll_s)
        self._stats_interval_s = stats_interval_s
        self._cond = threading.Condition()
        self._tracks: dict[int, Track] = {}  # TensorRT-LLM request id -> track
        self._fatal: str | None = None
        self._stopping = False
        self._stats_lock = threading.Lock()
        self._latest_stats: Any = None
        self._stats_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trtllm-responses", daemon=True)

    # ------------------------------------------------------------ the response thread

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poll_s = self._poll.total_seconds()
        while True:
            with self._cond:
                if self._stopping:
                    return
            started = time.monotonic()
            try:
                responses = self._executor.await_responses(timeout=self._poll)
            except Exception as e:  # the executor is gone; every waiter must learn it
                self._fail(f"await_responses failed: {type(e).__name__}: {e}")
                return
            with self._cond:
                if responses:
                    for response in responses:
                        self._route(response)
                    self._cond.notify_all()
                elif time.monotonic() - started < poll_s / 2:
                    # An await that returns at once with nothing (a broken or shut-down executor)
                    # must not turn this loop into a spin: wait out the poll interval.
                    self._cond.wait_for(lambda: self._stopping, poll_s)
            if time.monotonic() - self._stats_at >= self._stats_interval_s:
                self.iteration_stats(refresh=True)

    def _route(self, response: Any) -> None:
        track = self._tracks.get(response.request_id)
        if response.has_error():
            if track is None:
                log.error("TensorRT-LLM error for request %s: %s", response.request_id, response.error_msg)
            else:
                track.error, track.finished = str(response.error_msg), True
            return
        if track is None:
            return  # a request the router dropped (its CANCELLED answer) or already finished
        track.pending.extend(events_from_result(track, response.result))

    def _fail(self, message: str) -> None:
        log.error("TensorRT-LLM response thread stopped: %s", message)
        with self._cond:
            self._fatal = message
            self._cond.notify_all()

    # ------------------------------------------------------------ called by the engine (one thread)

    @property
    def fatal(self) -> str | None:
        with self._cond:
            return self._fatal

    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def enqueue(self, request: Any, track: Track) -> int:
        with self._cond:
            exec_id = int(self._executor.enqueue_request(request))
            self._tracks[exec_id] = track
            return exec_id

    def forget(self, exec_id: int) -> Track | None:
        with self._cond:
            return self._tracks.pop(exec_id, None)

    def wait(self, ready: Callable[[dict[int, Track]], bool], timeout_s: float) -> bool:
        """Blocks until ready(tracks) (called under the lock), the thread fails or stops, or the timeout.

        Returns ready's final answer (False on timeout or failure).
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._fatal is not None or self._stopping or ready(self._tracks), timeout_s
            )
            return self._fatal is None and not self._stopping and ready(self._tracks)

    def take(self, exec_ids: Iterable[int], limit: int) -> dict[int, tuple[list[TokenEvent], str | None]]:
        """Up to `limit` pending events per request, and its error if TensorRT-LLM reported one."""
        out: dict[int, tuple[list[TokenEvent], str | None]] = {}
        with self._cond:
            for exec_id in exec_ids:
                track = self._tracks.get(exec_id)
                if track is None:
                    continue
                events = [track.pending.popleft() for _ in range(min(limit, len(track.pending)))]
                out[exec_id] = (events, track.error)
        return out

    def iteration_stats(self, *, refresh: bool = False) -> Any:
        """The latest IterationStats object seen (None before the first); refresh drains TensorRT-LLM's queue."""
        with self._stats_lock:
            if refresh:
                self._stats_at = time.monotonic()
                try:
                    stats = list(self._executor.get_latest_iteration_stats())
                except Exception as e:
                    log.warning("get_latest_iteration_stats failed: %s", e)
                    stats = []
                if stats:
                    self._latest_stats = stats[-1]
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("iteration stats: %s", stats_as_dict(stats[-1]))
            return self._latest_stats

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the TensorRT-LLM response thread did not stop within %.1f s", timeout_s)


def stats_as_dict(stats: Any) -> dict[str, Any]:
    """An IterationStats as plain data (its own JSON when it offers to_json_str)."""
    to_json = getattr(stats, "to_json_str", None)
    if callable(to_json):
        try:
            data = json.loads(to_json())
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    keys = (
        "iter",
        "iter_latency_ms",
        "num_active_requests",
        "num_queued_requests",
        "max_num_active_requests",
    )
    return {k: getattr(stats, k) for k in keys if hasattr(stats, k)}

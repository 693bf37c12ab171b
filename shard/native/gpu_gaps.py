"""Diagnostic: where the GPU sits idle between the native engine's pieces of work.

On with SHARD_GPU_GAPS=1 (CUDA only; off, the engine calls nothing here). Each piece of work --
a prefill forward, a decode step -- gets a CUDA event where its first kernel is queued and one
after its sampling. The idle time before a piece is the time between the previous piece's end
event and its start event on the GPU's clock: zero when the host queued it while the GPU was
still busy, the wait when the GPU had run dry. Gaps are summed by transition (what ran before ->
what comes now):
  - step: a decode step launched inside the Decode call that launched the one before it;
  - call: the first step a Decode call launches (the one before came from an earlier call, so the
    gap holds the RPC turnaround not covered by the carried step);
  - prefill: a prefill forward (mixed ones included).
Gaps over NO_WORK_MS are a server without work and are kept apart. Rank 0 logs the running
totals every LOG_EVERY_S seconds of work: "gpu gaps: busy ... idle ... by transition ...";
bench/sched_bench.py --shard-log keeps the log.

It also sums each piece's GPU time by class of work (`work`): prefills with their token counts,
decode steps by batch size with their rows and the K/V tokens those hold, so that each class
compares with its floor (weights once a step, plus the K/V read, over the copy bandwidth).

On the host's clock it also books each Decode call's time away from the engine: from the end of
one engine call (its tokens read) to the start of the next Decode, i.e. building the answer, the
RPC both ways and the router's work between calls -- what the carried step has to cover. Split by
whether the call before ran one step or several ("away: 1-step calls ... multi-step calls ...").
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import torch

log = logging.getLogger(__name__)

LOG_EVERY_S = 1.0
# A longer gap is a server without work (between benchmark levels, say), not serving overhead:
# counted apart, as "no work".
NO_WORK_MS = 500.0


def gaps_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("SHARD_GPU_GAPS", "0") == "1"


class GpuGaps:
    def __init__(self, *, rank: int = 0) -> None:
        self.rank = rank
        # (kind, start, end, work class, rows or prefill tokens, K/V tokens) per piece in flight
        self._open: deque[tuple[str, torch.cuda.Event, torch.cuda.Event, str, int, int]] = deque()
        self._tokens = 0  # the open prefill's new tokens
        # GPU time by class of work: [pieces, ms, rows (prefill: tokens), K/V tokens held]. Decode
        # steps by batch size, so that each class's ms compare with its floor (weights read once
        # a step plus its K/V tokens, over the copy bandwidth).
        self.work: dict[str, list[float]] = {}
        self._start: tuple[str, torch.cuda.Event] | None = None
        self._prev: tuple[str, torch.cuda.Event] | None = None  # the last finished piece's kind, end
        self.busy_ms = 0.0
        self.no_work_ms = 0.0
        self.idle_ms: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._logged = time.monotonic()
        # Host time away from the engine between Decode calls (call_end -> call_start), keyed by
        # whether the call before ran one step or more: [calls, ms, tokens returned].
        self.away: dict[str, list[float]] = {"1-step": [0, 0.0, 0], "multi-step": [0, 0.0, 0]}
        self._call_end: tuple[float, str, int] | None = None

    def call_start(self) -> None:
        """A Decode call enters the engine."""
        if self._call_end is not None:
            ended, key, tokens = self._call_end
            gap_ms = (time.perf_counter() - ended) * 1e3
            if gap_ms <= NO_WORK_MS:
                book = self.away[key]
                book[0] += 1
                book[1] += gap_ms
                book[2] += tokens
        self._call_end = None

    def call_end(self, *, steps: int, tokens: int) -> None:
        """A Decode call leaves the engine with `tokens` tokens from `steps` steps."""
        self._call_end = (time.perf_counter(), "1-step" if steps <= 1 else "multi-step", tokens)

    def not_a_decode(self) -> None:
        """Anything else ran between two Decode calls (a Prefill): the next gap is not booked."""
        self._call_end = None

    def begin(self, kind: str, *, tokens: int = 0) -> None:
        """Before the piece's first kernel (its input copies included); a prefill's token count."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._start = (kind, ev)
        self._tokens = tokens

    def end(self, *, rows: int = 0, kv_tokens: int = 0) -> None:
        """After the piece's last kernel (its sampling and the tokens' copy queued): its sequences
        and the K/V tokens they hold (what a decode step's attention reads)."""
        if self._start is None:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        kind, start = self._start
        self._start = None
        self._open.append((kind, start, ev, work_class(kind, rows), rows if kind != "prefill" else self._tokens, kv_tokens))
        self.collect()

    def collect(self) -> None:
        """Books the pieces whose end event has completed (never waits)."""
        while self._open and self._open[0][2].query():
            kind, start, end, cls, rows, kv_tokens = self._open.popleft()
            if self._prev is not None:
                prev_kind, prev_end = self._prev
                gap = max(0.0, prev_end.elapsed_time(start))
                if gap > NO_WORK_MS:
                    self.no_work_ms += gap
                else:
                    key = f"{prev_kind}->{kind}"
                    self.idle_ms[key] = self.idle_ms.get(key, 0.0) + gap
                    self.count[key] = self.count.get(key, 0) + 1
            ms = start.elapsed_time(end)
            self.busy_ms += ms
            book = self.work.setdefault(cls, [0, 0.0, 0, 0])
            book[0] += 1
            book[1] += ms
            book[2] += rows
            book[3] += kv_tokens
            self._prev = (kind, end)
        now = time.monotonic()
        if self.rank == 0 and now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.info("gpu gaps: %s", self.summary())

    def summary(self) -> str:
        idle = sum(self.idle_ms.values())
        parts = ", ".join(
            f"{k} {v:.0f} ms/{self.count[k]}" for k, v in sorted(self.idle_ms.items(), key=lambda kv: -kv[1])
        )
        away = "; ".join(
            f"{k} calls {int(n)}, {ms:.0f} ms, {ms / n:.1f} ms each, {1e3 * ms / max(1, tok):.2f} us/token"
            for k, (n, ms, tok) in self.away.items()
            if n
        )
        work = "; ".join(
            f"{k} {int(n)} x {ms / n:.2f} ms, rows {rows / n:.1f}, kv {kv / n:.0f}"
            for k, (n, ms, rows, kv) in sorted(self.work.items())
        )
        return (
            f"busy {self.busy_ms:.0f} ms idle {idle:.0f} ms (no work {self.no_work_ms:.0f} ms) "
            f"by transition: {parts}; away between Decode calls: {away or 'none'}; work: {work}"
        )


DECODE_BUCKETS = (8, 32, 64, 128, 256)


def work_class(kind: str, rows: int) -> str:
    """"prefill" (mixed ones included), else decode steps by batch size: "decode<=8" ...
    "decode<=256", "decode>256"."""
    if kind == "prefill":
        return "prefill"
    for top in DECODE_BUCKETS:
        if rows <= top:
            return f"decode<={top}"
    return f"decode>{DECODE_BUCKETS[-1]}"

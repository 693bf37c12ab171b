"""Diagnostic: host timestamps of each router call's stages, for lining up with the shard's.

On with TGI_CALL_TRACE=PREFIX (off, mark() does nothing): every event appends one JSON line
[event, method, t] to PREFIX.router.PID.jsonl, t from time.perf_counter() -- CLOCK_MONOTONIC on
Linux, one clock for every process of the host, so router and shard lines interleave
(shard/calltrace.py writes the other side; bench/call_trace.py puts them together).
"""

from __future__ import annotations

import json
import os
import time

_PREFIX = os.environ.get("TGI_CALL_TRACE", "")
_out = open(f"{_PREFIX}.router.{os.getpid()}.jsonl", "a", buffering=1) if _PREFIX else None  # noqa: SIM115


def mark(event: str, method: str) -> None:
    if _out is not None:
        _out.write(json.dumps([event, method, time.perf_counter()]) + "\n")

"""Garbage-collector policy for the router's one event loop.

At max load the router allocates a few container objects per streamed token (token records,
steps, JSON dicts, protobuf wrappers); almost all die young through reference counting. CPython's
cyclic collector still runs a collection every 700 net container allocations, and its full
collections walk every tracked object in the process: the imported libraries (transformers,
FastAPI, pydantic, grpc) hold millions. py-spy with native frames on the 2-core CI VM, 1,024
streams on the counting engine: `gc_collect_main` was ~18% of the router thread's CPU.

What we do, once start-up is done (imports, tokenizer, warmup):
- `gc.freeze()`: everything alive now moves to the permanent generation, never scanned again;
- a larger first-generation threshold, so young collections run less often; each then scans
  only the young objects still alive, which at any time are the in-flight requests' state.
Cycles are still collected (the router creates a few: exceptions with tracebacks, asyncio tasks).
ROUTER_GC_TUNING=0 keeps CPython's defaults (for A/B measurements).
"""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)

GEN0_THRESHOLD = 50_000  # CPython's default is 700
GEN1_THRESHOLD = 20  # default 10
GEN2_THRESHOLD = 100  # default 10 (full collections also wait for 25% growth of the long-lived set)


def tune_after_startup() -> bool:
    """Freeze the start-up heap and raise the thresholds; returns whether it did."""
    if os.environ.get("ROUTER_GC_TUNING", "1") == "0":
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    log.info("gc: froze %d start-up objects; thresholds %s", gc.get_freeze_count(), gc.get_threshold())
    return True

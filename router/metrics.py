"""Prometheus metrics under TGI's names, in prometheus-client's default registry.

Module-level objects with fixed Python names: the HTTP layer records the per-request ones
(REQUEST_*), the scheduler the batch, queue, KV-cache and prefix-cache ones. /metrics serves
prometheus_client.generate_latest(); nothing here writes the exposition format by hand.

Counters keep TGI's exact sample names (tgi_request_count, not prometheus-client's
tgi_request_count_total) so existing TGI dashboards and alerts work: they are TgiCounter objects,
exposed by a small collector that hands prometheus-client ready-made counter families.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric


class TgiCounter:
    """A monotonically increasing counter, exposed under its name without a `_total` suffix.
    Same calling surface as prometheus-client's Counter for what the router uses:
    inc(amount) and labels(**values).inc(amount)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] | list[str] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        _COUNTERS.append(self)

    def labels(self, **values: str) -> _Child:
        assert set(values) == set(self.labelnames), values
        return _Child(self, tuple(str(values[n]) for n in self.labelnames))

    def inc(self, amount: float = 1.0) -> None:
        assert not self.labelnames, "use labels(...).inc()"
        self._add((), amount)

    def _add(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def metric(self) -> Metric:
        # "untyped": prometheus-client would rename a counter family to <name>_total in HELP/TYPE
        # while our samples keep TGI's bare name; rate() works on untyped series all the same.
        m = Metric(self.name, self.documentation, "unknown")
        with self._lock:
            items = list(self._values.items()) or ([((), 0.0)] if not self.labelnames else [])
        for key, value in items:
            m.add_sample(self.name, dict(zip(self.labelnames, key, strict=True)), value)
        return m


class _Child:
    def __init__(self, parent: TgiCounter, key: tuple[str, ...]) -> None:
        self._parent, self._key = parent, key

    def inc(self, amount: float = 1.0) -> None:
        self._parent._add(self._key, amount)  # noqa: SLF001


_COUNTERS: list[TgiCounter] = []


class _CounterCollector:
    def collect(self) -> Iterator[Metric]:
        for counter in _COUNTERS:
            yield counter.metric()


REGISTRY.register(_CounterCollector())
Counter = TgiCounter  # the module's counters below are all TGI-named

# TGI's duration buckets: a geometric series 0.0001 * 1.5**k, k = 1..35 (~0.00015 s to ~1.9e2 s).
DURATION_BUCKETS: tuple[float, ...] = tuple(0.0001 * 1.5**k for k in range(1, 36))
# Token-count buckets (TGI derives them from --max-input-tokens, which is unknown at import).
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(0, 18))
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(0, 11))

REQUEST_COUNT = Counter("tgi_request_count", "Total number of requests")
REQUEST_SUCCESS = Counter("tgi_request_success", "Number of successful requests")
REQUEST_FAILURE = Counter("tgi_request_failure", "Number of failed requests", ["err"])
REQUEST_DURATION = Histogram(
    "tgi_request_duration", "Total time spent processing the request (s)", buckets=DURATION_BUCKETS
)
REQUEST_VALIDATION_DURATION = Histogram(
    "tgi_request_validation_duration", "Time spent validating the request (s)", buckets=DURATION_BUCKETS
)
REQUEST_QUEUE_DURATION = Histogram(
    "tgi_request_queue_duration", "Time spent in the queue per request (s)", buckets=DURATION_BUCKETS
)
REQUEST_INFERENCE_DURATION = Histogram(
    "tgi_request_inference_duration", "Request inference duration (s)", buckets=DURATION_BUCKETS
)
REQUEST_MEAN_TIME_PER_TOKEN = Histogram(
    "tgi_request_mean_time_per_token_duration",
    "Mean time per token per request (s)",
    buckets=DURATION_BUCKETS,
)
REQUEST_GENERATED_TOKENS = Histogram(
    "tgi_request_generated_tokens", "Generated tokens per request", buckets=TOKEN_BUCKETS
)
REQUEST_INPUT_LENGTH = Histogram(
    "tgi_request_input_length", "Input token length per request", buckets=TOKEN_BUCKETS
)
REQUEST_MAX_NEW_TOKENS = Histogram(
    "tgi_request_max_new_tokens", "Maximum new tokens per request", buckets=TOKEN_BUCKETS
)

QUEUE_SIZE = Gauge("tgi_queue_size", "Current queue size")
BATCH_CURRENT_SIZE = Gauge("tgi_batch_current_size", "Current batch size")
BATCH_CURRENT_MAX_TOKENS = Gauge("tgi_batch_current_max_tokens", "Maximum tokens for the current batch")
BATCH_NEXT_SIZE = Histogram("tgi_batch_next_size", "Batch size of the next batch", buckets=BATCH_SIZE_BUCKETS)
BATCH_INFERENCE_DURATION = Histogram(
    "tgi_batch_inference_duration", "Batch inference duration (s)", ["method"], buckets=DURATION_BUCKETS
)
# The engine's own time inside the call (the shard's timings.forward_ns); inference minus forward is
# the RPC and the shard's bookkeeping.
BATCH_FORWARD_DURATION = Histogram(
    "tgi_batch_forward_duration", "Batch forward duration (s)", ["method"], buckets=DURATION_BUCKETS
)
# Not in TGI: the master shard's own time for the call (timings.total_ns: its engine call and the
# answer's protobufs). Inference minus shard is gRPC transport plus the router's event-loop lag;
# shard minus forward is the shard's bookkeeping around the engine's step loop.
BATCH_SHARD_DURATION = Histogram(
    "tgi_batch_shard_duration", "Batch duration inside the master shard (s)", ["method"], buckets=DURATION_BUCKETS
)
BATCH_INFERENCE_COUNT = Counter("tgi_batch_inference_count", "Inference calls per method", ["method"])
# Not in TGI: prefill calls that also ran the running batch's decode step (mixed batches).
BATCH_MIXED_COUNT = Counter("tgi_batch_mixed_count", "Prefill calls that carried the running batch's decode step")
BATCH_INFERENCE_SUCCESS = Counter(
    "tgi_batch_inference_success", "Successful inference calls per method", ["method"]
)

KV_BLOCKS_USED = Gauge("tgi_kv_cache_blocks_used", "KV-cache blocks in use")
KV_BLOCKS_FREE = Gauge("tgi_kv_cache_blocks_free", "KV-cache blocks free")
PREFIX_CACHE_HIT_TOKENS = Counter("tgi_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache")
PREFIX_CACHE_LOOKUP_TOKENS = Counter(
    "tgi_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache"
)
PREFIX_CACHE_HIT_RATE = Gauge(
    "tgi_prefix_cache_hit_rate", "Cumulative prefix-cache hit rate (hit tokens / lookup tokens)"
)


def render() -> tuple[bytes, str]:
    """The exposition of the default registry and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST

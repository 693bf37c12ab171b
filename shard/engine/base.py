"""The engine interface every shard engine implements, and the errors it may raise.

Threading: the gRPC layer calls one engine method at a time, from one worker thread, so engines
need no locks of their own. Every rank receives the same calls in the same order (the router fans
out), so collective operations inside an engine line up across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shard.engine.types import EngineInfo, NewRequest, StepResult, WarmupResult, WarmupSpec


class EngineError(Exception):
    """Base of the errors an engine raises on purpose; the gRPC boundary maps them to status codes."""


class InvalidRequestError(EngineError):
    """The request breaks a documented invariant (unknown id, block table too short...). -> INVALID_ARGUMENT"""


class OutOfResourcesError(EngineError):
    """Not enough memory or KV blocks; the message names the flag to change. -> RESOURCE_EXHAUSTED"""


class EngineConfigError(EngineError):
    """The model or engine cannot be loaded as configured; the message says what to change."""


class Engine(Protocol):
    def info(self) -> EngineInfo:
        """Static facts about the engine; callable before warmup."""
        ...

    def warmup(self, spec: WarmupSpec) -> WarmupResult:
        """Runs the largest prefill the router will send, then sizes the KV cache.

        Raises OutOfResourcesError when even the minimum does not fit. Called again after a
        ClearCache it re-sizes from scratch.
        """
        ...

    def prefill(self, requests: Sequence[NewRequest]) -> StepResult:
        """Adds requests to the running set and returns exactly one Generation per request, in order.

        Raises InvalidRequestError for a duplicate id or a too-short block table.

        Engines whose info() says supports_mixed_batches also take a keyword
        `decode_running: dict[int, Sequence[int]]` (block extensions, as decode's): the requests
        already running then take one decode step in the same forward, and their tokens come back
        in StepResult.decode_generations (a step carried from the last decode first). The shard
        passes it only to such engines.
        """
        ...

    def decode(self, extensions: dict[int, Sequence[int]], max_steps: int) -> StepResult:
        """Appends `extensions` to block tables, then runs up to max_steps steps over the running set.

        Generations come step-major. A request that finishes (EOS, max_new_tokens) leaves the running
        set after its last Generation. Stops early once the running set is empty.
        """
        ...

    def filter(self, remove_ids: Sequence[int]) -> int:
        """Drops requests (unknown ids are ignored) and returns how many remain running."""
        ...

    def clear(self) -> None:
        """Drops every request."""
        ...

    def healthy(self) -> bool:
        """False once the engine can no longer serve (a rank died, the device failed)."""
        ...

    def shutdown(self) -> None:
        """Releases devices and threads; called once on exit."""
        ...

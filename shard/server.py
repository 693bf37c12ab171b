"""gRPC server of one shard rank: one worker thread, one error boundary (conversions: convert.py).

Engine methods run one at a time on a single worker thread (the Engine protocol relies on it), so
the event loop stays free to answer Health while a long Prefill runs. Conversions run on that
thread too. The server listens only once the engine is built: a rank that answers is ready.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from shard import calltrace
from shard.config import ShardConfig
from shard.convert import (
    columns_to_pb,
    extensions_from_pb,
    generation_to_pb,
    info_to_pb,
    request_from_pb,
    timings_to_pb,
    warmup_spec_from_pb,
    warmup_to_pb,
)
from shard.dist import DistContext
from shard.engine.base import (
    Engine,
    EngineConfigError,
    EngineError,
    InvalidRequestError,
    OutOfResourcesError,
)
from shard.pb import generate_pb2 as pb
from shard.pb import generate_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a large prefill batch with prompt logprobs exceeds gRPC's 4 MiB
T = TypeVar("T")

# ---------------------------------------------------------------- the error boundary

_STATUS_OF_ERROR: tuple[tuple[type[EngineError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfResourcesError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_of(error: EngineError) -> grpc.StatusCode:
    for cls, code in _STATUS_OF_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_boundary(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The one place exceptions become gRPC statuses.

    Engine errors map to their codes and leave the engine usable. Anything else is a bug or a
    device failure: INTERNAL with the message, the traceback logged once, and the engine asked
    whether it can still serve (Health answers UNAVAILABLE from then on if not).
    """

    @functools.wraps(method)
    async def wrapper(self: ShardServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # context.abort() already set the status
        except EngineError as e:
            code = status_of(e)
            log.warning("%s failed: %s: %s", method.__name__, code.name, e)
            await context.abort(code, str(e))
        except Exception as e:
            log.exception("%s failed with an unexpected error", method.__name__)
            await self.check_engine_health()
            if self.world_size > 1:
                self.end_world_soon(f"{method.__name__} failed on this rank: {type(e).__name__}: {e}")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


# ---------------------------------------------------------------- the servicer


def engine_thread() -> ThreadPoolExecutor:
    """The single thread every engine call runs on. Build the engine on it too: on CPU, torch's
    OpenMP keeps one thread team per calling thread, and a team left behind by loading the model on
    the main thread halved the speed of every later step run from another thread (measured under
    mpiexec on 2 cores: 117 ms vs 46 ms per batch-1 decode step of SmolLM2-135M)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")


def _hard_exit(status: int) -> None:
    """Exit now, without waiting for the engine thread (it may be stuck); logs flushed first."""
    logging.shutdown()
    os._exit(status)


class ShardServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: Engine, urls: Sequence[str], worker: ThreadPoolExecutor | None = None) -> None:
        self._engine = engine
        self._urls = tuple(urls)
        # The thread that built the engine, when given (see engine_thread()).
        self._worker = worker or engine_thread()
        self._healthy = True  # turns False for good once the engine says it can no longer serve
        self._in_flight = 0  # engine calls submitted and not finished (event-loop thread only)
        self.world_size = 1  # ranks in the shard world (serve() sets it)
        self._exit = _hard_exit  # tests replace it

    def end_world_soon(self, why: str, delay_s: float = 1.0) -> None:
        """Exits this rank (status 1) after `delay_s`, so the failed call's status still reaches
        the router. In a world of several ranks an unexpected error can leave the others waiting
        in a collective this rank will never join (seen: a CUDA out-of-memory on rank 0 of a TP=2
        world; rank 1 waited in NCCL, and so did the router, for good). Only ending the world
        frees them: mpiexec stops every rank when one exits non-zero, and the launcher then stops
        the router, as TGI's launcher does when a shard dies."""
        log.critical("ending the shard world: %s", why)
        asyncio.get_running_loop().call_later(delay_s, self._exit, 1)

    async def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        finally:
            self._in_flight -= 1

    async def check_engine_health(self) -> None:
        def ask() -> bool:
            try:
                return bool(self._engine.healthy())
            except Exception:
                log.exception("engine.healthy() raised; treating the engine as broken")
                return False

        if self._healthy and not await self._on_worker(ask):
            self._healthy = False
            log.error("the engine reports it can no longer serve; Health now answers UNAVAILABLE")

    def close(self, shutdown_engine: bool) -> None:
        """Waits for the engine call in flight, then (optionally) shuts the engine down."""
        if shutdown_engine:
            try:
                self._worker.submit(self._engine.shutdown).result()
            except Exception:
                log.exception("engine.shutdown() failed")
        self._worker.shutdown(wait=True)

    @error_boundary
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        # Ask the engine only while its thread is idle (an engine can fail in the background, e.g.
        # TensorRT-LLM's executor); while a call runs, answer from what the last call showed.
        if self._healthy and self._in_flight == 0:
            await self.check_engine_health()
        if not self._healthy:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the engine failed and cannot serve; restart the shard"
            )
        return pb.HealthResponse()

    @error_boundary
    async def ServiceDiscovery(
        self, request: pb.ServiceDiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceDiscoveryResponse:
        return pb.ServiceDiscoveryResponse(urls=self._urls)

    @error_boundary
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._on_worker(lambda: info_to_pb(self._engine.info()))

    @error_boundary
    async def Warmup(self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext) -> pb.WarmupResponse:
        return await self._on_worker(lambda: warmup_to_pb(self._engine.warmup(warmup_spec_from_pb(request))))

    @error_boundary
    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        calltrace.mark("in", "prefill")

        def run() -> pb.PrefillResponse:
            started = time.perf_counter_ns()
            calltrace.mark("engine_start", "prefill")
            requests = [request_from_pb(r) for r in request.requests]
            if request.decode_running:
                if not self._engine.info().supports_mixed_batches:
                    raise InvalidRequestError("Prefill.decode_running: this engine does not run mixed batches")
                result = self._engine.prefill(requests, decode_running=extensions_from_pb(request.extensions))
            elif request.extensions:
                raise InvalidRequestError("Prefill.extensions need decode_running")
            else:
                result = self._engine.prefill(requests)
            calltrace.mark("engine_end", "prefill")
            resp = pb.PrefillResponse(
                generations=[generation_to_pb(g) for g in result.generations],
                timings=timings_to_pb(result, started),
                decode_tokens=columns_to_pb(result.decode_generations),
            )
            calltrace.mark("built", "prefill")
            return resp

        resp = await self._on_worker(run)
        calltrace.mark("out", "prefill")
        return resp

    @error_boundary
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        if request.max_steps < 1:
            raise InvalidRequestError("Decode.max_steps must be >= 1")

        calltrace.mark("in", "decode")

        def run() -> pb.DecodeResponse:
            started = time.perf_counter_ns()
            calltrace.mark("engine_start", "decode")
            result = self._engine.decode(extensions_from_pb(request.extensions), request.max_steps)
            calltrace.mark("engine_end", "decode")
            resp = pb.DecodeResponse(
                tokens=columns_to_pb(result.generations),
                steps=result.steps,
                timings=timings_to_pb(result, started),
            )
            calltrace.mark("built", "decode")
            return resp

        resp = await self._on_worker(run)
        calltrace.mark("out", "decode")
        return resp

    @error_boundary
    async def FilterBatch(
        self, request: pb.FilterBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.FilterBatchResponse:
        running = await self._on_worker(self._engine.filter, list(request.remove_ids))
        return pb.FilterBatchResponse(running=running)

    @error_boundary
    async def ClearCache(
        self, request: pb.ClearCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearCacheResponse:
        await self._on_worker(self._engine.clear)
        return pb.ClearCacheResponse()


# ---------------------------------------------------------------- server lifecycle


def unix_socket_path(address: str) -> str | None:
    """The file path of a unix:// (or unix:) gRPC address; None for TCP."""
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return address[len(prefix) :]
    return None


class ShardServer:
    """A started-on-demand gRPC server around one engine; removes its unix sockets when stopped."""

    def __init__(self, server: grpc.aio.Server, servicer: ShardServicer, socket_paths: Sequence[str]) -> None:
        self.grpc_server = server
        self.servicer = servicer
        self.socket_paths = tuple(socket_paths)

    async def start(self) -> None:
        await self.grpc_server.start()

    async def stop(self, grace: float | None = 5.0, *, shutdown_engine: bool = False) -> None:
        """Stops accepting calls, lets calls in flight finish for `grace` seconds, then cancels them.

        The engine call running on the worker thread is always waited for (threads cannot be
        cancelled); with shutdown_engine, engine.shutdown() runs after it on the same thread.
        """
        await self.grpc_server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.servicer.close, shutdown_engine)
        for path in self.socket_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def build_server(
    engine: Engine, addresses: Sequence[str], urls: Sequence[str], worker: ThreadPoolExecutor | None = None
) -> ShardServer:
    """Binds (not yet starts) a server for `engine` on every address (unix:///path or host:port).

    `urls` is what ServiceDiscovery answers. Call from inside the event loop that will run it.
    Unix sockets are created with mode 0600 (their parent directory is created 0700 if missing).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    servicer = ShardServicer(engine, urls, worker)
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    socket_paths = [path for path in map(unix_socket_path, addresses) if path is not None]
    for address in addresses:
        path = unix_socket_path(address)
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        # Bind under a umask so a unix socket is never reachable by others, even briefly.
        old_umask = os.umask(0o177)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc's way of saying bind() failed
            port = 0
            log.error("%s", e)
        finally:
            os.umask(old_umask)
        if port == 0:
            raise OSError(f"cannot listen on {address} (in use, or a bad address?)")
        if path is not None:
            os.chmod(path, 0o600)
    return ShardServer(server, servicer, socket_paths)


def rank_urls(config: ShardConfig, dist: DistContext) -> list[str]:
    """Every rank's URL in rank order; all ranks compute the same list."""
    hosts = dist.hostnames or (socket.gethostname(),) * dist.world_size
    return [config.rank_url(r, hosts[r]) for r in range(dist.world_size)]


async def serve(
    engine: Engine,
    *,
    config: ShardConfig,
    dist: DistContext,
    worker: ThreadPoolExecutor | None = None,
    grace: float = 5.0,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully and shuts the engine down.

    A second signal during the stop exits at once (status 1): the call in flight may be stuck in a
    collective whose peer is gone.
    """
    address = config.listen_address(dist.rank)
    try:
        server = build_server(engine, [address], rank_urls(config, dist), worker)
        server.servicer.world_size = dist.world_size
    except Exception:
        engine.shutdown()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("second %s while stopping; exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.start()
    log.info("listening on %s (rank %d/%d)", address, dist.rank, dist.world_size)
    try:
        await stop.wait()
    finally:
        await server.stop(grace, shutdown_engine=True)
        log.info("stopped")

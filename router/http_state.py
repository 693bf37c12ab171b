"""What the route modules share: the backend handle, the validator, static response fields, and
two helpers (failure metrics, cancel-on-disconnect for non-streaming requests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from router import metrics
from router.errors import RouterError, UnhealthyError
from router.validation import Params, Validator, ValidRequest

if TYPE_CHECKING:
    from router.backend import Backend
    from router.scheduler import Scheduler
    from router.tokenizer import Tokenizer
    from router.types import Limits

T = TypeVar("T")


def package_version() -> str:
    try:
        return metadata.version("tgi-trtllm")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class ClientDisconnected(RouterError):
    """The client left before the answer was ready (nobody reads this response)."""

    status_code = 499
    error_type = "client_disconnected"


@dataclass
class AppState:
    backend: Backend
    validator: Validator
    version: str
    compute_type_override: str | None  # $COMPUTE_TYPE, read once when the app is built

    @property
    def model_id(self) -> str:
        b = self.backend
        if b.config.model_id:
            return b.config.model_id
        if b.info is not None and b.info.model_id:
            return b.info.model_id
        return b.config.tokenizer_name or "unknown"

    @property
    def compute_type(self) -> str:
        if self.compute_type_override:
            return self.compute_type_override
        info = self.backend.info
        return f"{info.device_type}+{info.engine}" if info is not None else "unknown"

    @property
    def system_fingerprint(self) -> str:
        return f"{self.version}-{os.environ.get('DOCKER_LABEL') or 'native'}"

    @property
    def limits(self) -> Limits | None:
        return self.backend.limits

    def require_limits(self) -> Limits:
        limits = self.backend.limits
        if limits is None:
            raise UnhealthyError("the model is not ready yet (shards are still warming up)")
        return limits

    def tokenizer(self) -> Tokenizer:
        tok = self.backend.tokenizer
        if tok is None:
            raise UnhealthyError("the tokenizer is not loaded yet")
        return tok

    def scheduler(self) -> Scheduler:
        b = self.backend
        if not b.ready or b.scheduler is None:
            raise UnhealthyError("the model is not ready yet (shards are still warming up)")
        return b.scheduler

    async def validate(
        self,
        inputs: str,
        params: Params,
        *,
        stream: bool,
        add_special_tokens: bool = True,
        stop_token_ids: tuple[int, ...] = (),
    ) -> ValidRequest:
        info = self.backend.info
        return await self.validator.validate(
            inputs,
            params,
            tokenizer=self.backend.tokenizer,
            limits=self.backend.limits,
            prefill_logprobs_supported=info.supports_prefill_logprobs if info is not None else False,
            stream=stream,
            add_special_tokens=add_special_tokens,
            stop_token_ids=stop_token_ids,
        )


@contextlib.contextmanager
def count_failures() -> Iterator[None]:
    """tgi_request_failure{err=...} for a generation route, labelled by TGI's error_type."""
    try:
        yield
    except ClientDisconnected:
        raise
    except RouterError as e:
        metrics.REQUEST_FAILURE.labels(err=e.error_type).inc()
        raise


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it if the client disconnects first (its cleanup cancels the
    scheduler handles)."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

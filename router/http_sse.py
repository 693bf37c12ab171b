"""Server-sent events: TGI's and OpenAI's framing, and a response that stops generating as soon
as the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from router import calltrace

OPENAI_DONE = b"data: [DONE]\n\n"
# Scope key of the HTTP server's own `send` (with_raw_send): an event stream's body chunks go
# straight to it.
RAW_SEND = "tgi.raw_send"
# Events already here are written together (one multi-step Decode call's tokens), up to this many.
MAX_EVENTS_PER_WRITE = 16


class LastChunk(bytes):
    """A body iterator's final chunk: SSEResponse writes it together with the end of the response
    (chunked encoding's terminator), one write -- a syscall -- fewer per response. The iterator
    must yield nothing after it."""


# Built once: json.dumps with options builds an encoder per call (a third of its cost per event).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_string(text: str) -> str:
    """A JSON string literal exactly as dumps() writes it (non-ASCII kept)."""
    return _ENCODE_STRING(text)


_ENCODE_STRING = json.encoder.encode_basestring  # the C encoder's string escaping, ensure_ascii=False


def dumps(obj: Any) -> str:
    """Compact JSON like TGI's serde output; non-ASCII text stays readable."""
    return _ENCODER.encode(obj)


def tgi_event(obj: Any) -> bytes:
    """TGI's framing: `data:{json}` with no space, blank line after, no [DONE] at the end."""
    return f"data:{dumps(obj)}\n\n".encode()


def openai_event(obj: Any) -> bytes:
    """OpenAI's framing: `data: {json}`; the stream ends with `data: [DONE]`."""
    return f"data: {dumps(obj)}\n\n".encode()


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body generator is cancelled when the client
    disconnects (whatever the server's ASGI version) and always closed at the end, so the
    generator's `finally` cancels the scheduler handle."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.on_close = on_close  # runs after the stream, finished or not (cancels handles)
        all_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        all_headers.update(headers or {})
        super().__init__(content, headers=all_headers, media_type=self.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_iterator

        # The start goes through the middleware chain (CORS adds its headers; the error handlers
        # note that the response started, so a failure later is not answered with a 500). Body
        # chunks, one per stream per Decode call, skip it when the server's own send is known:
        # three wrappers that only look at the start cost ~5% of the router's time per token.
        body_send = scope.get(RAW_SEND, send)

        async def stream() -> None:
            try:
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                async for chunk in body:
                    last = type(chunk) is LastChunk
                    await body_send({"type": "http.response.body", "body": chunk, "more_body": not last})
                    if last:
                        return
                await body_send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away mid-send
                return

        # The stream runs in this task; one watcher task waits for the client's disconnect and
        # cancels it. Plain asyncio rather than an anyio task group: its cancel scopes (entered,
        # delivered by rescheduled callbacks, exited, each asking sniffio which loop runs) were ~7%
        # of the router's CPU at 4-token requests (py-spy, bench.router_bench).
        # Invariant: the watcher cancels this task only while it is suspended inside stream()
        # (`streaming`; the watcher runs only while this task waits), so the CancelledError is
        # raised there and handled below, never left pending for the server's code after us.
        current = asyncio.current_task()
        assert current is not None
        gone = streaming = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # the server could not tell: the stream's own send will fail
                return
            if streaming:
                gone = True
                current.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            streaming = True
            await stream()
        except asyncio.CancelledError:
            if not gone:
                raise  # cancelled from outside (server shutdown): not ours to swallow
            current.uncancel()  # the client's disconnect ends this response normally
        finally:
            streaming = False
            watcher.cancel()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


def with_raw_send(app: ASGIApp) -> ASGIApp:
    """The app as the HTTP server runs it: every HTTP scope also carries the server's own `send`
    under RAW_SEND, for SSEResponse's body chunks. Nothing else changes."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
            calltrace.mark("http", "")  # TGI_CALL_TRACE: a request reached the app
        await app(scope, receive, send)

    return asgi

"""The HTTP edge, as one pure ASGI middleware, in this order for POST requests:
1. API key: `Authorization: Bearer <key>` on the routes that generate or tokenize (401), compared
   in constant time; the key is never logged.
2. Payload limit: Content-Length, then the bytes actually received (413), so a chunked upload
   cannot slip past the header check.
3. JSON: a body that is not JSON gets TGI's status for it, 422, in the {"error", "error_type"} form.
The body is read once here and replayed to the app.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROTECTED_PATHS = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/chat_tokenize",
    }
)


def _error_body(message: str, error_type: str) -> bytes:
    return json.dumps({"error": message, "error_type": error_type}).encode()


async def send_error(send: Send, status: int, message: str, error_type: str) -> None:
    body = _error_body(message, error_type)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], api_key: str) -> bool:
    expected = api_key.encode()
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):
                return True
    return False


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, *, api_key: str, payload_limit: int, protected: frozenset[str] = PROTECTED_PATHS
    ) -> None:
        self.app = app
        self._api_key = api_key  # never logged, never part of an error message
        self.payload_limit = payload_limit
        self.protected = protected

    def __repr__(self) -> str:
        return (
            f"EdgeMiddleware(api_key={'<set>' if self._api_key else ''}, payload_limit={self.payload_limit})"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if self._api_key and scope["path"] in self.protected and not bearer_matches(headers, self._api_key):
            await send_error(
                send,
                401,
                "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                "authentication",
            )
            return
        too_large = f"Payload too large: the request body exceeds {self.payload_limit} bytes"
        for name, value in headers:
            if (
                name.lower() == b"content-length"
                and value.strip().isdigit()
                and int(value) > self.payload_limit
            ):
                await send_error(send, 413, too_large, "payload_too_large")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.payload_limit:
                await send_error(send, 413, too_large, "payload_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"] in self.protected:  # every generation/tokenize route takes JSON
            try:
                json.loads(body)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                await send_error(send, 422, f"Failed to deserialize the JSON body: {e}", "validation")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the real channel (http.disconnect)

        await self.app(scope, replay, send)

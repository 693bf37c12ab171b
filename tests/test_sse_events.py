"""The TGI stream's hand-formatted event equals the JSON encoder's output byte for byte; an event
stream's body goes to the HTTP server's own send (with_raw_send)."""

from __future__ import annotations

import json
import math

import pytest

from router.http_sse import tgi_event
from router.http_tgi import step_event, stream_json
from router.stream import OutToken, Step

TEXTS = ["", " Paris", 'say "hi"\\n', "tab\there\nnew", "日本語 🎉", "\u2028\u2029\x00\x1f", "é"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("logprob", [None, -0.0, -1.25, -1e-12, -123456.789, -math.pi])
@pytest.mark.parametrize("special", [False, True])
def test_fast_event_matches_the_encoder(text: str, logprob: float | None, special: bool) -> None:
    step = Step(7, OutToken(42, text, logprob, special), [])
    fast = step_event(step, details=True, prompt=None)
    assert fast == tgi_event(stream_json(step, details=True, prompt=None))
    body = json.loads(fast[len(b"data:") :])
    assert body["token"] == {"id": 42, "text": text, "logprob": logprob, "special": special}


def test_steps_with_top_tokens_take_the_encoder() -> None:
    step = Step(1, OutToken(1, "a", -0.5, False), [OutToken(2, "b", -1.0, False)])
    assert json.loads(step_event(step, details=False, prompt=None)[5:])["top_tokens"][0]["id"] == 2


@pytest.mark.parametrize("last_marked", [False, True])
def test_stream_body_goes_to_the_servers_send_and_only_the_start_through_the_middleware(last_marked: bool) -> None:
    """with_raw_send (how router/__main__.py serves the app): the middleware chain sees the
    response start (CORS adds its header there) and no body chunk; the server's send gets all.
    A LastChunk (what the TGI and OpenAI streams end with) goes out with the end of the response:
    one body message fewer, nothing lost."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Route

    from router.http_sse import LastChunk, SSEResponse, with_raw_send

    class Recording:  # a middleware that records what goes out through it
        def __init__(self, app, seen: list[str]) -> None:  # noqa: ANN001
            self.app, self.seen = app, seen

        async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
            async def spy(message) -> None:  # noqa: ANN001
                self.seen.append(message["type"])
                await send(message)

            await self.app(scope, receive, spy)

    async def events():  # noqa: ANN202
        for i in range(3):
            chunk = f"data:{i}\n\n".encode()
            yield LastChunk(chunk) if last_marked and i == 2 else chunk

    seen: list[str] = []
    app = Starlette(
        routes=[Route("/s", lambda request: SSEResponse(events()), methods=["GET"])],
        middleware=[Middleware(CORSMiddleware, allow_origins=["*"]), Middleware(Recording, seen=seen)],
    )
    sent: list[dict] = []

    async def server_send(message) -> None:  # noqa: ANN001
        sent.append(message)

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the client stays: no http.disconnect
        return {"type": "http.disconnect"}

    scope = {
        "type": "http", "method": "GET", "path": "/s", "raw_path": b"/s", "query_string": b"", "root_path": "",
        "headers": [(b"origin", b"https://a.example")], "scheme": "http", "server": ("t", 80), "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }  # fmt: skip
    asyncio.run(with_raw_send(app)(scope, receive, server_send))
    assert seen == ["http.response.start"]
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * (3 if last_marked else 4)
    assert (b"access-control-allow-origin", b"*") in sent[0]["headers"]
    assert b"".join(m["body"] for m in sent[1:]) == b"data:0\n\ndata:1\n\ndata:2\n\n" and not sent[-1]["more_body"]


def _sse_scope() -> dict:
    return {"type": "http", "method": "GET", "path": "/s", "raw_path": b"/s", "query_string": b"", "root_path": "",
            "headers": [], "scheme": "http", "server": ("t", 80), "http_version": "1.1", "asgi": {"version": "3.0"}}  # fmt: skip


def test_a_disconnect_mid_stream_ends_the_response_quietly() -> None:
    """The client goes away while the body waits for its next token: the body generator is
    cancelled (its finally runs: the scheduler handle's cancel in the real endpoints), on_close
    runs, the response returns normally, and the server's task carries no leftover cancellation."""
    import asyncio

    from router.http_sse import SSEResponse

    log: list[str] = []

    async def events():  # noqa: ANN202
        try:
            yield b"data:0\n\n"
            await asyncio.sleep(3600)  # the next token never comes
            yield b"data:1\n\n"
        finally:
            log.append("body closed")

    async def main() -> None:
        left = asyncio.Event()
        sent: list[dict] = []

        async def send(message) -> None:  # noqa: ANN001
            sent.append(message)
            if message["type"] == "http.response.body":
                left.set()  # the client leaves after the first event

        async def receive() -> dict:
            await left.wait()
            return {"type": "http.disconnect"}

        response = SSEResponse(events(), on_close=lambda: log.append("on_close"))
        await asyncio.wait_for(response(_sse_scope(), receive, send), 5)
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0)  # a leftover cancellation would be raised here
        assert [m.get("body") for m in sent[1:]] == [b"data:0\n\n"]

    asyncio.run(main())
    assert log == ["body closed", "on_close"]


def test_a_stream_cancelled_from_outside_stays_cancelled() -> None:
    """Server shutdown cancels the response's task: that cancellation is not swallowed as if the
    client had left, and the body is still closed."""
    import asyncio

    from router.http_sse import SSEResponse

    log: list[str] = []

    async def events():  # noqa: ANN202
        try:
            yield b"data:0\n\n"
            await asyncio.sleep(3600)
        finally:
            log.append("body closed")

    async def main() -> None:
        async def send(message) -> None:  # noqa: ANN001
            pass

        async def receive() -> dict:
            await asyncio.sleep(3600)  # the client stays
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(SSEResponse(events())(_sse_scope(), receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == ["body closed"]

"""`python -m router`: parse the config, build the app, serve it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from router import gc_policy
from router.app import create_app
from router.backend import Backend
from router.config import parse_args
from router.http_sse import with_raw_send

log = logging.getLogger("router")


def build(argv: list[str] | None = None) -> tuple[FastAPI, Backend]:
    config = parse_args(argv)
    backend = Backend(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(backend.start())

        def _on_done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                # A router that cannot start must not sit there answering 503 forever:
                # exit so the launcher (or compose) sees it and says why.
                log.error("start-up failed, exiting: %s", t.exception())
                os._exit(3)
            if not t.cancelled():
                gc_policy.tune_after_startup()  # this process only: not the tests' in-process apps

        task.add_done_callback(_on_done)
        yield
        task.cancel()
        await backend.stop()

    app = create_app(backend)
    app.router.lifespan_context = lifespan
    return app, backend


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="[router] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app, backend = build(argv)
    cfg = backend.config
    log.info("config: %r", cfg)
    # proxy_headers off: nothing here reads the client address (no access log), and rewriting it
    # from X-Forwarded-* cost ~3% of the event loop's time per request (py-spy, router_bench).
    uvicorn.run(
        with_raw_send(app), host=cfg.hostname, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()

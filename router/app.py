"""The router's FastAPI app: TGI and OpenAI routes, service routes, and the one error boundary
that turns router.errors.RouterError (and malformed requests) into TGI's
{"error": ..., "error_type": ...} bodies with their status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import metrics
from router.auth import EdgeMiddleware
from router.errors import GenerationError, RouterError
from router.http_state import AppState, package_version
from router.http_tgi import tgi_router
from router.openai_api import openai_router
from router.schemas import GenerateRequest
from router.validation import Validator

if TYPE_CHECKING:
    from router.backend import Backend

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0  # a shard that does not answer Health in time counts as unhealthy
UNHEALTHY = {"error": "unhealthy", "error_type": "healthcheck"}


def error_response(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def on_router_error(request: Request, exc: RouterError) -> JSONResponse:
        if isinstance(exc, GenerationError) or exc.status_code >= 500:
            logger.warning(
                "%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.error_type, exc
            )
        return error_response(exc.status_code, str(exc), exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REQUEST_FAILURE.labels(err="validation").inc()
        return error_response(422, _describe(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal")


def info_body(state: AppState) -> dict[str, Any]:
    b = state.backend
    cfg, info, limits = b.config, b.info, b.limits
    return {
        "model_id": state.model_id,
        "model_sha": None,
        "model_dtype": f"torch.{info.dtype}" if info is not None else None,
        "model_device_type": info.device_type if info is not None else None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": limits.max_concurrent_requests if limits else cfg.max_concurrent_requests,
        "max_best_of": limits.max_best_of if limits else cfg.max_best_of,
        "max_stop_sequences": limits.max_stop_sequences if limits else cfg.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens if limits else None,
        "max_total_tokens": limits.max_total_tokens if limits else None,
        "waiting_served_ratio": cfg.waiting_served_ratio,
        "max_batch_total_tokens": limits.max_batch_total_tokens if limits else None,
        "max_waiting_tokens": cfg.max_waiting_tokens,
        "max_batch_size": cfg.max_batch_size or (info.max_batch_size if info is not None else 0) or None,
        "validation_workers": state.validator.workers,
        "max_client_batch_size": limits.max_client_batch_size if limits else cfg.max_client_batch_size,
        "router": "tgi-trtllm-router",
        "version": state.version,
        "sha": None,
        "docker_label": os.environ.get("DOCKER_LABEL") or None,
    }


def install_service_routes(app: FastAPI, state: AppState) -> None:
    async def health() -> Response:
        backend = state.backend
        if not backend.ready:
            return JSONResponse(UNHEALTHY, status_code=503)
        try:
            ok = await asyncio.wait_for(backend.healthy(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # a failing health probe is an answer: unhealthy
            logger.warning("health check failed: %s", e)
            ok = False
        return Response(status_code=200) if ok else JSONResponse(UNHEALTHY, status_code=503)

    tag = ["Service"]
    app.add_api_route(
        "/health", health, methods=["GET"], tags=tag, summary="Readiness: 200 once warmed up and healthy"
    )
    app.add_api_route("/ping", health, methods=["GET"], tags=tag, summary="Alias of /health")
    app.add_api_route("/", health, methods=["GET"], tags=tag, summary="Alias of /health (TGI)")

    @app.get("/live", tags=tag, summary="Liveness: 200 while the process runs")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/info", tags=tag, summary="Served model and router limits (TGI's fields)")
    async def info() -> dict[str, Any]:
        return info_body(state)

    @app.get("/metrics", tags=tag, summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize", tags=["Text Generation Inference"], summary="Tokenize inputs")
    async def tokenize(body: GenerateRequest) -> list[dict[str, Any]]:
        tok = state.tokenizer()
        tokens = await state.validator.run(
            tok.encode_with_offsets, body.inputs, add_special_tokens=body.add_special_tokens is not False
        )
        return [{"id": i, "text": body.inputs[s:e], "start": s, "stop": e} for i, s, e in tokens]


def create_app(backend: Backend) -> FastAPI:
    """The HTTP app over one Backend (router/backend.py). Routes answer 503 until the backend
    is ready; /live and /metrics answer from the start."""
    validator = Validator(
        workers=backend.config.validation_workers or min(4, os.cpu_count() or 1), arrivals=backend.arrivals
    )
    state = AppState(
        backend=backend,
        validator=validator,
        version=package_version(),
        compute_type_override=os.environ.get("COMPUTE_TYPE"),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        validator.close()

    app = FastAPI(
        title="tgi-trtllm",
        version=state.version,
        description="Text Generation Inference compatible API (TGI and OpenAI routes)",
        lifespan=lifespan,
    )
    app.state.router_state = state
    install_error_handlers(app)
    install_service_routes(app, state)
    app.include_router(tgi_router(state))
    app.include_router(openai_router(state))
    app.add_middleware(
        EdgeMiddleware, api_key=backend.config.api_key, payload_limit=backend.config.payload_limit
    )
    origins = [o.strip() for o in backend.config.cors_allow_origin.split(",") if o.strip()] or ["*"]
    app.add_middleware(
        CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"]
    )
    return app

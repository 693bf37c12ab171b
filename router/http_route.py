"""A leaner request handler for the JSON-body routes (generation, chat): one pydantic call from
the raw body to the request model, instead of FastAPI's generic path (content-type parsing with
the email package, json.loads, dependency solving, validation through a TypeAdapter).

Only success takes the short path. Whenever the short path cannot decide -- another content type,
a body pydantic's JSON parser rejects, a model it finds invalid -- FastAPI's own handler runs on
the same (cached) body, so every error keeps the status and message it had.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Endpoint = Callable[..., Coroutine[Any, Any, Response]]

# The short path takes this exact content type (what clients send); FastAPI's handler takes the
# rest (with parameters, other +json types, none at all).
JSON_CONTENT_TYPE = "application/json"


class JsonBodyRoute(APIRoute):
    """An APIRoute (same OpenAPI schema, same errors) whose endpoint, when it is
    `async def f(<body>: SomeModel, request: Request) -> Response` with nothing else to inject,
    gets its model straight from `SomeModel.model_validate_json(body)`. Other endpoints of the
    router keep FastAPI's handler. Invariant: the router's routes have no dependencies, neither
    their own nor from include_router (the short path would skip them)."""

    def get_route_handler(self) -> Handler:
        generic = super().get_route_handler()
        shape = _body_and_request(self)
        if shape is None:
            return generic
        model, body_name, request_name = shape
        endpoint: Endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            if request.headers.get("content-type") != JSON_CONTENT_TYPE:
                return await generic(request)
            try:
                body = model.model_validate_json(await request.body())
            except Exception:  # pydantic's ValidationError, or a body that cannot be read
                # FastAPI's handler gives the answer it always gave (422 RequestValidationError,
                # 400 for an unreadable body).
                return await generic(request)
            return await endpoint(**{body_name: body, request_name: request})

        return handler


def _body_and_request(route: APIRoute) -> tuple[type[BaseModel], str, str] | None:
    """(model, body parameter, request parameter) when the endpoint is async and takes exactly a
    pydantic model as its JSON body and the Request, else None."""
    d = route.dependant
    if (
        len(d.body_params) != 1
        or d.request_param_name is None
        or d.query_params
        or d.path_params
        or d.header_params
        or d.cookie_params
        or d.dependencies
        or d.background_tasks_param_name
        or d.response_param_name
        or d.http_connection_param_name
        or d.security_scopes_param_name
        or route.dependencies
        or route.response_model is not None
        or not inspect.iscoroutinefunction(route.endpoint)
    ):
        return None
    field = d.body_params[0]
    model = field.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or getattr(
        field.field_info, "embed", False
    ):
        return None  # an embedded body is {"<name>": {...}}: FastAPI's handler knows how
    return model, field.name, d.request_param_name

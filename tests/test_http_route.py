"""router.http_route.JsonBodyRoute answers exactly as FastAPI's own handler does -- same status,
same body, same OpenAPI schema -- and takes its short path for a plain JSON body."""

from __future__ import annotations

import json

import fastapi.routing
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel

from router.app import install_error_handlers
from router.auth import EdgeMiddleware
from router.http_route import JsonBodyRoute
from router.schemas import ChatRequest, CompletionRequest, GenerateRequest

MODELS: dict[str, type[BaseModel]] = {
    "/generate": GenerateRequest,
    "/v1/chat/completions": ChatRequest,
    "/v1/completions": CompletionRequest,
}


def echo(model: type[BaseModel]):  # noqa: ANN201 -- an endpoint of the route's shape
    async def endpoint(body, request):  # noqa: ANN001, ANN202
        # ascii(): exact values (types, -0.0, big ints, lone surrogates) in a body that always encodes.
        return PlainTextResponse(ascii((type(body).__name__, body.model_dump(), request.url.path)))

    # Real annotations (this module's are strings, which FastAPI would look up at module level).
    endpoint.__annotations__ = {"body": model, "request": Request, "return": Response}
    return endpoint


def make_app(route_class: type[APIRoute]) -> FastAPI:
    """The router's edge (EdgeMiddleware, error handlers) over echo routes of the request models."""
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(route_class=route_class)
    for path, model in MODELS.items():
        router.add_api_route(path, echo(model), methods=["POST"])

    @router.get("/v1/models")
    async def models() -> dict[str, str]:  # no body: FastAPI's handler, whatever the route class
        return {"object": "list"}

    app.include_router(router)
    app.add_middleware(EdgeMiddleware, api_key="", payload_limit=1 << 20)
    return app


@pytest.fixture(scope="module")
def apps():
    """(lean, generic) clients and how many requests FastAPI's own handler served in each app."""
    calls: dict[str, int] = {"lean": 0, "generic": 0}
    names: dict[int, str] = {}
    original = fastapi.routing.get_request_handler

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        handler = original(*args, **kwargs)

        async def counted(request):  # noqa: ANN001, ANN202
            calls[names[id(request.app)]] += 1
            return await handler(request)

        return counted

    patch = pytest.MonkeyPatch()
    patch.setattr(fastapi.routing, "get_request_handler", counting)
    try:
        lean, generic = make_app(JsonBodyRoute), make_app(APIRoute)
        names.update({id(lean): "lean", id(generic): "generic"})
        with TestClient(lean) as a, TestClient(generic) as b:
            yield a, b, calls
    finally:
        patch.undo()


GOOD = [
    ("/generate", {"inputs": "Hello"}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 4, "details": True, "stop": ["a", "b"]}}),
    ("/generate", {"inputs": "x", "parameters": {"seed": 18446744073709551616, "temperature": -0.0}}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "4", "do_sample": "yes", "top_p": "0.5"}}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 4.0, "best_of": True}}),
    (
        "/generate",
        {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"a": [1, 2.5, None]}}}},
    ),
    ("/generate", {"inputs": "😀 \u2028 \x00", "parameters": None, "stream": None, "unknown": [1]}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "stop": "x", "logit_bias": {}},
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2, "stream_options": None}),
]

GOOD_RAW = {json.dumps(b).encode() for _, b in GOOD}

RAW_BODIES = [
    b'{"inputs":"a","inputs":"b"}',  # duplicate keys
    b'{"inputs":"\\ud83d\\ude00 \\u00e9"}',
    b'{"inputs":"\\ud800x"}',  # a lone surrogate: json.loads keeps it, pydantic's parser refuses
    b'{"inputs":"a","parameters":{"temperature":NaN}}',
    b'{"inputs":"a","parameters":{"temperature":1e400}}',
    b'{"inputs":"a","parameters":{"max_new_tokens":1e20}}',
    b'{"inputs":"a","parameters":{"seed":1.5}}',
    b'{"inputs":1}',
    b'{"inputs":"a","parameters":{"stop":"x"}}',
    b'\xef\xbb\xbf{"inputs":"a"}',  # UTF-8 BOM
    '{"inputs":"a"}'.encode("utf-16"),
    b'{"inputs":"a"} ',
    b"[]",
    b"null",
    b"{}",
    b"",
    b"{not json",
    b'{"inputs": "a"',
    b"\xff\xfe",
]

CONTENT_TYPES = [
    "application/json",
    None,
    "text/plain",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/vnd.api+json",
]


def answer(client: TestClient, path: str, raw: bytes, content_type: str | None) -> tuple[int, str, bytes]:
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(path, content=raw, headers=headers)
    return r.status_code, r.headers.get("content-type", ""), r.content


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize(
    ("path", "raw"),
    [(p, json.dumps(b).encode()) for p, b in GOOD] + [("/generate", raw) for raw in RAW_BODIES],
)
def test_the_answer_is_fastapis_answer(apps, path, raw, content_type):
    lean, generic, _ = apps
    expected = answer(generic, path, raw, content_type)
    assert answer(lean, path, raw, content_type) == expected
    if content_type == "application/json" and raw in GOOD_RAW:
        assert expected[0] == 200, expected  # the comparison covers successes, not only errors


@pytest.mark.parametrize(("path", "body"), GOOD)
def test_a_plain_json_body_takes_the_short_path(apps, path, body):
    lean, generic, calls = apps
    before = dict(calls)
    r = lean.post(path, json=body)
    assert r.status_code == 200, r.text
    assert calls["lean"] == before["lean"]  # FastAPI's handler did not run
    assert generic.post(path, json=body).content == r.content
    assert calls["generic"] == before["generic"] + 1


def test_other_requests_take_fastapis_handler(apps):
    lean, _, calls = apps
    before = calls["lean"]
    assert lean.post("/generate", json={"inputs": 1}).status_code == 422
    assert (
        lean.post("/generate", content=b'{"inputs":"a"}', headers={"content-type": "text/plain"}).status_code
        == 422
    )
    assert lean.get("/v1/models").json() == {"object": "list"}
    assert calls["lean"] == before + 3


def test_the_openapi_schema_is_unchanged():
    assert make_app(JsonBodyRoute).openapi() == make_app(APIRoute).openapi()

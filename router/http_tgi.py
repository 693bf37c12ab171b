"""TGI's generation routes: POST /, /generate, /generate_stream (response shapes of TGI's lib.rs).

Deliberate differences from TGI: stop strings are cut from the output (TGI keeps them), and a
special token's `text` in a stream is "" (see router/stream.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from router import metrics
from router.errors import RouterError
from router.http_route import JsonBodyRoute
from router.http_sse import MAX_EVENTS_PER_WRITE, LastChunk, SSEResponse, json_string, tgi_event
from router.http_state import AppState, count_failures, unless_disconnected
from router.schemas import GenerateParameters, GenerateRequest
from router.stream import (
    Generation,
    Outcome,
    OutToken,
    Step,
    gather_all,
    record_success,
    run_to_end,
    submit_many,
)
from router.validation import Params, ValidRequest, random_seed

logger = logging.getLogger(__name__)


def params_from_tgi(p: GenerateParameters | None) -> Params:
    p = p or GenerateParameters()
    return Params(
        best_of=p.best_of,
        temperature=p.temperature,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        do_sample=bool(p.do_sample),
        max_new_tokens=p.max_new_tokens,
        stop=tuple(p.stop or ()),
        truncate=p.truncate,
        seed=p.seed,
        top_n_tokens=p.top_n_tokens,
        decoder_input_details=bool(p.decoder_input_details),
        ignore_eos_token=bool(p.ignore_eos_token),
        watermark=bool(p.watermark),
        grammar=p.grammar is not None,
        adapter_id=p.adapter_id,
    )


def token_json(t: OutToken) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def _sequence_json(o: Outcome) -> dict[str, Any]:
    d: dict[str, Any] = {
        "finish_reason": o.finish_reason.value,
        "generated_tokens": o.generated_tokens,
        "seed": o.seed,
        "prefill": [{"id": p.id, "text": p.text, "logprob": p.logprob} for p in o.prefill],
        "tokens": [token_json(t) for t in o.tokens],
    }
    if any(o.top_tokens):
        d["top_tokens"] = [[token_json(t) for t in top] for top in o.top_tokens]
    return d


def _text(o: Outcome, prompt: str | None) -> str:
    return (prompt or "") + o.generated_text


def generate_json(
    best: Outcome, others: list[Outcome], *, details: bool, prompt: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"generated_text": _text(best, prompt)}
    if details:
        d = _sequence_json(best)
        if others:
            d["best_of_sequences"] = [
                {"generated_text": _text(o, prompt), **_sequence_json(o)} for o in others
            ]
        body["details"] = d
    return body


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))  # TGI reports whole milliseconds


def generate_headers(
    state: AppState, best: Outcome, others: list[Outcome], *, started_at: float, inputs: str
) -> dict[str, str]:
    tm = record_success(best, started_at)
    for o in others:
        record_success(o, started_at)
    return {
        "x-compute-type": state.compute_type,
        "x-compute-time": f"{tm.total:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": _ms(tm.total),
        "x-validation-time": _ms(tm.validation),
        "x-queue-time": _ms(tm.queue),
        "x-inference-time": _ms(tm.inference),
        "x-time-per-token": _ms(tm.per_token),
        "x-prompt-tokens": str(best.input_length),
        "x-generated-tokens": str(best.generated_tokens),
    }


async def generate_outcomes(state: AppState, valid: ValidRequest) -> tuple[Outcome, list[Outcome]]:
    """Run one request, or best_of candidates (each with its own seed) and pick the one with the
    highest mean token logprob, as TGI does; the others become best_of_sequences."""
    valids = [valid] if valid.best_of == 1 else [valid.with_seed(random_seed()) for _ in range(valid.best_of)]
    gens = submit_many(state.scheduler(), valids, state.tokenizer())
    outcomes = await gather_all([run_to_end(g) for g in gens])
    best = max(range(len(outcomes)), key=lambda i: outcomes[i].mean_logprob)
    return outcomes[best], [o for i, o in enumerate(outcomes) if i != best]


async def tgi_stream(
    gen: Generation, *, details: bool, prompt: str | None, started_at: float
) -> AsyncIterator[bytes]:
    """TGI's event stream; an error after the response started becomes an error event. Events of
    tokens that arrived together (one multi-step Decode call) go out in one write: each write
    crosses the ASGI middleware and the HTTP protocol, the router's largest cost per token. A
    backlog is still written every MAX_EVENTS_PER_WRITE events."""
    events: list[bytes] = []
    try:
        async with contextlib.aclosing(gen.steps()) as steps:
            async for step in steps:
                if step.outcome is not None:
                    record_success(step.outcome, started_at)
                events.append(step_event(step, details=details, prompt=prompt))
                if step.outcome is not None:
                    break  # the last step: written below with the end of the response
                if not gen.more_ready or len(events) >= MAX_EVENTS_PER_WRITE:
                    yield b"".join(events)
                    events.clear()
    except RouterError as e:
        metrics.REQUEST_FAILURE.labels(err=e.error_type).inc()
        logger.warning("generation failed mid-stream: %s", e)
        events.append(tgi_event({"error": str(e), "error_type": e.error_type}))
    if events:
        yield LastChunk(b"".join(events))


def step_event(step: Step, *, details: bool, prompt: str | None) -> bytes:
    """One TGI stream event. The common case -- a token that is not the last, without top tokens
    -- is formatted directly (byte for byte what tgi_event(stream_json(...)) gives, tested): the
    router spends a tenth of its time per token in the JSON encoder otherwise."""
    t = step.token
    if step.outcome is not None or step.top_tokens:
        return tgi_event(stream_json(step, details=details, prompt=prompt))
    lp = "null" if t.logprob is None else repr(t.logprob)
    return (
        f'data:{{"index":{step.index},"token":{{"id":{t.id},"text":{json_string(t.text)},"logprob":{lp},'
        f'"special":{"true" if t.special else "false"}}},"top_tokens":[],"generated_text":null,"details":null}}\n\n'
    ).encode()


def stream_json(step: Step, *, details: bool, prompt: str | None) -> dict[str, Any]:
    o = step.outcome
    body: dict[str, Any] = {
        "index": step.index,
        "token": token_json(step.token),
        "top_tokens": [token_json(t) for t in step.top_tokens],
        "generated_text": None,
        "details": None,
    }
    if o is not None:
        body["generated_text"] = _text(o, prompt)
        if details:
            body["details"] = {
                "finish_reason": o.finish_reason.value,
                "generated_tokens": o.generated_tokens,
                "seed": o.seed,
                "input_length": o.input_length,
            }
    return body


async def handle_generate(
    state: AppState, body: GenerateRequest, request: Request, *, stream: bool, compat: bool
) -> Response:
    started_at = time.monotonic()
    metrics.REQUEST_COUNT.inc()
    p = body.parameters or GenerateParameters()
    # POST / defaults return_full_text to true (TGI: text-generation pipeline tag or unknown).
    full_text = p.return_full_text if p.return_full_text is not None else compat
    prompt = body.inputs if full_text else None
    with count_failures():
        valid = await state.validate(
            body.inputs,
            params_from_tgi(p),
            stream=stream,
            add_special_tokens=body.add_special_tokens is not False,
        )
        logger.debug(
            "request: %d input tokens, max_new_tokens %d", valid.input_length, valid.request.max_new_tokens
        )
        if stream:
            # Submitted before the response starts: 429/503 are still HTTP statuses.
            gen = submit_many(state.scheduler(), [valid], state.tokenizer())[0]
            headers = {"x-compute-type": state.compute_type, "x-compute-characters": str(len(body.inputs))}
            events = tgi_stream(gen, details=bool(p.details), prompt=prompt, started_at=started_at)
            return SSEResponse(events, headers=headers, on_close=gen.close)
        best, others = await unless_disconnected(request, generate_outcomes(state, valid))
    details = bool(p.details or p.decoder_input_details)
    content = generate_json(best, others, details=details, prompt=prompt)
    headers = generate_headers(state, best, others, started_at=started_at, inputs=body.inputs)
    return JSONResponse([content] if compat else content, headers=headers)


def tgi_router(state: AppState) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"], route_class=JsonBodyRoute)

    @router.post("/", summary="Generate (stream: true for SSE); returns a list, as TGI")
    async def compat_generate(body: GenerateRequest, request: Request) -> Response:
        return await handle_generate(state, body, request, stream=bool(body.stream), compat=True)

    @router.post("/generate", summary="Generate text")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await handle_generate(state, body, request, stream=False, compat=False)

    @router.post("/generate_stream", summary="Generate a stream of tokens (server-sent events)")
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        return await handle_generate(state, body, request, stream=True, compat=False)

    return router

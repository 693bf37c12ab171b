"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, plus TGI's
/chat_tokenize (which shares the chat templating). n > 1 runs n generations of the same prompt;
streams interleave their chunks by choice index and end with `data: [DONE]`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from router import http_openai_format as fmt
from router import metrics
from router.errors import RouterError, ValidationError
from router.http_route import JsonBodyRoute
from router.http_sse import MAX_EVENTS_PER_WRITE, OPENAI_DONE, LastChunk, SSEResponse, openai_event
from router.http_state import AppState, count_failures, unless_disconnected
from router.schemas import ChatRequest, CompletionRequest
from router.stream import (
    Generation,
    OutToken,
    Step,
    gather_all,
    merge_steps,
    record_success,
    run_to_end,
    submit_many,
)
from router.tokenizer import ChatTemplateMissing
from router.validation import Params, TemplateError, ValidRequest

logger = logging.getLogger(__name__)


async def render_chat(state: AppState, req: ChatRequest) -> str:
    messages = fmt.template_messages(req.messages)
    tools = fmt.chat_tools(req)
    tok = state.tokenizer()
    try:
        return await state.validator.run(
            tok.apply_chat_template, messages, tools=tools, add_generation_prompt=True
        )
    except ChatTemplateMissing as e:
        raise TemplateError(f"Template error: {e}") from e
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        raise TemplateError(f"Template error: {e}") from e


@dataclass
class Batch:
    """The generations behind one OpenAI request: prompts x n, in choice order."""

    gens: list[Generation]
    prompt_tokens: int  # each prompt counted once, however many choices it has
    prompts: list[str]  # per choice (echo)


async def start_batch(
    state: AppState, prompts: list[str], p: Params, *, n: int, stream: bool, chat: bool
) -> Batch:
    tok = state.tokenizer()
    stop_ids = tuple(i for i in tok.end_of_turn_ids if i not in tok.eos_token_ids) if chat else ()
    valids: list[ValidRequest] = []
    choice_prompts: list[str] = []
    prompt_tokens = 0
    for prompt in prompts:
        v = await state.validate(
            prompt, p, stream=stream, add_special_tokens=not chat, stop_token_ids=stop_ids
        )
        prompt_tokens += v.input_length
        for j in range(n):
            # Distinct seeds per choice; a given seed stays reproducible (seed + j).
            valids.append(v if j == 0 else v.with_seed((v.request.sampling.seed + j) % 2**64))
            choice_prompts.append(prompt)
    gens = submit_many(state.scheduler(), valids, tok)
    return Batch(gens=gens, prompt_tokens=prompt_tokens, prompts=choice_prompts)


def _literal(
    state: AppState, tokens: list[tuple[OutToken, list[OutToken]]]
) -> list[tuple[str, OutToken, list[tuple[str, OutToken]]]]:
    tok = state.tokenizer()
    return [(tok.token_text(t.id), t, [(tok.token_text(a.id), a) for a in top]) for t, top in tokens]


class OpenAIResponder:
    """Shapes one request's outcomes or steps as chat or completion objects."""

    def __init__(self, state: AppState, *, chat: bool, logprobs: bool, echo: bool = False) -> None:
        self.state, self.chat, self.logprobs, self.echo = state, chat, logprobs, echo
        self.id = fmt.new_id("chatcmpl" if chat else "cmpl")
        self.created = fmt.now()
        self.text_offsets: dict[int, int] = {}

    def envelope(self, *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return fmt.envelope(
            kind,
            id_=self.id,
            created=self.created,
            model=self.state.model_id,
            fingerprint=self.state.system_fingerprint,
        )

    def _logprobs(self, tokens: list[tuple[OutToken, list[OutToken]]], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        lit = _literal(self.state, tokens)
        return fmt.chat_logprobs(lit) if self.chat else fmt.completion_logprobs(lit, offset)

    def full(self, batch: Batch, outcomes: list) -> dict[str, Any]:
        choices = []
        for i, o in enumerate(outcomes):
            prefix = batch.prompts[i] if self.echo else ""
            lp = self._logprobs(list(zip(o.tokens, o.top_tokens, strict=True)), len(prefix))
            reason = fmt.finish_reason(o.finish_reason)
            if self.chat:
                message = {"role": "assistant", "content": o.generated_text, "tool_calls": None}
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                choices.append(
                    {"index": i, "text": prefix + o.generated_text, "logprobs": lp, "finish_reason": reason}
                )
        return {
            **self.envelope(chunk=False),
            "choices": choices,
            "usage": fmt.usage(batch.prompt_tokens, outcomes),
        }

    def chunk(self, index: int, text: str, *, step: Step | None, finish: str | None) -> dict[str, Any]:
        offset = self.text_offsets.get(index, 0)
        self.text_offsets[index] = offset + len(text)
        lp = self._logprobs([(step.token, step.top_tokens)], offset) if step is not None else None
        if self.chat:
            choice = {"index": index, "delta": fmt.chat_delta(text), "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return {**self.envelope(chunk=True), "choices": [choice], "usage": None}

    async def stream(self, batch: Batch, *, include_usage: bool, started_at: float) -> AsyncIterator[bytes]:
        outcomes: list = [None] * len(batch.gens)
        events: list[bytes] = []  # chunks of tokens that arrived together: one write (see tgi_stream)
        try:
            if self.echo:
                for i, prompt in enumerate(batch.prompts):
                    yield openai_event(self.chunk(i, prompt, step=None, finish=None))
            async for i, step in merge_steps(batch.gens):
                finish = None
                if step.outcome is not None:
                    outcomes[i] = step.outcome
                    record_success(step.outcome, started_at)
                    finish = fmt.finish_reason(step.outcome.finish_reason)
                events.append(openai_event(self.chunk(i, step.token.text, step=step, finish=finish)))
                if all(o is not None for o in outcomes):
                    continue  # the last step: written below with [DONE] and the end of the response
                if len(events) >= MAX_EVENTS_PER_WRITE or not any(g.more_ready for g in batch.gens):
                    yield b"".join(events)
                    events.clear()
            if include_usage:
                body = {
                    **self.envelope(chunk=True),
                    "choices": [],
                    "usage": fmt.usage(batch.prompt_tokens, outcomes),
                }
                events.append(openai_event(body))
        except RouterError as e:
            metrics.REQUEST_FAILURE.labels(err=e.error_type).inc()
            logger.warning("generation failed mid-stream: %s", e)
            events.append(openai_event({"error": str(e), "error_type": e.error_type}))
        yield LastChunk(b"".join(events) + OPENAI_DONE)


def _close_all(batch: Batch) -> None:
    for g in batch.gens:
        g.close()


async def respond(
    state: AppState,
    request: Request,
    batch: Batch,
    responder: OpenAIResponder,
    *,
    stream: bool,
    include_usage: bool,
    started_at: float,
) -> Response:
    headers = {"x-compute-type": state.compute_type}
    if stream:
        events = responder.stream(batch, include_usage=include_usage, started_at=started_at)
        return SSEResponse(events, headers=headers, on_close=lambda: _close_all(batch))
    try:
        outcomes = await unless_disconnected(request, gather_all([run_to_end(g) for g in batch.gens]))
    finally:
        _close_all(batch)
    for o in outcomes:
        record_success(o, started_at)
    headers["x-prompt-tokens"] = str(batch.prompt_tokens)
    headers["x-generated-tokens"] = str(sum(o.generated_tokens for o in outcomes))
    return JSONResponse(responder.full(batch, outcomes), headers=headers)


def openai_router(state: AppState) -> APIRouter:
    router = APIRouter(tags=["OpenAI compatible"], route_class=JsonBodyRoute)

    @router.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        started_at = time.monotonic()
        metrics.REQUEST_COUNT.inc()
        with count_failures():
            params = fmt.chat_params(body)
            n = fmt.check_n(body.n, state.require_limits().max_client_batch_size)
            prompt = await render_chat(state, body)
            batch = await start_batch(state, [prompt], params, n=n, stream=bool(body.stream), chat=True)
            responder = OpenAIResponder(state, chat=True, logprobs=bool(body.logprobs))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await respond(
                state,
                request,
                batch,
                responder,
                stream=bool(body.stream),
                include_usage=include_usage,
                started_at=started_at,
            )

    @router.post("/v1/completions", summary="Text completion (OpenAI legacy)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        started_at = time.monotonic()
        metrics.REQUEST_COUNT.inc()
        with count_failures():
            params = fmt.completion_params(body)
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            max_batch = state.require_limits().max_client_batch_size
            if not prompts:
                raise ValidationError("`prompt` cannot be empty")
            if len(prompts) > max_batch:
                raise ValidationError(
                    f"Number of prompts exceeds the maximum allowed batch size of {max_batch}"
                )
            n = fmt.check_n(body.n, max_batch)
            batch = await start_batch(state, prompts, params, n=n, stream=bool(body.stream), chat=False)
            responder = OpenAIResponder(
                state, chat=False, logprobs=body.logprobs is not None, echo=bool(body.echo)
            )
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await respond(
                state,
                request,
                batch,
                responder,
                stream=bool(body.stream),
                include_usage=include_usage,
                started_at=started_at,
            )

    @router.get("/v1/models", summary="The served model (OpenAI)")
    async def models() -> dict[str, Any]:
        mid = state.model_id
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": 0, "owned_by": mid}]}

    @router.post("/chat_tokenize", tags=["Text Generation Inference"], summary="Template and tokenize a chat")
    async def chat_tokenize(body: ChatRequest) -> JSONResponse:
        text = await render_chat(state, body)
        tokens = await state.validator.run(
            state.tokenizer().encode_with_offsets, text, add_special_tokens=False
        )
        return JSONResponse(
            {
                "tokenize_response": [
                    {"id": i, "text": text[s:e], "start": s, "stop": e} for i, s, e in tokens
                ],
                "templated_text": text,
            }
        )

    return router

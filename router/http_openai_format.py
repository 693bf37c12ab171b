"""OpenAI request mapping and response shapes (chat and legacy completions).

Mapping rules (TGI's where it has one): temperature 0 = greedy, unset = sampling at 1.0;
top_p >= 1 = off; max_completion_tokens wins over max_tokens; top_logprobs -> top_n_tokens.
What the engine cannot honour is refused with a 422 naming the field, never dropped:
presence_penalty != 0, a non-empty logit_bias, response_format other than text, tool_choice that
forces a tool call, non-text content parts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from router.errors import ValidationError
from router.schemas import ChatMessage, ChatRequest, CompletionRequest
from router.stream import Outcome, OutToken
from router.types import FinishReason
from router.validation import Params

ROLES = ("system", "developer", "user", "assistant", "tool")
UNLIKELY_LOGPROB = -9999.0  # OpenAI's stand-in for a logprob too small to represent
COMPLETIONS_DEFAULT_MAX_TOKENS = 100  # TGI's default for /v1/completions


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _content_text(i: int, m: ChatMessage) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValidationError(
                f"messages[{i}].content[{j}]: only text content parts are supported (got type {kind!r})"
            )
        parts.append(part["text"])
    return "".join(parts)  # TGI joins text chunks without a separator


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Validated messages as the chat template expects them."""
    if not messages:
        raise ValidationError("`messages` cannot be empty")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValidationError(
                f"messages[{i}]: unknown role {m.role!r}; expected one of {', '.join(ROLES)}"
            )
        content = _content_text(i, m)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise ValidationError(f"messages[{i}]: `content` is required for role {m.role!r}")
        d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    """Tools for the template, after refusing what would need constrained decoding."""
    choice = req.tool_choice
    if choice is not None and choice not in ("none", "auto"):
        raise ValidationError(
            "`tool_choice` that forces a tool call is not supported (this server has no grammar-constrained "
            'decoding); use "auto" or "none"'
        )
    if choice == "none":
        return None
    return req.tools or None


def _check_unsupported(
    *, presence_penalty: float | None, logit_bias: Any, response_format: dict | None
) -> None:
    if presence_penalty:
        raise ValidationError(
            "`presence_penalty` is not supported by this server; use `frequency_penalty` or `repetition_penalty`"
        )
    if logit_bias:
        raise ValidationError("`logit_bias` is not supported by this server")
    if response_format is not None and response_format.get("type") != "text":
        raise ValidationError(
            "`response_format` is not supported (this server has no grammar-constrained decoding); "
            'only {"type": "text"} is accepted'
        )


def _sampling(temperature: float | None, top_p: float | None) -> dict[str, Any]:
    if temperature == 0.0:
        return {"do_sample": False, "temperature": None, "top_p": None}
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_p": None if top_p is not None and top_p >= 1.0 else top_p,
    }


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def check_n(n: int | None, max_n: int) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise ValidationError(f"`n` must be >= 1 and <= {max_n}. Given: {n}")
    return n


def chat_params(req: ChatRequest) -> Params:
    _check_unsupported(
        presence_penalty=req.presence_penalty, logit_bias=req.logit_bias, response_format=req.response_format
    )
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return Params(
        **_sampling(req.temperature, req.top_p),
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        max_new_tokens=max_tokens,
        stop=_stop(req.stop),
        seed=req.seed,
        top_n_tokens=req.top_logprobs if req.logprobs else None,
    )


def completion_params(req: CompletionRequest) -> Params:
    if req.suffix is not None:
        raise ValidationError("Suffix is not supported and can be achieved by preprocessing the prompt.")
    if req.best_of is not None and req.best_of != 1:
        raise ValidationError("`best_of` is not supported on /v1/completions; use TGI's /generate")
    _check_unsupported(presence_penalty=req.presence_penalty, logit_bias=req.logit_bias, response_format=None)
    return Params(
        **_sampling(req.temperature, req.top_p),
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        max_new_tokens=req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS,
        stop=_stop(req.stop),
        seed=req.seed,
        top_n_tokens=req.logprobs,
    )


def _lp(x: float | None) -> float:
    return UNLIKELY_LOGPROB if x is None else x


def chat_logprobs(tokens: list[tuple[str, OutToken, list[tuple[str, OutToken]]]]) -> dict[str, Any]:
    """tokens: (literal text, token, [(literal text, alternative)]) per generated token."""
    return {
        "content": [
            {
                "token": text,
                "logprob": _lp(tok.logprob),
                "bytes": None,
                "top_logprobs": [{"token": t, "logprob": _lp(alt.logprob), "bytes": None} for t, alt in top],
            }
            for text, tok, top in tokens
        ]
    }


def completion_logprobs(
    tokens: list[tuple[str, OutToken, list[tuple[str, OutToken]]]], text_offset: int
) -> dict[str, Any]:
    """The legacy completions format; text_offset: where the first token's text starts."""
    offsets, pos = [], text_offset
    for _, tok, _ in tokens:
        offsets.append(pos)
        pos += len(tok.text)
    return {
        "tokens": [text for text, _, _ in tokens],
        "token_logprobs": [_lp(tok.logprob) for _, tok, _ in tokens],
        "top_logprobs": [{t: _lp(alt.logprob) for t, alt in top} for _, _, top in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, outcomes: list[Outcome]) -> dict[str, int]:
    completion = sum(o.generated_tokens for o in outcomes)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def envelope(kind: str, *, id_: str, created: int, model: str, fingerprint: str) -> dict[str, Any]:
    return {"id": id_, "object": kind, "created": created, "model": model, "system_fingerprint": fingerprint}


def chat_delta(text: str) -> dict[str, Any]:
    # text-generation 0.7.0's ChoiceDelta requires `role` and a (nullable) `tool_calls`.
    return {"role": "assistant", "content": text, "tool_calls": None}

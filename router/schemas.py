"""Request bodies at the HTTP edge (pydantic; nowhere else in the router).

Field names, types and defaults follow TGI's router (lib.rs) and OpenAI's API. Unknown fields are
ignored as TGI ignores them; fields we know but cannot honour are accepted here and rejected with
a clear 422 in validation (watermark, grammar, response_format, ...), never silently dropped.
Every field is nullable because clients send explicit nulls for what they leave unset.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)


class GenerateParameters(BaseModel):
    model_config = _CONFIG

    best_of: int | None = Field(
        None, description="Generate best_of sequences, return the most likely", examples=[1]
    )
    temperature: float | None = Field(None, description="> 0; sampling temperature", examples=[0.5])
    repetition_penalty: float | None = Field(None, description="> 0; 1.0 = off", examples=[1.03])
    frequency_penalty: float | None = Field(None, description="[-2, 2]; 0 = off", examples=[0.1])
    top_k: int | None = Field(None, description="> 0", examples=[10])
    top_p: float | None = Field(None, description="(0, 1)", examples=[0.95])
    typical_p: float | None = Field(None, description="(0, 1)", examples=[0.95])
    do_sample: bool | None = Field(False, description="Sample instead of greedy decoding")
    max_new_tokens: int | None = Field(
        None, description="> 0; default: max_total_tokens - input tokens", examples=[20]
    )
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text")
    stop: list[str] | None = Field(None, description="Stop strings (not included in the output)")
    truncate: int | None = Field(None, description="Keep only the last `truncate` input tokens")
    watermark: bool | None = Field(False, description="Not supported: true is rejected")
    details: bool | None = Field(False, description="Return generation details")
    decoder_input_details: bool | None = Field(False, description="Return prompt token logprobs")
    seed: int | None = Field(None, description="Sampling seed")
    top_n_tokens: int | None = Field(None, description="Return the n most likely tokens at each step")
    ignore_eos_token: bool | None = Field(
        False, description="Extension (TGI's internal stopping parameter, vLLM's ignore_eos): keep generating past EOS"
    )
    grammar: Any | None = Field(None, description="Not supported: a grammar is rejected")
    adapter_id: str | None = Field(None, description="Not supported: an adapter is rejected")


class GenerateRequest(BaseModel):
    """Body of /generate and /generate_stream (and, with `stream`, of POST /)."""

    model_config = _CONFIG

    inputs: str = Field(..., examples=["My name is Olivier and I"])
    parameters: GenerateParameters | None = None
    stream: bool | None = Field(False, description="POST / only: stream the response")
    add_special_tokens: bool | None = Field(True, description="Let the tokenizer add BOS etc.")


class StreamOptions(BaseModel):
    model_config = _CONFIG

    include_usage: bool | None = False


class ChatMessage(BaseModel):
    model_config = _CONFIG

    role: str = Field(..., examples=["user"])
    content: str | list[dict[str, Any]] | None = Field(None, examples=["What is Deep Learning?"])
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatRequest(BaseModel):
    """Body of /v1/chat/completions and /chat_tokenize."""

    model_config = _CONFIG

    model: str | None = Field(None, description="Ignored: one model is served")
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    presence_penalty: float | None = Field(None, description="Not supported: non-zero is rejected")
    repetition_penalty: float | None = Field(None, description="TGI extension")
    logit_bias: dict[str, float] | list[float] | None = Field(
        None, description="Not supported: non-empty is rejected"
    )
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="0 = greedy; default 1.0 (sampling)")
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Passed to the chat template")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none/auto only")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}")
    user: str | None = None


class CompletionRequest(BaseModel):
    """Body of /v1/completions."""

    model_config = _CONFIG

    model: str | None = Field(None, description="Ignored: one model is served")
    prompt: str | list[str]
    max_tokens: int | None = Field(None, description="Default 100 (TGI)")
    temperature: float | None = Field(None, description="0 = greedy; default 1.0 (sampling)")
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, description="Number of top logprobs per token")
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, description="Not supported: non-zero is rejected")
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, description="TGI extension")
    best_of: int | None = Field(None, description="Not supported above 1 here (use TGI's best_of)")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: non-empty is rejected")
    seed: int | None = None
    suffix: str | None = Field(None, description="Not supported")
    user: str | None = None

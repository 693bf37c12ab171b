"""Checks with the real third-party clients, reusable against any server: the HTTP tests run them
on the scheduler double, the end-to-end tests on the whole stack. Each function takes the server's
base URL (and the API key, if the server has one) and asserts; none returns anything.

They assume greedy decoding is deterministic for a repeated prompt (true of the double and of a
real engine serving one request at a time), so streamed and non-streamed answers must agree.
"""

from __future__ import annotations

import huggingface_hub
import openai
import text_generation

PROMPT = "The capital of France is"  # raw completion: an instruct model continues it
QUESTION = "What is the capital of France?"  # chat
MAX_NEW_TOKENS = 12
FINISH_TGI = {"length", "eos_token", "stop_sequence"}
FINISH_OPENAI = {"length", "stop"}


def _auth(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def check_tgi_client(base_url: str, api_key: str | None = None, *, prompt: str = PROMPT) -> None:
    """text-generation 0.7.0: generate, generate_stream, stop sequences, a server-side 422."""
    client = text_generation.Client(base_url, headers=_auth(api_key), timeout=120)
    full = client.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)
    d = full.details
    assert d.finish_reason.value in {"length", "eos_token"}, d.finish_reason
    assert 1 <= d.generated_tokens <= MAX_NEW_TOKENS
    assert len(d.tokens) == d.generated_tokens
    if d.finish_reason.value == "length":
        assert d.generated_tokens == MAX_NEW_TOKENS
    assert d.seed is None  # greedy

    parts, last = [], None
    for event in client.generate_stream(prompt, max_new_tokens=MAX_NEW_TOKENS):
        if not event.token.special:
            parts.append(event.token.text)
        last = event
    assert last is not None and last.details is not None
    assert last.generated_text == full.generated_text == "".join(parts)
    assert last.details.generated_tokens == d.generated_tokens
    assert last.details.finish_reason == d.finish_reason

    text = full.generated_text
    if len(text.strip()) >= 4:
        # A stop string from the middle of the greedy answer: the output ends right before it.
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = client.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, stop_sequences=[stop])
        assert cut.generated_text == text[: text.index(stop)]
        assert cut.details.finish_reason.value == "stop_sequence"
        streamed = "".join(
            e.token.text
            for e in client.generate_stream(prompt, max_new_tokens=MAX_NEW_TOKENS, stop_sequences=[stop])
        )
        assert streamed == cut.generated_text

    try:
        client.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, truncate=10**9)
    except text_generation.errors.ValidationError as e:
        assert "truncate" in str(e)
    else:
        raise AssertionError("truncate beyond max_input_tokens was accepted")


def check_tgi_client_chat(base_url: str, api_key: str | None = None, *, prompt: str = QUESTION) -> None:
    """text-generation 0.7.0's chat: needs delta.role and delta.tool_calls in every chunk. Its
    stream parser cannot read `data: [DONE]`, so iteration stops at the finishing chunk."""
    client = text_generation.Client(base_url, headers=_auth(api_key), timeout=120)
    messages = [text_generation.types.Message(role="user", content=prompt)]
    full = client.chat(messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in FINISH_OPENAI
    parts = []
    for chunk in client.chat(messages, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True):
        c = chunk.choices[0]
        parts.append(c.delta.content or "")
        if c.finish_reason is not None:
            assert c.finish_reason == choice.finish_reason
            break
    assert "".join(parts) == choice.message.content


def check_openai_client(
    base_url: str, api_key: str | None = None, *, prompt: str = PROMPT, question: str = QUESTION
) -> None:
    """openai: chat and completions, streaming (with include_usage) and not, n, logprobs."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "unused", timeout=120, max_retries=0)
    models = client.models.list()
    model = models.data[0].id
    messages = [{"role": "user", "content": question}]

    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0
    )
    content = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in FINISH_OPENAI
    u = chat.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= MAX_NEW_TOKENS
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == u.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == content
    assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason

    two = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content  # greedy: the same answer
    for c in two.choices:
        assert len(c.logprobs.content) == two.usage.completion_tokens // 2
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)

    comp = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert comp.choices[0].finish_reason in FINISH_OPENAI
    streamed = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text

    try:
        client.chat.completions.create(model=model, messages=messages, presence_penalty=0.5)
    except openai.UnprocessableEntityError as e:
        assert "presence_penalty" in str(e.body)  # TGI-style body: {"error": "...", "error_type": ...}
    else:
        raise AssertionError("presence_penalty was silently accepted")


def check_hf_hub_client(
    base_url: str, api_key: str | None = None, *, prompt: str = PROMPT, question: str = QUESTION
) -> None:
    """huggingface_hub.InferenceClient: text_generation and chat_completion, streaming and not."""
    client = huggingface_hub.InferenceClient(base_url=base_url, api_key=api_key, timeout=120)
    out = client.text_generation(prompt, max_new_tokens=MAX_NEW_TOKENS, details=True, return_full_text=False)
    assert out.details is not None and out.details.finish_reason in FINISH_TGI
    tokens = list(
        client.text_generation(
            prompt, max_new_tokens=MAX_NEW_TOKENS, stream=True, details=True, return_full_text=False
        )
    )
    assert "".join(t.token.text for t in tokens if not t.token.special) == out.generated_text
    assert tokens[-1].generated_text == out.generated_text
    # details=False streams bare token texts; special tokens carry "" here, so they join exactly.
    texts = client.text_generation(prompt, max_new_tokens=MAX_NEW_TOKENS, stream=True, return_full_text=False)
    assert "".join(texts) == out.generated_text
    plain = client.text_generation(prompt, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert plain == out.generated_text

    messages = [{"role": "user", "content": question}]
    chat = client.chat_completion(messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    content = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in FINISH_OPENAI
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat_completion(messages, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(parts) == content

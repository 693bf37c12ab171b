"""TGI's validation rules and error format, table-driven over real HTTP (scheduler double,
real tokenizer). Limits: router_double.LIMITS (max_input_tokens 256, max_total_tokens 512,
max_best_of 2, max_stop_sequences 4, max_top_n_tokens 5, max_client_batch_size 4)."""

from __future__ import annotations

import httpx
import pytest
from router_double import LIMITS, ServerThread, make_backend, real_tokenizer, reply

from router.app import create_app

LONG = " ".join(["hello"] * 300)  # 300 tokens > max_input_tokens
MID = " ".join(["hello"] * 200)  # 200 tokens


def gen(inputs: str = "Hello", **params: object) -> dict:
    return {"inputs": inputs, "parameters": params}


def chat(**fields: object) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], **fields}


V = "validation"
# (path, body, status, error_type, substring of the message)
CASES = [
    ("/generate", gen(temperature=0), 422, V, "`temperature` must be strictly positive"),
    ("/generate", gen(temperature=-1.5), 422, V, "`temperature` must be strictly positive"),
    ("/generate", gen(repetition_penalty=0), 422, V, "`repetition_penalty` must be strictly positive"),
    ("/generate", gen(frequency_penalty=2.5), 422, V, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("/generate", gen(frequency_penalty=-2.01), 422, V, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("/generate", gen(top_p=1.0), 422, V, "`top_p` must be > 0.0 and < 1.0"),
    ("/generate", gen(top_p=0.0), 422, V, "`top_p` must be > 0.0 and < 1.0"),
    ("/generate", gen(typical_p=1.0), 422, V, "`typical_p` must be > 0.0 and < 1.0"),
    ("/generate", gen(typical_p=-0.1), 422, V, "`typical_p` must be > 0.0 and < 1.0"),
    ("/generate", gen(top_k=0), 422, V, "`top_k` must be strictly positive"),
    ("/generate", gen(max_new_tokens=0), 422, V, "`max_new_tokens` must be strictly positive"),
    ("/generate", gen(max_new_tokens=-3), 422, V, "`max_new_tokens` must be strictly positive"),
    (
        "/generate",
        gen(truncate=0),
        422,
        V,
        "`truncate` must be strictly positive and less than 256. Given: 0",
    ),
    (
        "/generate",
        gen(truncate=257),
        422,
        V,
        "`truncate` must be strictly positive and less than 256. Given: 257",
    ),
    ("/generate", gen(best_of=3, do_sample=True), 422, V, "`best_of` must be > 0 and <= 2. Given: 3"),
    ("/generate", gen(best_of=0), 422, V, "`best_of` must be > 0 and <= 2. Given: 0"),
    ("/generate", gen(best_of=2), 422, V, "you must use sampling when `best_of` is > 1"),
    (
        "/generate",
        gen(best_of=2, do_sample=True, seed=1),
        422,
        V,
        "`seed` must not be set when `best_of` > 1",
    ),
    (
        "/generate_stream",
        gen(best_of=2, do_sample=True),
        422,
        V,
        "`best_of` != 1 is not supported when streaming tokens",
    ),
    (
        "/generate_stream",
        gen(decoder_input_details=True),
        422,
        V,
        "`decoder_input_details` == true is not supported when streaming tokens",
    ),
    (
        "/generate",
        gen(stop=["a", "b", "c", "d", "e"]),
        422,
        V,
        "`stop` supports up to 4 stop sequences. Given: 5",
    ),
    ("/generate", gen(top_n_tokens=6), 422, V, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ("/generate", gen(seed=-1), 422, V, "`seed` must be >= 0"),
    ("/generate", gen(seed=2**64), 422, V, "`seed` must be >= 0"),
    ("/generate", gen(""), 422, V, "`inputs` cannot be empty"),
    ("/generate", gen(LONG, max_new_tokens=1), 422, V, "`inputs` must have less than 256 tokens. Given: 300"),
    (
        "/generate",
        gen(MID, max_new_tokens=400),
        422,
        V,
        "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 200 `inputs` tokens and 400 `max_new_tokens`",
    ),
    ("/generate", gen(watermark=True), 422, V, "`watermark` is not supported"),
    ("/generate", gen(grammar={"type": "regex", "value": "a+"}), 422, V, "grammar is not supported"),
    ("/generate", gen(adapter_id="lora-1"), 422, V, "`adapter_id` is not supported"),
    ("/generate", gen(temperature="hot"), 422, V, "parameters.temperature"),
    ("/generate", {"parameters": {}}, 422, V, "inputs"),
    ("/generate", {"inputs": ["a", "b"]}, 422, V, "inputs"),
    ("/", gen(temperature=0), 422, V, "`temperature` must be strictly positive"),
    ("/v1/chat/completions", chat(presence_penalty=0.5), 422, V, "`presence_penalty` is not supported"),
    ("/v1/chat/completions", chat(logit_bias={"42": 5}), 422, V, "`logit_bias` is not supported"),
    (
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}),
        422,
        V,
        "`response_format` is not supported",
    ),
    ("/v1/chat/completions", chat(tool_choice="required"), 422, V, "`tool_choice` that forces a tool call"),
    (
        "/v1/chat/completions",
        chat(tool_choice={"type": "function", "function": {"name": "f"}}),
        422,
        V,
        "`tool_choice`",
    ),
    ("/v1/chat/completions", {"messages": []}, 422, V, "`messages` cannot be empty"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        422,
        V,
        "unknown role 'robot'",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 422, V, "`content` is required"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ]
        },
        422,
        V,
        "only text content parts are supported",
    ),
    ("/v1/chat/completions", chat(n=0), 422, V, "`n` must be >= 1 and <= 4. Given: 0"),
    ("/v1/chat/completions", chat(n=5), 422, V, "`n` must be >= 1 and <= 4. Given: 5"),
    (
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=6),
        422,
        V,
        "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
    ),
    ("/v1/chat/completions", chat(max_tokens=0), 422, V, "`max_new_tokens` must be strictly positive"),
    (
        "/v1/chat/completions",
        chat(max_completion_tokens=600),
        422,
        V,
        "`inputs` tokens + `max_new_tokens` must be <= 512",
    ),
    ("/v1/chat/completions", chat(temperature=-1), 422, V, "`temperature` must be strictly positive"),
    ("/v1/chat/completions", chat(top_p=0), 422, V, "`top_p` must be > 0.0 and < 1.0"),
    (
        "/v1/chat/completions",
        chat(stop=["1", "2", "3", "4", "5"]),
        422,
        V,
        "`stop` supports up to 4 stop sequences",
    ),
    ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, 422, V, "Suffix is not supported"),
    (
        "/v1/completions",
        {"prompt": ["a", "b", "c", "d", "e"]},
        422,
        V,
        "exceeds the maximum allowed batch size of 4",
    ),
    ("/v1/completions", {"prompt": []}, 422, V, "`prompt` cannot be empty"),
    (
        "/v1/completions",
        {"prompt": "Hi", "best_of": 2},
        422,
        V,
        "`best_of` is not supported on /v1/completions",
    ),
    (
        "/v1/completions",
        {"prompt": "Hi", "presence_penalty": 1},
        422,
        V,
        "`presence_penalty` is not supported",
    ),
    (
        "/v1/completions",
        {"prompt": "Hi", "logprobs": 9},
        422,
        V,
        "`top_n_tokens` must be >= 0 and <= 5. Given: 9",
    ),
    ("/v1/completions", {"prompt": ""}, 422, V, "`inputs` cannot be empty"),
    # Accepted: unknown fields are ignored as TGI does; client defaults that mean "off" pass.
    (
        "/generate",
        {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "unknown": 1}, "extra": True},
        200,
        None,
        None,
    ),
    (
        "/generate",
        gen(max_new_tokens=2, watermark=False, grammar=None, adapter_id=None, top_n_tokens=None),
        200,
        None,
        None,
    ),
    (
        "/generate",
        gen(max_new_tokens=2, temperature=1.0, top_k=5, top_p=0.9, typical_p=0.9, best_of=2),
        200,
        None,
        None,
    ),
    (
        "/v1/chat/completions",
        chat(
            max_tokens=2,
            presence_penalty=0,
            top_p=1.0,
            response_format={"type": "text"},
            tool_choice="auto",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        ),
        200,
        None,
        None,
    ),
]


@pytest.fixture(scope="module")
def server():
    tok = real_tokenizer()
    backend = make_backend(tok, reply(tok, "Paris is the capital of France."))
    with ServerThread(create_app(backend)) as srv:
        srv.backend = backend
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def test_limits_match_the_table():
    assert (LIMITS.max_input_tokens, LIMITS.max_total_tokens, LIMITS.max_best_of) == (256, 512, 2)
    tok = real_tokenizer()
    assert len(tok.encode(LONG)) == 300 and len(tok.encode(MID)) == 200


@pytest.mark.parametrize(("path", "body", "status", "error_type", "message"), CASES)
def test_rule(client, path, body, status, error_type, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    if error_type is not None:
        payload = r.json()
        assert set(payload) == {"error", "error_type"}
        assert payload["error_type"] == error_type
        assert message in payload["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"inputs": "x", "parameters": {"temperature": NaN}}',
        b"\xff\xfe",
        b"",
        b'{"inputs": "x"',
    ],
)
def test_malformed_bodies_are_422(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"


def test_missing_max_new_tokens_defaults_to_the_token_budget(server, client):
    tok = real_tokenizer()
    r = client.post("/generate", json={"inputs": "Hello there"})
    assert r.status_code == 200
    req = server.backend.scheduler.submitted[-1]
    n = len(tok.encode("Hello there"))
    assert req.max_new_tokens == LIMITS.max_total_tokens - n


def test_truncate_keeps_the_last_tokens(server, client):
    tok = real_tokenizer()
    text = "one two three four five six seven"
    r = client.post("/generate", json=gen(text, truncate=3, max_new_tokens=1))
    assert r.status_code == 200
    assert list(server.backend.scheduler.submitted[-1].input_ids) == tok.encode(text)[-3:]


def test_seed_is_drawn_when_sampling_and_null_when_greedy(server, client):
    greedy = client.post("/generate", json=gen(max_new_tokens=1, details=True)).json()
    assert greedy["details"]["seed"] is None
    sampled = client.post("/generate", json=gen(max_new_tokens=1, details=True, do_sample=True)).json()
    seed = sampled["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    assert server.backend.scheduler.submitted[-1].sampling.seed == seed
    given = client.post(
        "/generate", json=gen(max_new_tokens=1, details=True, temperature=0.7, seed=42)
    ).json()
    assert given["details"]["seed"] == 42
    s = server.backend.scheduler.submitted[-1].sampling
    assert (s.do_sample, s.temperature, s.seed) == (True, 0.7, 42)


def test_sampling_parameters_reach_the_scheduler(server, client):
    body = gen(
        max_new_tokens=3,
        top_k=7,
        top_p=0.8,
        typical_p=0.5,
        repetition_penalty=1.2,
        frequency_penalty=-0.5,
        top_n_tokens=2,
        decoder_input_details=True,
    )
    assert client.post("/generate", json=body).status_code == 200
    req = server.backend.scheduler.submitted[-1]
    s = req.sampling
    assert (s.top_k, s.top_p, s.typical_p, s.repetition_penalty, s.frequency_penalty) == (
        7,
        0.8,
        0.5,
        1.2,
        -0.5,
    )
    assert s.do_sample and req.top_n_tokens == 2 and req.prefill_logprobs and req.max_new_tokens == 3


def test_openai_mapping_reaches_the_scheduler(server, client):
    tok = real_tokenizer()
    r = client.post(
        "/v1/chat/completions", json=chat(max_tokens=3, temperature=0, seed=5, frequency_penalty=0.3)
    )
    assert r.status_code == 200
    req = server.backend.scheduler.submitted[-1]
    assert not req.sampling.do_sample and req.max_new_tokens == 3 and req.sampling.frequency_penalty == 0.3
    templated = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert list(req.input_ids) == tok.encode(templated, add_special_tokens=False)
    assert set(req.stop_token_ids) == set(tok.end_of_turn_ids) - set(tok.eos_token_ids)
    r = client.post("/v1/chat/completions", json=chat(max_tokens=3))  # OpenAI default: sampling at 1.0
    s = server.backend.scheduler.submitted[-1].sampling
    assert s.do_sample and s.temperature == 1.0


def test_huge_top_k_is_clamped_to_the_vocabulary(server, client):
    assert client.post("/generate", json=gen(max_new_tokens=1, top_k=10**12)).status_code == 200
    assert server.backend.scheduler.submitted[-1].sampling.top_k == real_tokenizer().vocab_size


WEIRD = [None, -1, 0, 1, 0.5, 2**70, -(2**70), 1e300, "x", "", [], ["a"], {}, {"type": "text"}, True, False]
FIELDS = {
    "/generate": [
        "best_of",
        "temperature",
        "repetition_penalty",
        "frequency_penalty",
        "top_k",
        "top_p",
        "typical_p",
        "do_sample",
        "max_new_tokens",
        "return_full_text",
        "stop",
        "truncate",
        "watermark",
        "details",
        "decoder_input_details",
        "seed",
        "top_n_tokens",
        "grammar",
        "adapter_id",
    ],
    "/v1/chat/completions": [
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "response_format",
        "messages",
    ],
    "/v1/completions": [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "logprobs",
        "echo",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "best_of",
        "logit_bias",
        "seed",
        "suffix",
    ],
}


@pytest.mark.parametrize("seed", range(60))
def test_random_bodies_never_get_a_500(client, seed):
    import random

    rng = random.Random(seed)
    path = rng.choice(list(FIELDS))
    fields = {f: rng.choice(WEIRD) for f in rng.sample(FIELDS[path], rng.randint(1, 5))}
    if path == "/generate":
        body = {"inputs": rng.choice(["Hello", "", "x" * 50]), "parameters": {"max_new_tokens": 2, **fields}}
    elif path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    else:
        body = {"prompt": "Hi", "max_tokens": 2, **fields}
    r = client.post(path, json=body)
    assert r.status_code in (200, 422), (body, r.status_code, r.text)
    if r.status_code == 422:
        assert set(r.json()) == {"error", "error_type"}


def test_parameters_the_engine_cannot_honour_are_422():
    """An engine that reports typical_p unsupported and no top-n (TensorRT-LLM) gets 422s, not
    silently ignored parameters."""
    import dataclasses

    tok = real_tokenizer()
    backend = make_backend(tok, reply(tok, "Paris."))
    backend.limits = dataclasses.replace(LIMITS, unsupported_parameters=("typical_p",), max_top_n_tokens=0)
    with ServerThread(create_app(backend)) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as c:
        r = c.post("/generate", json=gen("Hi", typical_p=0.5, max_new_tokens=2))
        assert (r.status_code, r.json()["error_type"]) == (422, "validation")
        assert "`typical_p` is not supported" in r.json()["error"]
        r = c.post("/generate", json=gen("Hi", top_n_tokens=2, max_new_tokens=2))
        assert r.status_code == 422 and "top_n_tokens" in r.json()["error"]
        assert c.post("/generate", json=gen("Hi", temperature=0.5, max_new_tokens=2)).status_code == 200


def test_ignore_eos_token_reaches_the_scheduler(server, client):
    r = client.post("/generate", json=gen("Hello", max_new_tokens=3, ignore_eos_token=True))
    assert r.status_code == 200
    assert server.backend.scheduler.submitted[-1].ignore_eos_token is True
    client.post("/generate", json=gen("Hello", max_new_tokens=3))
    assert server.backend.scheduler.submitted[-1].ignore_eos_token is False


def test_prompts_validated_together_are_encoded_together_and_judged_one_by_one():
    """A burst is tokenized in one pool call (router/batch_encoder.py); each request still gets
    its own ids, truncation and length verdict."""
    import asyncio

    from router.errors import ValidationError
    from router.validation import Params, Validator

    tok = real_tokenizer()
    validator = Validator(workers=2)
    submitted: list[int] = []
    submit = validator._pool.submit

    def counting_submit(fn, /, *args, **kwargs):  # noqa: ANN001, ANN202
        submitted.append(len(args[1]))
        return submit(fn, *args, **kwargs)

    validator._pool.submit = counting_submit  # type: ignore[method-assign]
    cases = [("Hello", None), (LONG, None), (LONG, 5), (MID, None), ("Hi there", 1)]

    async def main() -> list[object]:
        aws = [
            validator.validate(
                text,
                Params(max_new_tokens=2, truncate=truncate),
                tokenizer=tok,
                limits=LIMITS,
                prefill_logprobs_supported=True,
                stream=True,
            )
            for text, truncate in cases
        ]
        return list(await asyncio.gather(*aws, return_exceptions=True))

    try:
        results = asyncio.run(main())
    finally:
        validator.close()
    assert submitted == [len(cases)]
    too_long = results[1]
    assert isinstance(too_long, ValidationError)
    assert str(too_long) == "`inputs` must have less than 256 tokens. Given: 300"
    for (text, truncate), r in zip(cases, results, strict=True):
        if r is too_long:
            continue
        ids = tok.encode(text)
        assert r.request.input_ids == tuple(ids if truncate is None else ids[-truncate:]), text


def test_a_burst_with_too_long_prompts_gets_a_422_for_each_of_those_only(server, client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[int, dict]:
        body = gen(LONG if i % 3 == 0 else f"Hello {i}", max_new_tokens=2)
        r = client.post("/generate_stream" if i % 2 else "/generate", json=body)
        return r.status_code, (r.json() if r.status_code != 200 else {})

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(48)))
    for i, (status, payload) in enumerate(answers):
        if i % 3 == 0:
            assert status == 422
            assert payload == {
                "error": "`inputs` must have less than 256 tokens. Given: 300",
                "error_type": "validation",
            }
        else:
            assert status == 200


def test_the_validator_counts_requests_in_validation_for_the_scheduler():
    """router/arrivals.py: a request counts from the start of its validation to its end, whether
    it validates or fails, and each end resolves the scheduler's waiter."""
    import asyncio

    from router.arrivals import Arrivals
    from router.errors import ValidationError
    from router.validation import Params, Validator

    tok = real_tokenizer()
    arrivals = Arrivals()
    validator = Validator(workers=2, arrivals=arrivals)

    async def main() -> tuple[list[int], list[object], bool]:
        seen: list[int] = []
        waiter = arrivals.next_change()
        aws = [
            validator.validate(text, Params(max_new_tokens=2), tokenizer=tok, limits=LIMITS,
                               prefill_logprobs_supported=True, stream=True)  # fmt: skip
            for text in ("Hello", LONG, "Hi there")
        ]
        tasks = [asyncio.ensure_future(a) for a in aws]
        await asyncio.sleep(0)  # all three are inside validation, waiting for their encode
        seen.append(arrivals.count)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        seen.append(arrivals.count)
        return seen, list(results), waiter.done()

    try:
        seen, results, woke = asyncio.run(main())
    finally:
        validator.close()
    assert seen == [3, 0] and woke
    assert isinstance(results[1], ValidationError) and not isinstance(results[0], Exception)

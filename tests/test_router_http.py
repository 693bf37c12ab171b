"""The router's HTTP surface over real HTTP (uvicorn on a loopback port) with the scheduler double
and the real embedded-model tokenizer: endpoints, SSE framing, errors, API key, payload limit,
disconnects, stop strings, best_of, n, metrics, and the real third-party clients."""

from __future__ import annotations

import json
import logging

import client_checks
import httpx
import pytest
from router_double import LIMITS, ServerThread, make_backend, real_tokenizer, reply

from router.app import create_app
from router.config import RouterConfig

ANSWER = "The capital of France is Paris. 😀 你好!"
INFO_KEYS = {
    "model_id",
    "model_sha",
    "model_dtype",
    "model_device_type",
    "model_pipeline_tag",
    "max_concurrent_requests",
    "max_best_of",
    "max_stop_sequences",
    "max_input_tokens",
    "max_total_tokens",
    "validation_workers",
    "max_client_batch_size",
    "router",
    "version",
    "sha",
    "docker_label",
    "waiting_served_ratio",
    "max_batch_total_tokens",
    "max_waiting_tokens",
    "max_batch_size",
}


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    backend = make_backend(tok, reply(tok, ANSWER))
    with ServerThread(create_app(backend)) as srv:
        srv.backend = backend
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def serve(tok, script=None, **kw):
    """A fresh server for tests that need their own backend settings."""
    config = kw.pop("config", None)
    backend = make_backend(tok, script or reply(tok, ANSWER), config=config, **kw)
    srv = ServerThread(create_app(backend))
    srv.backend = backend
    return srv


def events(raw: str, prefix: str) -> list[str]:
    """Split an SSE body into its data payloads, checking the exact framing on the way."""
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(b.startswith(prefix) for b in blocks), blocks
    return [b[len(prefix) :] for b in blocks]


# ---- service routes -------------------------------------------------------------------------


def test_info_has_tgi_fields(client):
    info = client.get("/info").json()
    assert INFO_KEYS <= set(info)
    assert (
        info["max_input_tokens"] == LIMITS.max_input_tokens
        and info["max_total_tokens"] == LIMITS.max_total_tokens
    )
    assert info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"


def test_models_live_docs_openapi(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert client.get("/live").status_code == 200
    assert client.get("/health").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    for path in (
        "/generate",
        "/generate_stream",
        "/",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
    ):
        assert path in spec["paths"]


def test_health_is_503_until_ready_and_while_a_shard_is_unhealthy(tok):
    with serve(tok) as srv:
        srv.backend.ready = False
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        assert httpx.get(srv.base_url + "/live").status_code == 200
        r = httpx.post(srv.base_url + "/generate", json={"inputs": "x"})
        assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
        srv.backend.ready = True
        assert httpx.get(srv.base_url + "/health").status_code == 200
        srv.backend.shard_healthy = False
        assert httpx.get(srv.base_url + "/health").status_code == 503


def test_tokenize_and_chat_tokenize(client, tok):
    toks = client.post("/tokenize", json={"inputs": "Hello 你好"}).json()
    assert [t["id"] for t in toks] == tok.encode("Hello 你好")
    assert toks[0] == {"id": toks[0]["id"], "text": "Hello", "start": 0, "stop": 5}
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post("/chat_tokenize", json={"messages": messages}).json()
    assert r["templated_text"] == tok.apply_chat_template(messages)
    assert [t["id"] for t in r["tokenize_response"]] == tok.encode(
        r["templated_text"], add_special_tokens=False
    )


# ---- generation -----------------------------------------------------------------------------


def test_generate_headers_details_and_full_text(client, tok):
    r = client.post("/generate", json={"inputs": "Q?", "parameters": {"details": True, "top_n_tokens": 2}})
    assert r.status_code == 200
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-compute-characters",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-prompt-tokens",
        "x-generated-tokens",
    ):
        assert h in r.headers
    body = r.json()
    n_answer = len(tok.encode(ANSWER, add_special_tokens=False)) + 1  # + EOS
    assert body["generated_text"] == ANSWER
    d = body["details"]
    assert d["finish_reason"] == "eos_token" and d["generated_tokens"] == n_answer == len(d["tokens"])
    assert r.headers["x-generated-tokens"] == str(n_answer) and r.headers["x-compute-characters"] == "2"
    assert all(len(top) == 2 for top in d["top_tokens"])
    assert "".join(t["text"] for t in d["tokens"]) == ANSWER
    compat = client.post("/", json={"inputs": "Q?", "parameters": {"max_new_tokens": 3}}).json()
    assert compat == [{"generated_text": "Q?" + tok.decode(tok.encode(ANSWER, add_special_tokens=False)[:3])}]


def test_decoder_input_details_returns_prompt_logprobs(client, tok):
    d = client.post(
        "/generate",
        json={"inputs": "Hello world", "parameters": {"decoder_input_details": True, "max_new_tokens": 1}},
    ).json()["details"]
    assert [p["id"] for p in d["prefill"]] == tok.encode("Hello world")
    assert d["prefill"][0]["logprob"] is None and isinstance(d["prefill"][1]["logprob"], float)


def test_tgi_sse_framing_and_stream_equals_generate(client):
    full = client.post("/generate", json={"inputs": "Q?", "parameters": {"max_new_tokens": 50}}).json()
    r = client.post(
        "/generate_stream", json={"inputs": "Q?", "parameters": {"max_new_tokens": 50, "details": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith('data:{"index":1,')
    payloads = [json.loads(p) for p in events(r.text, "data:")]
    assert "[DONE]" not in r.text
    assert all(p["generated_text"] is None and p["details"] is None for p in payloads[:-1])
    last = payloads[-1]
    assert last["generated_text"] == full["generated_text"] == "".join(p["token"]["text"] for p in payloads)
    assert last["details"]["finish_reason"] == "eos_token" and last["details"]["generated_tokens"] == len(
        payloads
    )
    compat = client.post(
        "/", json={"inputs": "Q?", "stream": True, "parameters": {"return_full_text": False}}
    )
    assert [json.loads(p)["token"] for p in events(compat.text, "data:")] == [p["token"] for p in payloads]


def test_openai_sse_framing(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.text.startswith('data: {"id":"chatcmpl-')
    payloads = events(r.text, "data: ")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(
        c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"]["tool_calls"] is None
        for c in chunks
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": True, "max_tokens": 2})
    assert events(r.text, "data: ")[-1] == "[DONE]"


def test_stop_string_is_cut_never_leaked_and_cancels(server, client):
    stop = "Paris."
    full = client.post(
        "/generate", json={"inputs": "Q?", "parameters": {"stop": [stop], "details": True}}
    ).json()
    assert full["generated_text"] == "The capital of France is "
    assert full["details"]["finish_reason"] == "stop_sequence"
    assert server.backend.scheduler.handles[-1].cancelled.is_set()  # EOS never came: handle cancelled
    r = client.post(
        "/generate_stream", json={"inputs": "Q?", "parameters": {"stop": [stop], "details": True}}
    )
    payloads = [json.loads(p) for p in events(r.text, "data:")]
    streamed = "".join(p["token"]["text"] for p in payloads)
    assert streamed == full["generated_text"] and "Paris" not in streamed
    assert payloads[-1]["details"]["finish_reason"] == "stop_sequence"
    chat = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Q"}], "stop": "😀"}
    ).json()
    assert chat["choices"][0]["message"]["content"] == "The capital of France is Paris. "
    assert chat["choices"][0]["finish_reason"] == "stop"


def test_best_of_returns_the_highest_mean_logprob(tok):
    answers = {0: "A short one.", 1: "Another answer entirely"}
    script = lambda req: tok.encode(answers[req.sampling.seed % 2], add_special_tokens=False) + [2]  # noqa: E731
    logprob = lambda pos, tid: -0.5 if tid in tok.encode(answers[1], add_special_tokens=False) else -2.0  # noqa: E731
    with serve(tok, script, logprob=logprob) as srv:
        body = {"inputs": "Q", "parameters": {"best_of": 2, "do_sample": True, "details": True}}
        for _ in range(8):  # until the two random seeds pick different scripts
            d = httpx.post(srv.base_url + "/generate", json=body).json()
            others = d["details"]["best_of_sequences"]
            if others[0]["generated_text"] != d["generated_text"]:
                break
        assert d["generated_text"] == answers[1]
        assert others[0]["generated_text"] == answers[0] and len(others) == 1
        assert d["details"]["seed"] != others[0]["seed"]


def test_n_choices_streamed_and_not(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 3, "temperature": 0}
    full = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in full["choices"]] == [0, 1] and full["usage"]["completion_tokens"] == 6
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(p) for p in events(r.text, "data: ")[:-1]]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]
    comp = client.post(
        "/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "echo": True, "logprobs": 1}
    ).json()
    assert [c["index"] for c in comp["choices"]] == [0, 1, 2, 3]
    assert comp["choices"][2]["text"].startswith("b") and len(comp["choices"][2]["logprobs"]["tokens"]) == 2


def test_errors_mid_stream_and_overload(tok):
    with serve(tok, fail_after=2) as srv:
        r = httpx.post(srv.base_url + "/generate", json={"inputs": "Q"})
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        r = httpx.post(srv.base_url + "/generate_stream", json={"inputs": "Q"})
        last = events(r.text, "data:")[-1]
        assert json.loads(last)["error_type"] == "generation" and len(events(r.text, "data:")) == 3
        r = httpx.post(
            srv.base_url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Q"}], "stream": True},
        )
        payloads = events(r.text, "data: ")
        assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error_type"] == "generation"
    with serve(tok, max_concurrent=0) as srv:
        r = httpx.post(srv.base_url + "/generate_stream", json={"inputs": "Q"})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert 'tgi_request_failure{err="overloaded"}' in metrics


def test_metrics_expose_tgi_names(client):
    client.post("/generate", json={"inputs": "Q", "parameters": {"max_new_tokens": 2}})
    text = client.get("/metrics").text
    # TGI's exact counter names (dashboards), not prometheus-client's <name>_total
    assert "\ntgi_request_count " in text and "tgi_request_count_total" not in text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_generated_tokens",
        "tgi_request_input_length",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_kv_cache_blocks_used",
        "tgi_kv_cache_blocks_free",
        "tgi_prefix_cache_hit_rate",
    ):
        assert name in text, name


# ---- edge: API key, payload limit, malformed JSON, disconnects -------------------------------


def test_cors_allows_any_origin_by_default_and_only_the_listed_ones_when_set(tok):
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    with serve(tok) as srv:  # TGI's default: any origin
        r = httpx.get(srv.base_url + "/info", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        r = httpx.options(srv.base_url + "/generate", headers=preflight)
        assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"]
        # An event stream's body skips the middleware chain (http_sse.RAW_SEND); its start does not.
        body = {"inputs": "Q", "parameters": {"max_new_tokens": 3}}
        r = httpx.post(srv.base_url + "/generate_stream", json=body, headers={"Origin": "https://a.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert len(events(r.text, "data:")) == 3
    with serve(tok, config=RouterConfig(cors_allow_origin="https://a.example, https://b.example")) as srv:
        r = httpx.get(srv.base_url + "/info", headers={"Origin": "https://b.example"})
        assert r.headers["access-control-allow-origin"] == "https://b.example"
        r = httpx.get(srv.base_url + "/info", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.options(srv.base_url + "/generate", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400


def test_validation_workers_flag_sizes_the_tokenizer_pool(tok):
    import os

    from router.config import parse_args

    with serve(tok, config=RouterConfig(validation_workers=3)) as srv:
        assert httpx.get(srv.base_url + "/info").json()["validation_workers"] == 3
    with serve(tok, config=RouterConfig()) as srv:  # 0: automatic
        assert httpx.get(srv.base_url + "/info").json()["validation_workers"] == min(4, os.cpu_count() or 1)
    with pytest.raises(SystemExit):  # TGI refuses a non-positive count; 0 is our "automatic"
        parse_args(["--validation-workers", "-1"], env={})


def test_api_key(tok, caplog):
    key = "s3cr3t-key-value"
    caplog.set_level(logging.DEBUG)
    with serve(tok, config=RouterConfig(api_key=key)) as srv:
        url = srv.base_url
        body = {"inputs": "Q", "parameters": {"max_new_tokens": 2}}
        for path, payload in (
            ("/generate", body),
            ("/generate_stream", body),
            ("/", body),
            ("/tokenize", body),
            ("/v1/completions", {"prompt": "Q"}),
            ("/chat_tokenize", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            r = httpx.post(url + path, json=payload)
            assert r.status_code == 401 and r.json()["error_type"] == "authentication", path
        assert (
            httpx.post(url + "/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        assert httpx.post(url + "/generate", json=body, headers={"Authorization": key}).status_code == 401
        ok = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/info").status_code == 200
        assert key not in httpx.get(url + "/info").text
        client_checks.check_openai_client(url, api_key=key)
    assert key not in caplog.text
    assert key not in repr(srv.backend.config)


def test_payload_limit_on_header_and_on_actual_bytes(tok):
    with serve(tok, config=RouterConfig(payload_limit=1000)) as srv:
        big = {"inputs": "x" * 2000}
        r = httpx.post(srv.base_url + "/generate", json=big)
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

        def chunked():  # no Content-Length: only the bytes received can tell
            yield b'{"inputs": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        r = httpx.post(
            srv.base_url + "/generate", content=chunked(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert (
            httpx.post(
                srv.base_url + "/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 1}}
            ).status_code
            == 200
        )


def test_malformed_json_is_422_not_500(client):
    r = client.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_client_disconnect_cancels_streams_and_plain_requests(tok):
    with serve(tok, hang_after=2) as srv:
        sched = srv.backend.scheduler
        with httpx.Client(base_url=srv.base_url, timeout=10) as c:
            with c.stream("POST", "/generate_stream", json={"inputs": "Q"}) as r:
                first = next(r.iter_lines())
                assert first.startswith("data:{")
            assert sched.handles[-1].cancelled.wait(5), "stream disconnect did not cancel the handle"
            with c.stream(
                "POST",
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Q"}], "stream": True, "n": 2},
            ) as r:
                next(r.iter_lines())
            assert sched.handles[-1].cancelled.wait(5) and sched.handles[-2].cancelled.wait(5)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/generate", json={"inputs": "Q"}, timeout=0.5)
        assert sched.handles[-1].cancelled.wait(5), "a non-streaming request's disconnect did not cancel"


# ---- real clients ---------------------------------------------------------------------------


def test_text_generation_client(server):
    client_checks.check_tgi_client(server.base_url)
    client_checks.check_tgi_client_chat(server.base_url)


def test_openai_client(server):
    client_checks.check_openai_client(server.base_url)


def test_huggingface_hub_client(server):
    client_checks.check_hf_hub_client(server.base_url)


def test_concurrent_requests_all_answer_correctly(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        if i % 2:
            r = client.post(
                "/generate_stream", json={"inputs": f"Q{i}", "parameters": {"max_new_tokens": 64}}
            )
            return "".join(json.loads(p)["token"]["text"] for p in events(r.text, "data:"))
        return client.post(
            "/generate", json={"inputs": f"Q{i}", "parameters": {"max_new_tokens": 64}}
        ).json()["generated_text"]

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(32))) == [ANSWER] * 32


def test_unknown_route_is_a_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_text_held_for_a_stop_string_is_released_on_the_eos_event(tok):
    with serve(tok, reply(tok, "Hello STO")) as srv:
        body = {"inputs": "Q", "parameters": {"stop": ["STOP"], "details": True}}
        r = httpx.post(srv.base_url + "/generate_stream", json=body)
        last = json.loads(events(r.text, "data:")[-1])
        assert last["token"]["id"] == tok.eos_token_ids[0]
        assert last["token"]["text"] == "STO" and last["token"]["special"] is False
        assert last["generated_text"] == "Hello STO" and last["details"]["finish_reason"] == "eos_token"
        texts = [json.loads(p)["token"]["text"] for p in events(r.text, "data:")]
        assert "".join(texts) == "Hello STO"


def test_no_generation_left_running(server):
    """Runs last in this module: every request above ended finished or cancelled (no leak)."""
    handles = server.backend.scheduler.handles
    if not handles:
        pytest.skip("no request ran on the shared server in this session (-k selection)")
    assert server.backend.scheduler.active() == 0

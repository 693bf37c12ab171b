"""Triton kernels of the paged-attention fast path. Imports triton at the top: import this module
only from code that runs on a machine with triton (triton_attention.py imports it lazily).

Paged KV cache layout (see shard/native/forward.py): k_cache, v_cache of shape
(num_blocks, BLOCK_SIZE, HKV, D); slot s = block * BLOCK_SIZE + offset. Block tables are
(B, max_blocks) int32; a sequence of length L uses entries [0, cdiv(L, BLOCK_SIZE)) of its row and
no kernel here reads an entry past that (padding entries may hold anything).

Softmax runs in base 2: scores are scaled by scale * log2(e) and exponentiated with exp2; the
log-sum-exp that split-K partials carry is in base 2 as well.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl


def _jit_unspecialized(*names: str):
    """triton.jit that keeps `names` out of the kernel's specialization key. Triton compiles a new
    variant when an integer argument becomes 1 or a multiple of 16, or a pointer's 16-byte
    alignment changes. The arguments named here change with the batch (a block table's width, the
    split count, metadata tensors that are views into a mixed batch's rows), so each batch shape
    could compile on the request path: ~1-2 s on an H100 (tests/gpu_jit_probe.py). They only
    index small metadata, so the specialization buys nothing. Tensors that carry the data (q, k,
    v, out) and model-constant strides stay specialized."""
    params = inspect.signature(triton.jit).parameters
    kw = {"do_not_specialize": list(names)}
    if "do_not_specialize_on_alignment" in params:
        kw["do_not_specialize_on_alignment"] = list(names)
    return triton.jit(**kw)

# Finite "minus infinity" for running maxima: exp2(m_old - m_new) stays 1 (not NaN) while a row has
# seen only masked scores, and exp2(-inf - m) is still exactly 0 for masked scores.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    HKV: tl.constexpr,
    HKV_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per new token: copies its K and V (HKV, D) into the cache slot. A negative slot
    means "do not store" (lets callers mask tokens without a separate index)."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HKV_PAD)
    offs_d = tl.arange(0, D)
    mask = (offs_h < HKV)[:, None]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + block * stride_kcb + off * stride_kct
    vc = v_cache_ptr + block * stride_vcb + off * stride_vct
    tl.store(kc + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
    tl.store(vc + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask=mask)


@_jit_unspecialized("block_tables_ptr", "seq_lens_ptr", "num_splits", "stride_bt")
def decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,  # scale * log2(e)
    num_splits,  # runtime: the grid's third dimension (static per batch shape, not per data)
    stride_qt,
    stride_qh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_bt,
    stride_ot,
    stride_oh,
    G,  # q heads per kv head (runtime: fewer compiled variants)
    G_PAD: tl.constexpr,  # >= 16 (tl.dot's smallest M)
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (page)
    BLOCK_N: tl.constexpr,  # tokens per loop tile
    DIRECT: tl.constexpr,  # num_splits == 1: normalise and write `out`, no partials
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 caches (tl.dot would use TF32), else "tf32"
):
    """Flash-decoding over the paged cache. Grid (B, HKV, num_splits): program (b, h, s) handles the
    G q heads that share kv head h, so each K/V tile is read once for all of them, over split s of
    sequence b. The split size adapts to the sequence: the sequence's tiles are divided evenly over
    num_splits programs, so short and long sequences both spread over the grid; programs past the
    end return at once (the grid is sized from static maxima, which keeps it capturable).

    Partials (DIRECT False): part_out (B, HQ, num_splits, D) fp32 holds the split's normalised output,
    part_lse (B, HQ, num_splits) fp32 its base-2 log-sum-exp; decode_reduce_kernel combines them."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = s * tiles_per_split * BLOCK_N
    if start >= seq_len:
        return
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G
    b64 = b.to(tl.int64)
    q_rows = q_ptr + b64 * stride_qt + (h * G + offs_g)[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=mask_g[:, None], other=0.0)

    m_i = tl.full([G_PAD], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    bt_row = block_tables_ptr + b64 * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_page = offs_n % BLOCK_SIZE
        k_off = page * stride_kcb + in_page * stride_kct + h * stride_kch
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (G_PAD, BLOCK_N) fp32
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = page * stride_vcb + in_page * stride_vct + h * stride_vch
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if DIRECT:
        o_rows = out_ptr + b64 * stride_ot + (h * G + offs_g)[:, None] * stride_oh
        tl.store(o_rows + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:
        # part_out is contiguous (B, HQ, S, D); part_lse contiguous (B, HQ, S).
        hq_total = tl.num_programs(1) * G
        row = (b64 * hq_total + h * G + offs_g) * num_splits + s  # (G_PAD,)
        tl.store(part_out_ptr + row[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=mask_g)


@_jit_unspecialized("seq_lens_ptr", "num_splits")
def decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # must equal decode_kernel's: it decides how many splits hold data
    SPLITS_PAD: tl.constexpr,
):
    """Grid (B, HQ): combines the splits that decode_kernel wrote (the rest hold stale memory and are
    masked out by recomputing the same split arithmetic from seq_len)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    n_valid = tl.cdiv(n_tiles, tiles_per_split)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D)
    mask_s = offs_s < n_valid
    row = (b.to(tl.int64) * tl.num_programs(1) + hq) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    w = w / tl.sum(w, 0)
    o = tl.load(part_out_ptr + row[:, None] * D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0)
    o_ptr = out_ptr + b.to(tl.int64) * stride_ot + hq * stride_oh + offs_d
    tl.store(o_ptr, res.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_tile(
    q,
    acc,
    m_i,
    l_i,
    n0,
    q_pos,
    seq_len,
    bt_row,
    k_cache_ptr,
    v_cache_ptr,
    kv_head_off_k,
    kv_head_off_v,
    stride_kcb,
    stride_kct,
    stride_vcb,
    stride_vct,
    qk_scale,
    offs_d,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One K/V tile of the prefill inner loop (online softmax). MASKED adds the causal and
    end-of-sequence masks; tiles fully below every row's position skip them."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_seq = offs_n < seq_len
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    in_page = offs_n % BLOCK_SIZE
    k_ptrs = (
        k_cache_ptr + (page * stride_kcb + in_page * stride_kct + kv_head_off_k)[:, None] + offs_d[None, :]
    )
    v_ptrs = (
        v_cache_ptr + (page * stride_vcb + in_page * stride_vct + kv_head_off_v)[:, None] + offs_d[None, :]
    )
    if MASKED:
        k = tl.load(k_ptrs, mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & in_seq[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@_jit_unspecialized("block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr", "stride_bt")
def prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_bt,
    stride_ot,
    stride_oh,
    G,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Variable-length causal attention of the new tokens over the paged cache (prefix included).
    Grid (HQ, cdiv(max_seqlen_q, BLOCK_M), B). The m-tile index is reversed so the heaviest (latest)
    tiles of a sequence start first, and heads vary fastest so programs reading one kv head's K/V
    run together and share it through L2.

    Sequence b's new tokens are rows cu[b]..cu[b+1]-1 of q/out, at positions
    seq_len - n_new .. seq_len - 1; row at position p attends keys 0..p."""
    hq = tl.program_id(0)
    mt = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    n_new = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if mt * BLOCK_M >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - n_new

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < n_new
    q_pos = prefix + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=mask_m[:, None], other=0.0
    )

    h = hq // G
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # Keys [0, full_end) are <= the tile's first position, so visible to every row: no masks.
    first_pos = prefix + mt * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M, seq_len) - 1
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            q, acc, m_i, l_i, n0, q_pos, seq_len, bt_row, k_cache_ptr, v_cache_ptr,
            h * stride_kch, h * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
            qk_scale, offs_d, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
    for n0 in range(full_end, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            q, acc, m_i, l_i, n0, q_pos, seq_len, bt_row, k_cache_ptr, v_cache_ptr,
            h * stride_kch, h * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
            qk_scale, offs_d, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row. With a residual: s = x + residual (rounded to the input dtype, as the
    eager model does), residual <- s in place, out <- rmsnorm(s). Norm math as Hugging Face Llama:
    fp32 mean of squares, normalised value rounded to the input dtype, then times the weight."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        add_rms_norm_row(x, residual_ptr + row * stride_r, weight_ptr, out_ptr + row * stride_o, offs, mask, n_cols, eps)
    else:
        rms_norm_row(x, weight_ptr, out_ptr + row * stride_o, offs, mask, n_cols, eps)


@triton.jit
def rms_norm_row(x, weight_ptr, out_row_ptr, offs, mask, n_cols, eps):
    """One row x (BLOCK,) -> out_row = rmsnorm(x) * weight: fp32 mean of squares, the normalised
    value rounded to x's dtype, then times the weight (Hugging Face Llama's order)."""
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row_ptr + offs, (normed * w).to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_rms_norm_row(x, residual_row_ptr, weight_ptr, out_row_ptr, offs, mask, n_cols, eps):
    """s = x + residual (rounded to the residual's dtype, as the eager model adds), written back
    to the residual row; then rms_norm_row(s). Shared by rms_norm_kernel and lamport.py."""
    r = tl.load(residual_row_ptr + offs, mask=mask, other=0.0)
    s = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
    tl.store(residual_row_ptr + offs, s, mask=mask)
    rms_norm_row(s, weight_ptr, out_row_ptr, offs, mask, n_cols, eps)


@triton.jit
def _rotate_heads(ptr, stride_h, n_heads, cos, sin, H_PAD: tl.constexpr, HALF: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < n_heads)[:, None]
    p1 = ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, o1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, o2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    n_q_heads,
    n_k_heads,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    """One program per token: rotate-half (GPT-NeoX / Llama) rotary embedding of all its q and k
    heads in place, fp32 math. cos/sin: (max_positions, HALF) rows indexed by the token's position."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos, sin, HQ_PAD, HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, n_k_heads, cos, sin, HK_PAD, HALF)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
    """SwiGLU's activation: out = silu(gate) * up, gate_up = [gate | up] along the row (the fused
    gate_up_proj output). Rounding as eager PyTorch: silu rounded to the input dtype, then the
    product (computed in fp32) rounded again. Grid (rows, cdiv(n_cols, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def skinny_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out (M, N) = x (M, K) @ w (N, K)^T for a few rows of x: the weight-streaming matmul of decode.

    One program per BLOCK_N output columns reads its (BLOCK_N, K) slab of w exactly once, tile by
    tile (w is read evict-first: every byte of it is used once per step, so it should not push
    x and the KV cache out of L2). USE_DOT: tensor-core dot on BLOCK_M (>= 16) padded rows;
    otherwise a broadcast multiply-and-sum over (BLOCK_M, BLOCK_N, BLOCK_K), for BLOCK_M <= 4.
    Accumulates in float32; rows m >= M and columns n >= N are masked."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(
                w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first"
            )
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            # partial products stay per k lane; one cross-lane reduction at the end
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def greedy_partial_kernel(
    x_ptr, stride_xb, V, part_max_ptr, part_idx_ptr, part_sum_ptr, NSPLIT: tl.constexpr, BLOCK: tl.constexpr
):
    """Program (row b, chunk s) of float32 logits: the chunk's max, the first index holding it, and
    sum(exp(x - max)) over the chunk (masked tail lanes read -inf and add 0)."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + offs, mask=offs < V, other=float("-inf"))
    m = tl.max(x, axis=0)
    i = tl.argmax(x, axis=0, tie_break_left=True)
    total = tl.sum(tl.exp(x - m), axis=0)
    tl.store(part_max_ptr + b * NSPLIT + s, m)
    tl.store(part_idx_ptr + b * NSPLIT + s, s * BLOCK + i)
    tl.store(part_sum_ptr + b * NSPLIT + s, total)


@triton.jit
def greedy_combine_kernel(
    part_max_ptr, part_idx_ptr, part_sum_ptr, token_ptr, logprob_ptr, NSPLIT: tl.constexpr, NSPLIT_PAD: tl.constexpr
):
    """Row b: token = the first index of the row's max (chunks are in index order, each holding its
    own first), logprob of it = max - logsumexp = -log(sum over chunks of sum_s * exp(max_s - max))."""
    b = tl.program_id(0)
    offs = tl.arange(0, NSPLIT_PAD)
    mask = offs < NSPLIT
    m = tl.load(part_max_ptr + b * NSPLIT + offs, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + b * NSPLIT + offs, mask=mask, other=2147483647)
    sums = tl.load(part_sum_ptr + b * NSPLIT + offs, mask=mask, other=0.0)
    top = tl.max(m, axis=0)
    token = tl.min(tl.where(m == top, idx, 2147483647), axis=0)
    scaled = tl.where(m == float("-inf"), 0.0, sums * tl.exp(m - top))
    tl.store(token_ptr + b, token.to(tl.int64))
    tl.store(logprob_ptr + b, -tl.log(tl.sum(scaled, axis=0)))

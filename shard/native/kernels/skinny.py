"""Weight-streaming matmul for decode's few rows: out = x @ w.T with x of at most MAX_ROWS rows.

At batch 1 a decode step is ~90% matmuls that read every weight byte once, so their speed is the
step's speed. cuBLAS picks split-K kernels for some Llama shapes that reach only ~55% of HBM
bandwidth on H100 (o_proj 4096x4096: 20.7 us for 33.5 MB, bench/results/.../profile-b1.log); a
plain one-pass kernel with enough bytes in flight per SM does better. Configs come from the sweep
in bench/kernels_bench.py (section `skinny`); NOTES-kernels.md has the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROWS = 16


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    use_dot: bool = True  # False: broadcast multiply-sum (rows <= 4 only)


# From the sweep on an H100 (bench/results/gpu-h100-20261126-skinny/skinny.json; cold L2, us):
# one row: many narrow programs (4 columns, 2 warps) beat cuBLAS on every Llama-3.1-8B projection
# (qkv 24.1 vs 29.8, o 18.4 vs 23.2, gate_up 88.5 vs 95.2, down 49.8 vs 56.0; the TP=2 shards
# alike), summed over a token 11% less time; a vocabulary-sized head prefers wide dot programs
# (351 vs 365). 2..16 rows: the dot form, within a few percent of cuBLAS either way.
_ONE_ROW = SkinnyConfig(block_n=4, block_k=512, num_warps=2, num_stages=3, use_dot=False)
_DOT = SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=3, use_dot=True)


def pick_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Launch geometry for (m, n, k)."""
    return _ONE_ROW if m == 1 and n < 32768 else _DOT


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Shapes and dtypes skinny_matmul handles (the caller falls back to F.linear otherwise)."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and w.dtype == x.dtype
        and x.stride(-1) == 1
        and w.stride(-1) == 1
        and w.stride(0) == w.shape[1]
        and x.shape[1] == w.shape[1]
    )


def skinny_matmul(
    x: torch.Tensor, w: torch.Tensor, *, config: SkinnyConfig | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K), w (N, K) -> (M, N) in x's dtype, float32 accumulation. M <= MAX_ROWS."""
    from shard.native.kernels import _triton_kernels as kern

    m, k = x.shape
    n = w.shape[0]
    cfg = config or pick_config(m, n, k)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if cfg.use_dot:
        block_m = 16
    else:
        block_m = 1 if m == 1 else 2 if m == 2 else 4
        assert m <= 4, "the multiply-sum form handles at most 4 rows"
    grid = (-(-n // cfg.block_n),)
    kern.skinny_matmul_kernel[grid](
        x,
        w,
        out,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_DOT=cfg.use_dot,
        EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out

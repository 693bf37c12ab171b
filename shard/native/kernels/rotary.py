"""Rotary position embedding applied to q and k in place, one Triton launch for both.

Rotate-half layout (GPT-NeoX / Hugging Face Llama, Qwen2): for head vector x = [x1, x2] (halves),
x' = [x1 cos - x2 sin, x2 cos + x1 sin]. cos/sin are the model's precomputed tables (any rope
scaling, e.g. Llama 3's, is already in them). Math in fp32, one rounding to the q/k dtype
(eager HF rounds after each op, so results differ from it by bf16 rounding only). triton is
imported on first call.
"""

from __future__ import annotations

import torch


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """q (T, HQ, D), k (T, HKV, D): rotated in place (strided views of a fused qkv output are fine,
    last dim contiguous). positions (T,) int; cos, sin (max_positions, D // 2), same strides."""
    from shard.native.kernels import _triton_kernels as kern

    t, hq, d = q.shape
    hkv = k.shape[1]
    assert d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0, "head_dim // 2 must be a power of two"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert cos.shape[1] == d // 2
    if t == 0:
        return

    def pad(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    kern.rotary_kernel[(t,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), hq, hkv,
        HQ_PAD=pad(hq), HK_PAD=pad(hkv), HALF=d // 2, num_warps=4,
    )  # fmt: skip

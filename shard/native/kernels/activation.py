"""Fused SwiGLU activation (silu(gate) * up) as one Triton kernel: eager runs it as two kernels
and a temporary, pure launch latency at decode batch sizes. triton is imported on first call."""

from __future__ import annotations

import torch

BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I), last dim contiguous -> (T, I) silu(gate_up[:, :I]) * gate_up[:, I:]."""
    from shard.native.kernels import _triton_kernels as kern

    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1 and gate_up.shape[1] % 2 == 0
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, cols), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        kern.silu_mul_kernel[(rows, -(-cols // BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), cols, BLOCK=BLOCK, num_warps=4
        )
    return out

"""CPU fast path for the linears: weights prepacked once into oneDNN's blocked layout.

Why: on CPU a decode step is a chain of skinny matmuls (M = batch rows, 1..64) over weights read
from DRAM. F.linear hands them to MKL sgemm, which repacks the whole weight on every call. Packing
once at load time halves the matmul time of a step at batch 16 and cuts it by ~1/3 at batch 1
(measured on the 2-core AMD EPYC CI machine with SmolLM2-135M's shapes, fp32: 111 -> 59 ms and
45 -> 34 ms per step; bench/BENCHMARKS.md). Prefill (M in the thousands) gains a few percent.

The packed layout depends on a batch-size hint only for speed, never for correctness: any number
of rows works with any hint. Invariant: a packed Linear no longer reads its `weight` (freed, unless
it is shared with the embedding), so packing happens after loading and after tensor-parallel
sharding.
"""

from __future__ import annotations

import torch
from torch import nn

# Rows the packing is tuned for; the measured step time varies little between hints 8 and 64.
DEFAULT_BATCH_HINT = 16


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing exists on x86/ARM CPU builds of torch; float32 is the dtype it is exact for
    (reduced-precision packed kernels need AVX512-BF16/AMX, which the CPU may lack)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_weight(weight: torch.Tensor, batch_hint: int = DEFAULT_BATCH_HINT) -> torch.Tensor:
    """(out, in) float32 weight -> an opaque oneDNN tensor for packed_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, in) -> (M, out), the same contract as F.linear(x, weight, bias)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT) -> int:
    """Packs every model.Linear in place and frees the plain weights it no longer reads. Returns how
    many were packed. A weight another module also holds (a tied lm_head's embedding) is kept."""
    from shard.native.model import Linear

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.packed is None:
            module.packed = pack_weight(module.weight, batch_hint)
            if owners[id(module.weight)] == 1:
                module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
            count += 1
    return count

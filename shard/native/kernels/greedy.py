"""Greedy token and its log-probability in one pass over the logits (two small launches).

The eager chain (argmax, then logsumexp = amax + exp-sum + log, then gather and subtract) reads
the (B, V) float32 logits three times in ~5 small kernels: ~80 us per step at batch 1 on an H100
for a 128k vocabulary (bench/results/gpu-h100-20261126-skinny/engine-x1/profile-b1-skinny.log),
about 1.5% of the step. Here: grid (B, V / BLOCK) chunk partials (max, first argmax, sum of exp),
then one program per row combines them.
"""

from __future__ import annotations

import torch

BLOCK = 4096


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) float32, last dim contiguous -> (token ids (B,) int64: the first index of each
    row's max, as torch.argmax; logprobs (B,) float32: log_softmax of the row at that token)."""
    from shard.native.kernels import _triton_kernels as kern

    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(-1) == 1
    rows, vocab = logits.shape
    nsplit = -(-vocab // BLOCK)
    dev = logits.device
    part_max = torch.empty((rows, nsplit), dtype=torch.float32, device=dev)
    part_idx = torch.empty((rows, nsplit), dtype=torch.int32, device=dev)
    part_sum = torch.empty((rows, nsplit), dtype=torch.float32, device=dev)
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
    if rows:
        kern.greedy_partial_kernel[(rows, nsplit)](
            logits, logits.stride(0), vocab, part_max, part_idx, part_sum, NSPLIT=nsplit, BLOCK=BLOCK, num_warps=8
        )
        pad = max(16, 1 << (nsplit - 1).bit_length())
        kern.greedy_combine_kernel[(rows,)](
            part_max, part_idx, part_sum, tokens, logprobs, NSPLIT=nsplit, NSPLIT_PAD=pad, num_warps=1
        )
    return tokens, logprobs

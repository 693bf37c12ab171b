"""The paged KV cache: one K and one V tensor per layer, in the layout forward.py documents.

Per layer: (num_blocks, block_size, num_kv_heads_local, head_dim); slot = block * block_size + offset.
Under tensor parallelism each rank holds only its own kv heads (num_kv_heads // tp), so the same
block ids index every rank's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer (num_blocks, block_size, num_kv_heads_local, head_dim)
    v: list[torch.Tensor]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """Zero-filled, so that attention over padded block-table entries reads finite values."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k=k, v=v, block_size=block_size)


def kv_bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block id costs across all layers, K and V (num_kv_heads: this rank's heads)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

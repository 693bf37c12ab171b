"""The contract between the native engine's batch builder and its model / attention backends.

A step is a flat batch: the new tokens of every sequence concatenated (T tokens over B sequences).
Prefill steps compute input_ids[prefix_len:] of each new sequence; decode steps compute one token
per running sequence. K/V of the new tokens are written to the paged cache at `slot_mapping`
before attention reads the cache, so attention always reads K/V from the cache (prefix-cache hits
and decode look the same to it).

Paged KV cache layout, per layer: k_cache, v_cache of shape
    (num_blocks, block_size, num_kv_heads, head_dim)
and slot s = block_id * block_size + offset_in_block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # (T,) int64, cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    seq_lens: torch.Tensor  # (B,) int32, total tokens of each sequence after this step (prefix + new)
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32, offsets of each sequence's new tokens in the flat batch
    logits_indices: torch.Tensor  # (L,) int64, rows of the flat batch whose logits the step needs
    is_prefill: bool
    max_seqlen_q: int  # max new tokens of one sequence (1 for decode)
    max_seqlen_k: int  # max of seq_lens
    # Mixed batches (prefill steps only): the first num_decode sequences are running ones taking
    # their next decode step, one new token each, so backends may give them the decode kernel.
    num_decode: int = 0
    # True when no sequence has a cached prefix (prefill steps of fresh sequences only, no decode
    # rows): every sequence's keys are exactly its new tokens, so attention may run on the new
    # q/k/v alone. A host bool from host-side lengths, so backends route on it without a sync.
    no_prefix: bool = False
    # Mixed batches: > 0 when every prefill sequence (the ones after the num_decode decode rows)
    # starts at position 0 and has exactly this many new tokens, so the prefill rows' attention is
    # a dense causal attention over their own new q/k/v (the dense SDPA route of a plain prefill).
    # 0 otherwise, and always 0 without decode rows (no_prefix and the lengths cover that case).
    fresh_equal_len: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass
class AttentionMetadata:
    """What an attention backend needs besides q/k/v; a view of ForwardBatch."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    is_prefill: bool
    max_seqlen_q: int
    max_seqlen_k: int
    num_decode: int = 0  # ForwardBatch.num_decode
    no_prefix: bool = False  # ForwardBatch.no_prefix
    fresh_equal_len: int = 0  # ForwardBatch.fresh_equal_len
    # What a backend derives from the fields above once per step and reuses in every layer (e.g.
    # the reference backend's gather index and length mask, the Triton backend's kernel choice);
    # lives as long as this step.
    derived: dict[str, torch.Tensor | bool] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: ForwardBatch) -> AttentionMetadata:
        return cls(
            slot_mapping=batch.slot_mapping,
            block_tables=batch.block_tables,
            seq_lens=batch.seq_lens,
            cu_seqlens_q=batch.cu_seqlens_q,
            is_prefill=batch.is_prefill,
            max_seqlen_q=batch.max_seqlen_q,
            max_seqlen_k=batch.max_seqlen_k,
            num_decode=batch.num_decode,
            no_prefix=batch.no_prefix,
            fresh_equal_len=batch.fresh_equal_len,
        )

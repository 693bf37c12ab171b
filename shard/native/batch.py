"""Host-side construction of ForwardBatch objects (shapes in shard/native/forward.py).

Prefill batches are built from Python lists once per Prefill call. Decode batches are built once
per change of the running set and then advanced on the device (positions += 1, slots recomputed
from the block table), so a steady decode step does no host-to-device copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shard.native.forward import ForwardBatch


def _pad_block_tables(tables: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(tables), max(width, 1)), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def build_prefill(
    *,
    new_tokens: Sequence[Sequence[int]],
    prefix_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    all_logits: Sequence[bool],
    block_size: int,
    device: torch.device,
    num_decode: int = 0,
) -> ForwardBatch:
    """new_tokens[b] are the tokens of sequence b from position prefix_lens[b] on.
    Logits rows: the last new token of each sequence, or all of them where all_logits[b].
    num_decode: the first sequences are decode rows of a mixed batch (one token each).
    no_prefix is set when every sequence starts at position 0 (no prefix-cache hit, no earlier
    chunk) and there are no decode rows; fresh_equal_len when there are decode rows and every
    other sequence starts at 0 with the same number of new tokens (ForwardBatch)."""
    assert all(len(t) == 1 for t in new_tokens[:num_decode])
    lens = np.array([len(t) for t in new_tokens], dtype=np.int64)
    prefix = np.array(prefix_lens, dtype=np.int64)
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    positions = np.concatenate([np.arange(p, p + n) for p, n in zip(prefix, lens, strict=True)])
    seq_index = np.repeat(np.arange(len(lens)), lens)
    width = max(len(t) for t in block_tables)
    tables = _pad_block_tables(block_tables, width)
    slots = tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size
    rows = [
        np.arange(cu[b], cu[b + 1]) if all_logits[b] else np.array([cu[b + 1] - 1]) for b in range(len(lens))
    ]
    ids = np.fromiter((t for seq in new_tokens for t in seq), dtype=np.int64, count=int(cu[-1]))
    seq_lens = prefix + lens
    fresh_equal_len = 0
    if 0 < num_decode < len(lens):
        rest = lens[num_decode:]
        if not prefix[num_decode:].any() and (rest == rest[0]).all():
            fresh_equal_len = int(rest[0])

    def dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)

    return ForwardBatch(
        input_ids=dev(ids, torch.int64),
        positions=dev(positions, torch.int64),
        slot_mapping=dev(slots, torch.int64),
        block_tables=dev(tables, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        cu_seqlens_q=dev(cu, torch.int32),
        logits_indices=dev(np.concatenate(rows), torch.int64),
        is_prefill=True,
        max_seqlen_q=int(lens.max()),
        max_seqlen_k=int(seq_lens.max()),
        num_decode=num_decode,
        no_prefix=num_decode == 0 and not prefix.any(),
        fresh_equal_len=fresh_equal_len,
    )


class DecodeBatch:
    """Device-resident decode inputs for a fixed running set, advanced in place each step.

    input_ids (B,) holds each sequence's pending token (sampled, K/V not yet written);
    positions (B,) its position = tokens already in the cache.
    """

    def __init__(
        self,
        *,
        last_tokens: Sequence[int],
        kv_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device,
        width: int = 0,
    ) -> None:
        """width: columns of the block table (at least the longest list): room for set_block_rows."""
        b = len(last_tokens)
        self.block_size = block_size
        self.input_ids = torch.tensor(last_tokens, dtype=torch.int64, device=device)
        self.positions = torch.tensor(kv_lens, dtype=torch.int64, device=device)
        width = max(width, *(len(t) for t in block_tables))
        self.block_tables = torch.from_numpy(_pad_block_tables(block_tables, width)).to(device)
        self.cu_seqlens_q = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(b, dtype=torch.int64, device=device)
        self.max_kv = max(kv_lens)

    def forward_batch(self) -> ForwardBatch:
        pos = self.positions
        block = self.block_tables.gather(1, (pos // self.block_size).unsqueeze(1)).squeeze(1)
        return ForwardBatch(
            input_ids=self.input_ids,
            positions=pos,
            slot_mapping=block.to(torch.int64) * self.block_size + pos % self.block_size,
            block_tables=self.block_tables,
            seq_lens=(pos + 1).to(torch.int32),
            cu_seqlens_q=self.cu_seqlens_q,
            logits_indices=self.logits_indices,
            is_prefill=False,
            max_seqlen_q=1,
            max_seqlen_k=self.max_kv + 1,
        )

    def set_block_rows(self, rows: Sequence[int], tables: Sequence[Sequence[int]]) -> bool:
        """Rewrites rows of the block table with longer block lists (a Decode's block extensions)
        in place. A step still in flight is safe: the write is queued on the same stream, after it,
        and it had room for its own K/V. False, with nothing written, when a list is wider than the
        table."""
        width = self.block_tables.shape[1]
        if any(len(t) > width for t in tables):
            return False
        if rows:
            # non_blocking from pageable memory: staged at once, no wait for the step in flight (a
            # blocking copy would synchronize the stream, i.e. wait for that step on the host)
            device = self.block_tables.device
            index = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
            values = torch.from_numpy(_pad_block_tables(tables, width)).to(device, non_blocking=True)
            self.block_tables.index_copy_(0, index, values)
        return True

    def select(self, rows: Sequence[int], *, max_kv: int) -> DecodeBatch:
        """The batch of `rows` (in that order), gathered on the device: sequences that ended leave
        without the host state being current, so a step still in flight stays in flight (its
        advance is queued before the gather, on the same stream). max_kv: the kept rows' longest
        cache length (the host counts it at each launch)."""
        device = self.input_ids.device
        # non_blocking from pageable memory: staged at once, no wait for the step in flight
        index = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        new = object.__new__(DecodeBatch)
        new.block_size = self.block_size
        new.input_ids = self.input_ids.index_select(0, index)
        new.positions = self.positions.index_select(0, index)
        new.block_tables = self.block_tables.index_select(0, index)
        new.cu_seqlens_q = self.cu_seqlens_q[: len(rows) + 1]  # both are aranges: a prefix is one
        new.logits_indices = self.logits_indices[: len(rows)]
        new.max_kv = max_kv
        return new

    def advance(self, sampled: torch.Tensor) -> None:
        """After a step: the sampled tokens become pending, every sequence grew by one."""
        self.input_ids.copy_(sampled)
        self.positions.add_(1)
        self.max_kv += 1

"""KV-block planning for paged engines: admission (with prefix-cache reuse), growth before each
decode call, and release (finished sequences feed the prefix cache). Torch-free and I/O-free: the
scheduler calls it and does the RPCs.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.block_allocator import BlockAllocator, OutOfBlocksError
from router.handle import Entry
from router.radix_cache import RadixCache


@dataclass(frozen=True)
class Placement:
    """Where an admitted sequence's prompt goes: its block table and how much is already cached."""

    blocks: list[int]
    prefix_len: int


class KvPlanner:
    def __init__(self, *, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.cache = RadixCache(self.allocator) if prefix_caching else None
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def lifetime_blocks(self, entry: Entry) -> int:
        """The most blocks the entry can ever hold: its full length (prompt + max_new_tokens) plus
        the one block of a call's overshoot past its end (grow below). Shared prefix blocks are
        counted for every holder, so a reservation by this is conservative."""
        return self.allocator.blocks_for_tokens(self._longest(entry))

    def _longest(self, entry: Entry) -> int:
        return len(entry.request.input_ids) + entry.request.max_new_tokens + self.allocator.block_size

    def _allocate(self, n: int) -> list[int]:
        """Allocates n blocks; the allocator evicts unreferenced cached prefixes when short."""
        return self.allocator.allocate(n) if n > 0 else []  # raises OutOfBlocksError, allocating nothing

    def place(self, entry: Entry) -> Placement | None:
        """Blocks for the prompt plus the first generated token, or None when they don't fit."""
        tokens = entry.tokens
        matched: tuple[int, ...] = ()
        prefix_len = 0
        # Prompt logprobs need every prompt position computed, so such requests skip the cache.
        if self.cache is not None and not entry.request.prefill_logprobs:
            # Match on tokens[:-1] so at least one token is computed (it yields the next logits).
            match = self.cache.match(tokens[:-1])
            matched, prefix_len = match.blocks, match.num_tokens
        need = self.allocator.blocks_for_tokens(len(tokens) + 1) - len(matched)
        try:
            fresh = self._allocate(need)
        except OutOfBlocksError:
            self.allocator.decref(matched)
            return None
        return Placement(blocks=[*matched, *fresh], prefix_len=prefix_len)

    def grow(self, entry: Entry, steps: int) -> list[int] | None:
        """New blocks so the entry can take `steps` more tokens; None when they don't fit. Also
        for an entry with fewer tokens left: an engine keeps a sequence that ended mid-call in its
        batch until the call ends, writing K/V into its own blocks (shard/native/decode_steps.py);
        it costs at most one block per sequence near its end: the growth is capped at one block
        past the request's own maximum, which the start-up check keeps within capacity (a lone
        request must always fit, or it would preempt itself forever)."""
        want = self.allocator.blocks_for_tokens(min(entry.kv_len + steps + 1, self._longest(entry)))
        need = want - len(entry.blocks)
        try:
            fresh = self._allocate(need)
        except OutOfBlocksError:
            return None
        entry.blocks.extend(fresh)
        return fresh

    def release(self, entry: Entry, *, cache_it: bool) -> None:
        """Returns the entry's blocks; with cache_it, its full blocks stay reusable as a prefix."""
        if cache_it and self.cache is not None and entry.kv_len > 0:
            self.cache.insert(entry.tokens[: entry.kv_len], entry.blocks)
        self.allocator.decref(entry.blocks)
        entry.blocks = []
        entry.kv_len = 0
